"""``imgscan calibrate``: a bundle's calibration read again from normal images it never trained on.

Every p-value behind ``anomaly_score`` is read against the scores of the normal images
each detector held out at training (a tenth of them; ``detectors.fusion``). Two things
that tenth cannot give, a set of normal images named by the user can:

* **Size.** A detector trained on ~120 images holds out ~12, and from 12 scores the tail
  cannot call anything rarer than about 1 in 250; a larger calibration set lets the
  strong detector's p fall further than a weak one's noise.
* **Exchangeability.** Held-out images drawn from the training pool can be near-copies
  of training images (overlapping crops of one slide, burst photos, frames of one video):
  their scores are then in-sample scores, lower than a new image's, and normal images
  of the next night read as rarer than they are.

What the re-calibration changes, measured on the kept scores of ``bench/accuracy.py
--keep`` runs by ``bench/calibration_set.py`` (half of each archive's normal test images
as the calibration set, the fusion read on the other half): the README's
"Calibrating on your own normal images".

The models are not touched: each detector scores the calibration images and keeps
their statistics (``BaseDetector.calibrate``) in place of its held-out ones; the new
bundle is written under another (or the same) URI, with a new version, and
``bundle.json``'s ``training.calibration`` says where its calibration came from.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from detectors.base import fingerprint
from jobs.bundle import ModelBundle
from jobs.images import MAX_BYTES, MAX_PIXELS
from jobs.sources import list_shards
from jobs.storage import (
    StorageOptions,
    check_writable,
    filesystem,
    join,
    list_files,
    read_bytes,
    redact,
    write_bytes,
    write_json,
)

#: images per model call while scoring the calibration set
BATCH = 256
#: fewer calibration images than this and the verb says the tail will claim little
FEW = 100


@dataclass(frozen=True)
class CalibrateConfig:
    source: str
    models: str
    out: str
    normal_label: str | None = None
    max_pixels: int = MAX_PIXELS
    max_bytes: int = MAX_BYTES
    storage_options: StorageOptions | None = None


def log(msg: str) -> None:
    print(f"[imgscan calibrate] {redact(msg)}", file=sys.stderr, flush=True)


@dataclass
class Calibrated:
    bundle: ModelBundle
    n_images: int
    n_skipped: int


def calibrate(cfg: CalibrateConfig) -> Calibrated:
    """Read the bundle and the calibration images, re-calibrate every detector, write the bundle."""
    from jobs.train import load_training_set

    so = cfg.storage_options
    bundle = ModelBundle.load(cfg.models, so)  # a missing or broken bundle fails before the long read
    check_writable(cfg.out, so)
    shards = list_shards(cfg.source, so)
    ts = load_training_set(
        shards,
        cfg.source,
        bundle.input_size,
        bundle.channels,
        so,
        progress=log,
        max_pixels=cfg.max_pixels,
        max_bytes=cfg.max_bytes,
    )
    if fingerprint(ts.images, ts.labels) == bundle.training.get("fingerprint"):
        raise ValueError(
            f"{cfg.source} holds the very images {cfg.models} was trained on: their scores are in-sample "
            "(lower than a new image's), so normal images would read as rare. Calibrate on normal images "
            "the bundle did not train on."
        )
    keep = normal_images(ts.labels, cfg.normal_label, bundle.training)
    if not any(keep):
        known = sorted({lbl for lbl in ts.labels if lbl is not None})
        raise ValueError(f"--normal-label {cfg.normal_label!r} is not a label of {cfg.source}; labels: {known}.")
    images = np.stack([img for img, k in zip(ts.images, keep, strict=True) if k])
    if len(images) < FEW:
        log(
            f"only {len(images)} calibration images: p-values beyond the largest of their scores "
            "rest on a tail fitted to a few of them"
        )
    scores = calibration_scores(bundle, images, progress=log)
    for name, det in bundle.detectors.items():
        det.calibrate(scores[name])
    bundle.training = {
        **bundle.training,
        "calibration": {
            "source": cfg.source,
            "n_images": len(images),
            "n_skipped": len(ts.skipped),
            "normal_label": cfg.normal_label,
            "fingerprint": fingerprint(images),
            "from_version": bundle.version,
        },
    }
    if cfg.out.rstrip("/") != cfg.models.rstrip("/"):
        copy_training_report(cfg.models, cfg.out, so)
    write_json(join(cfg.out, "training", "calibration.json"), bundle.calibration, so)  # as train writes it
    bundle.save(cfg.out, so)  # bundle.json last: the new bundle is complete only once it is there
    return Calibrated(bundle, len(images), len(ts.skipped))


def copy_training_report(src: str, dst: str, storage_options: StorageOptions | None = None) -> None:
    """The training report (``training/``: curves, reconstructions, skipped images) of the bundle
    at ``src``, copied under ``dst``: the models it describes are the same."""
    root = join(src, "training")
    _, base = filesystem(root, storage_options)
    for info in list_files(root, storage_options):
        rel = info["path"][len(base.rstrip("/")) :].lstrip("/")
        write_bytes(join(dst, "training", rel), read_bytes(info["name"], storage_options), storage_options)


def normal_images(labels: list[str | None], normal_label: str | None, training: dict[str, Any]) -> list[bool]:
    """Which calibration images count as normal: those of ``normal_label``; without one, those
    of the label the bundle trained on as normal when the source has it, else every image
    but those of the bundle's anomaly label."""
    label = normal_label
    if label is None and training.get("normal_label") in labels:
        label = training["normal_label"]
    if label is not None:
        return [lbl == label for lbl in labels]
    anomaly = training.get("anomaly_label")
    return [anomaly is None or lbl != anomaly for lbl in labels]


def calibration_scores(
    bundle: ModelBundle, images: np.ndarray, *, progress: Callable[[str], None] | None = None
) -> dict[str, dict[str, np.ndarray]]:
    """detector -> column -> float64 (n,) scores of uint8 ``images`` (n, s, s, c), every
    directed column (what ``BaseDetector.calibrate`` keeps), in batches of ``BATCH``."""
    parts: dict[str, dict[str, list[np.ndarray]]] = {name: {} for name in bundle.detectors}
    t0 = time.monotonic()
    for start in range(0, len(images), BATCH):
        batch = images[start : start + BATCH]
        for name, det in bundle.detectors.items():
            out: dict[str, Any] = det.score(batch)
            for col in det.columns:
                if col.direction is not None and col.name in out:
                    parts[name].setdefault(col.name, []).append(np.asarray(out[col.name], dtype=np.float64))
        if progress:
            done = min(start + BATCH, len(images))
            progress(f"scored {done} of {len(images)} calibration images, {time.monotonic() - t0:.1f}s")
    return {name: {c: np.concatenate(v) for c, v in cols.items()} for name, cols in parts.items()}


def summary_line(cfg: CalibrateConfig, result: Calibrated) -> str:
    skipped = f" ({result.n_skipped} unreadable, skipped)" if result.n_skipped else ""
    return (
        f"calibrated {', '.join(result.bundle.detectors)} on {result.n_images} normal images of "
        f"{redact(cfg.source)}{skipped} -> {redact(cfg.out)} (version {result.bundle.version})"
    )
