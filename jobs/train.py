"""``imgscan train``: fit the detectors on a folder of images, write one bundle.

The autoencoder, the mixture and the HOG baseline learn from the images of the
normal label (all images when no label is named); the CAM classifier learns
every label (or normal vs self-made defects when there is only one).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeGuard

import numpy as np

from detectors import (
    DETECTOR_NAMES,
    DETECTORS,
    AutoencoderDetector,
    BaseDetector,
    CamDetector,
    MixtureDetector,
    OcsvmDetector,
    WhiteningDetector,
)
from detectors.base import fingerprint, split_validation
from detectors.fusion import DIRECTIONS
from detectors.preprocessing import resize_uint8
from jobs.bundle import ModelBundle
from jobs.images import DRAFT_MARGIN, MAX_BYTES, MAX_PIXELS, check_limits, decode_image
from jobs.sources import Shard, SourceError, list_shards, read_shard
from jobs.storage import StorageError, StorageOptions, join, read_bytes, redact, write_bytes, write_json

#: at or above this many normal training images a detector's held-out tenth alone calibrates it
REPLICATE_BELOW = 1000
#: fewest normal images that calibration replicas are trained for (fewer hold nothing out)
MIN_REPLICATE = 30


@dataclass(frozen=True)
class TrainConfig:
    source: str
    out: str
    detectors: tuple[str, ...] = DETECTOR_NAMES
    image_size: int = 32
    channels: int | None = None  # None: 3 if any image has colour, else 1
    epochs: int = 30
    normal_label: str | None = None
    anomaly_label: str | None = None
    variational: bool = False
    backbone: str = "autoencoder"  # features for the mixture
    cam_backbone: str = "small"
    weights: str | None = None  # URI of backbone weights (fetched to a temp file for Keras)
    seed: int = 0
    # per-detector hyper-parameter overrides, e.g. {"autoencoder": {"latent_dim": 64}}
    params: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    storage_options: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = MAX_PIXELS  # per image, from its header: more is an unreadable input
    max_bytes: int = MAX_BYTES  # per input file: a larger one is unreadable, read no further
    # on small sets, copies whose held-out scores calibrate too; opt-in (why: calibration_replicas)
    calibration_replicas: int = 0

    def __post_init__(self) -> None:
        check_limits(self.max_pixels, self.max_bytes)
        unknown = [d for d in self.detectors if d not in DETECTORS]
        if unknown or not self.detectors:
            raise ValueError(f"Unknown detectors {unknown}; choose from {list(DETECTORS)}.")
        if self.image_size < 16 or self.image_size % 4:
            raise ValueError(f"--image-size must be a multiple of 4 and >= 16. Received: {self.image_size}.")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1. Received: {self.epochs}.")
        if self.calibration_replicas < 0:
            raise ValueError(f"--calibration-replicas must be >= 0. Received: {self.calibration_replicas}.")
        if self.channels not in (None, 1, 3):
            raise ValueError(f"--channels must be 1 or 3. Received: {self.channels}.")
        stray = [d for d in self.params if d not in self.detectors]
        if stray:
            raise ValueError(f"--param names detectors that are not trained: {stray}; trained: {list(self.detectors)}.")


@dataclass
class TrainingSet:
    images: list[np.ndarray]  # uint8 (s, s, c) each
    labels: list[str | None]
    ids: list[str]
    skipped: list[dict[str, str | None]]
    channels: int
    digests: list[str] = field(default_factory=list)  # sha256 of each image's bytes (exact duplicates)


def log(msg: str) -> None:
    print(f"[imgscan train] {redact(msg)}", file=sys.stderr, flush=True)


def check_labels(shards: Sequence[Shard], cfg: TrainConfig) -> None:
    """Fail before reading anything when a named label is absent from a folder source."""
    if not shards or any(s.kind != "files" for s in shards):
        return  # labels of tar/Parquet sources are known only once read
    known = sorted({lbl for s in shards for lbl in s.labels if lbl is not None})
    for flag, value in (("--normal-label", cfg.normal_label), ("--anomaly-label", cfg.anomaly_label)):
        if value is not None and value not in known:
            raise ValueError(f"{flag} {value!r} is not a label of {cfg.source}; labels: {known or 'none'}.")


def load_training_set(
    shards: Sequence[Shard],
    source: str,
    image_size: int,
    channels: int | None,
    storage_options: StorageOptions | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
) -> TrainingSet:
    """Read and decode every image of a source, resized to ``image_size``; the
    unreadable ones (over ``max_pixels`` / ``max_bytes`` too: a bomb is refused from its
    header, never decoded) are listed in ``skipped`` with their reason. ``progress``
    gets a line per shard (default: this verb's log)."""
    progress = progress or log
    raw: list[tuple[np.ndarray, str | None, str, str]] = []
    skipped: list[dict[str, str | None]] = []
    t0 = time.monotonic()
    for shard in shards:
        for rec in read_shard(shard, storage_options, max_bytes=max_bytes):
            # at the size the models need, as the scoring job decodes (a camera JPEG is held at
            # ~2x the input size, not whole, until all are resized)
            dec = (
                decode_image(
                    rec.data,
                    max_pixels=max_pixels,
                    max_bytes=max_bytes,
                    min_size=DRAFT_MARGIN * image_size,
                    gray=channels == 1,
                )
                if rec.error is None
                else None
            )
            if dec is None or dec.pixels is None:
                skipped.append({"image_id": rec.image_id, "reason": rec.error or (dec.error if dec else "")})
                continue
            raw.append((dec.pixels, rec.label, rec.image_id, hashlib.sha256(rec.data or b"").hexdigest()))
        progress(f"read {len(raw) + len(skipped)} images ({len(skipped)} unreadable), {time.monotonic() - t0:.1f}s")
    if not raw:
        raise SourceError(f"Source {source} has no readable image ({len(skipped)} unreadable).")
    if channels is None:
        channels = 3 if any(_has_colour(p) for p, _, _, _ in raw) else 1
    images = [resize_uint8(p, image_size, channels) for p, _, _, _ in raw]
    return TrainingSet(images, [r[1] for r in raw], [r[2] for r in raw], skipped, channels, digests=[r[3] for r in raw])


def _has_colour(p: np.ndarray) -> bool:
    return p.shape[2] == 3 and not (np.array_equal(p[..., 0], p[..., 1]) and np.array_equal(p[..., 1], p[..., 2]))


def train(cfg: TrainConfig) -> ModelBundle:
    """Run the training job; returns the saved bundle."""
    so = cfg.storage_options
    shards = list_shards(cfg.source, so)
    check_labels(shards, cfg)
    check_params(cfg.params)
    with tempfile.TemporaryDirectory() as tmp:
        weights_path = fetch_weights(cfg.weights, tmp, so)  # before the long read: a bad URI fails at once
        return _train(cfg, shards, weights_path)


def _train(cfg: TrainConfig, shards: Sequence[Shard], weights_path: str | None) -> ModelBundle:
    so = cfg.storage_options
    ts = load_training_set(
        shards, cfg.source, cfg.image_size, cfg.channels, so, max_pixels=cfg.max_pixels, max_bytes=cfg.max_bytes
    )
    labels = ts.labels
    known = sorted({lbl for lbl in labels if lbl is not None})
    if cfg.normal_label is not None and cfg.normal_label not in known:
        raise ValueError(f"--normal-label {cfg.normal_label!r} is not a label of {cfg.source}; labels: {known}.")
    if cfg.anomaly_label is not None and cfg.anomaly_label not in known:
        raise ValueError(f"--anomaly-label {cfg.anomaly_label!r} is not a label of {cfg.source}; labels: {known}.")
    x_all = np.stack(ts.images)
    normal_mask = np.array(
        [(cfg.normal_label is None and lbl != cfg.anomaly_label) or lbl == cfg.normal_label for lbl in labels]
    )
    x_normal = x_all[normal_mask]
    log(
        f"{len(x_all)} images, {len(x_normal)} normal, labels {known or 'none'}, "
        f"{cfg.image_size}px x {ts.channels} channel(s)"
    )
    with contextlib.redirect_stdout(sys.stderr):  # Keras prints epoch lines on stdout; stdout is for the result
        fitted, _ = fit_detectors(
            cfg, x_all, labels, normal_mask, ts.channels, weights_path=weights_path, verbose=2, progress=log
        )
    bundle = ModelBundle(
        detectors=fitted,
        input_size=cfg.image_size,
        channels=ts.channels,
        training={
            "source": cfg.source,
            "fingerprint": fingerprint(ts.images, labels),
            "n_images": len(ts.images),
            "n_normal": int(normal_mask.sum()),
            "n_skipped": len(ts.skipped),
            "labels": known,
            "normal_label": cfg.normal_label,
            "anomaly_label": cfg.anomaly_label,
            "epochs": cfg.epochs,
            # the copies whose held-out scores joined each detector's calibration (0: its own tenth alone)
            "calibration_replicas": calibration_replicas(cfg.calibration_replicas, int(normal_mask.sum())),
            "weights": cfg.weights,
            "params": {k: dict(v) for k, v in cfg.params.items()},
        },
    )
    version = bundle.save(cfg.out, so)
    write_training_report(cfg.out, bundle, x_normal, ts.skipped, so)
    log(
        f"wrote bundle {version} to {cfg.out} ({len(ts.skipped)} unreadable images skipped"
        f"{', listed in training/skipped.json' if ts.skipped else ''})"
    )
    return bundle


def _learns_labels(labels: Sequence[str | None]) -> bool:
    """Whether the CAM learns the labels (two or more, on every image), not normal vs self-made defects."""
    return len({lbl for lbl in labels if lbl is not None}) >= 2 and all(lbl is not None for lbl in labels)


def check_params(params: Mapping[str, Mapping[str, Any]]) -> None:
    """Every overridden hyper-parameter must exist in its detector's constructor."""
    for name, overrides in params.items():
        allowed = DETECTORS[name]._param_names()
        unknown = sorted(set(overrides) - set(allowed))
        if unknown:
            raise ValueError(f"--param {name}.{unknown[0]}: {name} has no such parameter; it has {allowed}.")


def fetch_weights(uri: str | None, tmp: str, storage_options: StorageOptions | None) -> str | None:
    """Copy a weights file from any fsspec URI into ``tmp``: Keras loads weights from a local path."""
    if uri is None:
        return None
    path = os.path.join(tmp, uri.rstrip("/").rsplit("/", 1)[-1])
    try:
        data = read_bytes(uri, storage_options)
    except StorageError as e:
        raise StorageError(f"--weights: {e}") from e
    with open(path, "wb") as f:
        f.write(data)
    return path


def fit_detectors(
    cfg: TrainConfig,
    x_all: np.ndarray,
    labels: Sequence[str | None],
    normal_mask: np.ndarray,
    channels: int,
    *,
    weights_path: str | None = None,
    verbose: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, BaseDetector], dict[str, float]]:
    """Build and fit ``cfg.detectors`` on uint8 images (n, s, s, c) -> (detectors, fit seconds).

    The one place where defaults become detectors (``imgscan train`` and
    ``bench/accuracy.py`` both call it, so the benchmark measures what users
    get). The autoencoder, mixture and baseline learn ``x_all[normal_mask]``;
    the CAM classifier learns every label, or normal vs self-made defects when
    there are fewer than two. ``weights_path`` is the local copy of ``cfg.weights``.
    On a small training set each detector's calibration then pools the held-out
    scores of replicas (``calibration_replicas``; the seconds include them).
    """
    fitted, seconds = _fit_each(
        cfg, x_all, labels, normal_mask, channels, weights_path=weights_path, verbose=verbose, progress=progress
    )
    replicas = calibration_replicas(cfg.calibration_replicas, int(normal_mask.sum()))
    if replicas:
        t0 = time.monotonic()
        pooled = {
            name: {c: [np.asarray(s["sample"])] for c, s in det.calibration_.items()} for name, det in fitted.items()
        }
        for r in range(1, replicas + 1):
            if progress:
                progress(f"calibration replica {r} of {replicas} (seed {cfg.seed + r}) ...")
            copies, _ = _fit_each(
                replace(cfg, seed=cfg.seed + r), x_all, labels, normal_mask, channels, weights_path=weights_path
            )
            for name, det in copies.items():
                own = fitted[name]
                images = x_all if _learns_every_label(det, labels) else x_all[normal_mask]  # what it was fitted on
                held = aligned_to(own, det, images)
                own_held = {c: np.asarray(s["sample"]) for c, s in own.calibration_.items()}
                if held is None or not same_scale(own_held, held, own.anomaly_columns_ or ()):
                    if progress:
                        progress(f"{name}: replica {r}'s held-out scores stay off the model's scale; not pooled")
                    continue
                for c, v in held.items():
                    pooled[name].setdefault(c, []).append(v)
        for name, det in fitted.items():
            det.calibrate({c: np.concatenate(v) for c, v in pooled[name].items()})
        share = (time.monotonic() - t0) / len(fitted)
        seconds = {name: s + share for name, s in seconds.items()}
        if progress:
            progress(f"pooled the held-out scores of {replicas} replicas in {time.monotonic() - t0:.1f}s")
    return fitted, seconds


#: fewest images both a model and its replica trained on, from which the replica's scale is read
MIN_SHARED = 10
#: the quantile, on a column's anomalous side, whose distance from the median is the spread that is matched
SPREAD_QUANTILE = 0.9


#: an aligned replica's held-out scores join the calibration only if a two-sample KS test of them
#: against the model's own, per declared column, has a p-value at least this (``calibration_replicas``)
SAME_SCALE_P = 0.05


def same_scale(own: Mapping[str, np.ndarray], replica: Mapping[str, np.ndarray], columns: Sequence[str]) -> bool:
    """Whether a replica's held-out scores look drawn from the same distribution as the model's
    own on every declared column (two-sample KS, ``SAME_SCALE_P``)."""
    from scipy.stats import ks_2samp

    for c in columns:
        a, b = np.asarray(own[c]), np.asarray(replica.get(c, ()))
        if b.size < 2 or ks_2samp(a, b).pvalue < SAME_SCALE_P:
            return False
    return True


def _learns_every_label(det: BaseDetector, labels: Sequence[str | None]) -> TypeGuard[CamDetector]:
    """Whether ``det`` is fitted on every image with its label (a CAM on a labelled set); the
    other detectors, and a CAM with one label, learn the normal images alone."""
    return isinstance(det, CamDetector) and _learns_labels(labels)


def aligned_to(own: BaseDetector, replica: BaseDetector, images: np.ndarray) -> dict[str, np.ndarray] | None:
    """A replica's held-out scores on the model's scale -> column -> float64 (m,), or None when
    they cannot be put there (too few shared images, or a column without spread).

    A replica is another model, and its scores are on its own scale (an OCSVM's offset, a
    CAM's confidence move with the seed). Both models score the ``images`` both trained
    on (the detector's training images less its own held-out tenth and the replica's):
    the same images, each model's in-sample scores. Per column, the replica's
    held-out scores are then moved and stretched so that the median of those paired
    scores, and their spread on the anomalous side (median to the ``SPREAD_QUANTILE``
    quantile, or to 1 - it for a low-side column), match the model's.
    """
    n = len(images)
    own_train, _ = split_validation(n, own.validation_fraction, own.seed)  # type: ignore[attr-defined]
    rep_train, _ = split_validation(n, replica.validation_fraction, replica.seed)  # type: ignore[attr-defined]
    shared = np.intersect1d(own_train, rep_train)
    if len(shared) < MIN_SHARED:
        return None
    a, b = own.score(images[shared]), replica.score(images[shared])
    out: dict[str, np.ndarray] = {}
    for c, stats in replica.calibration_.items():
        side = SPREAD_QUANTILE if DIRECTIONS[c] == "high" else 1.0 - SPREAD_QUANTILE
        qa = np.nanquantile(np.asarray(a[c], np.float64), [0.5, side])
        qb = np.nanquantile(np.asarray(b[c], np.float64), [0.5, side])
        spread_a, spread_b = qa[1] - qa[0], qb[1] - qb[0]
        if not (np.isfinite(spread_a) and np.isfinite(spread_b)) or spread_a * spread_b <= 0:
            return None
        out[c] = qa[0] + (np.asarray(stats["sample"], np.float64) - qb[0]) * (spread_a / spread_b)
    return out


def calibration_replicas(replicas: int, n_normal: int) -> int:
    """How many more copies of each detector lend their held-out scores to its calibration (0: none).

    A detector reads its tail probabilities from the scores of the normal images it held
    out: a tenth of them. On a small set that is a dozen scores (one digit of
    ``load_digits``: 12), and a tail read from 12 scores lets a heavy-tailed weak column
    put a normal image at p ~ 2e-3, above anomalies only the strong column sees
    (``bench/fusion_rules.py DIR --why 3``). Each replica is the same detector trained
    the same way with another seed (another held-out tenth, another initialisation);
    its held-out scores are as exchangeable with a new image's score as the model's own
    (the same training size: scores such as a mixture's log-likelihood move with it, so
    folds of another size would not do). Only below ``REPLICATE_BELOW`` normal images
    (above it the tenth is already >= 100 scores, and each replica costs one more fit)
    and from ``MIN_REPLICATE`` (fewer: no tenth is held out at all).

    Not the default (``--calibration-replicas 0``): on ``bench/accuracy.py --jobs 2
    --calibration-replicas 2`` (2026-12-06, one vote per column) the digits' fused AUROC
    rose 0.9939 -> 0.9973 but the texture crops' fell 0.851 -> 0.825 (ihc blur 0.778 ->
    0.640, page blur 0.699 -> 0.606, ihc hole 0.948 -> 0.879; every single column
    unchanged); with one vote per detector (2026-12-07, the same command with ``--keep``,
    3041 s) 0.9916 -> 0.9966 and 0.855 -> 0.828. Why, traced with ``bench/fusion_rules.py
    DIR --calibration-from R2 --for DETECTOR`` (one detector's calibration pooled, the
    others' not; texture / digits from 0.8548 / 0.9916): CAM 0.8366 / 0.9909, OCSVM 0.8485
    / 0.9920, autoencoder 0.8539 / 0.9906, mixture 0.8531 / 0.9960, whitening 0.8555 /
    0.9937. The premise above fails for some detectors: a replica is another model, and
    its scores are on its own scale. Under the pooled calibration the share of normal test
    crops at p < 0.01 went 0% -> 20% for ``ocsvm_score`` on page (an OCSVM's offset moves
    with its training subset) and 3% -> 29% for ``cam_anomaly`` on gravel, while the CAM on
    page went 30% -> 0% (and its anomalies with it); the texture crops are off without
    replicas too (per column 3-89% of the normal test crops at p < 0.1), so a replica's
    shift of a column's scale decides which columns raise false alarms. Since 2026-12-07
    a replica's held-out scores are first brought to the model's scale (``aligned_to``:
    both score the images both trained on, and per column the replica's median and
    anomalous-side spread are matched to the model's), then pooled only if they pass
    ``same_scale`` (a two-sample KS test against the model's own, every declared column,
    p >= ``SAME_SCALE_P``). Fused AUROC with one vote per detector, without replicas /
    pooled as they came / KS test only / aligned only / aligned then KS test, all with
    ``bench/accuracy.py FLAGS --calibration-replicas 2 --keep DIR`` and
    ``bench/fusion_rules.py DIR --rules current``: digits (``--only digits``) 0.9916 /
    0.9966 / 0.9955 / 0.9964 / 0.9966; aligned archives (``--only texture --archives
    aligned-digit1 aligned-digit3 aligned-digit8 --jobs 2``) 0.9492 / - / 0.9643 / 0.9662
    / 0.9649; page and gravel (``--only texture --archives page gravel --jobs 2``, the
    two archives replicas cost most, 10 cells) 0.8328 / 0.7917 / 0.8260 / 0.8187 /
    0.8186; brick, grass and ihc (15 cells) 0.8695 without, 0.8697 aligned then tested.
    On page and gravel it is the OCSVM's replicas that cost (one detector's calibration
    pooled at a time, ``bench/fusion_rules.py NONE --calibration-from DIR
    --for DETECTOR`` on a run without replicas: OCSVM 0.8192, CAM 0.8279, others
    0.8320-0.8331): an OCSVM scores its own training images near its boundary, which does
    not show how far its held-out scores spread (normal crops at ``ocsvm_score`` p < 0.01:
    0% -> 13.5%). Still opt-in: R more fits per detector, a gain only on aligned objects
    (the whole texture table 0.8548 -> 0.8493; the held-out archives 0.8500 -> 0.8575).
    """
    if replicas < 1 or not MIN_REPLICATE <= n_normal < REPLICATE_BELOW:
        return 0
    return replicas


def _fit_each(
    cfg: TrainConfig,
    x_all: np.ndarray,
    labels: Sequence[str | None],
    normal_mask: np.ndarray,
    channels: int,
    *,
    weights_path: str | None = None,
    verbose: int = 0,
    progress: Callable[[str], None] | None = None,
) -> tuple[dict[str, BaseDetector], dict[str, float]]:
    x_normal = x_all[normal_mask]
    common: dict[str, Any] = {"input_size": cfg.image_size, "channels": channels, "seed": cfg.seed}
    have_labels = _learns_labels(labels)
    defaults: dict[str, dict[str, Any]] = {
        "autoencoder": {**common, "epochs": cfg.epochs, "variational": cfg.variational},
        "mixture": {**common, "backbone": cfg.backbone, "weights": weights_path},
        "cam": {
            **common,
            "epochs": cfg.epochs,
            "backbone": cfg.cam_backbone,
            "weights": weights_path if cfg.cam_backbone != "small" else None,
            "anomaly_class": cfg.anomaly_label if have_labels else None,
        },
        "ocsvm": {"input_size": cfg.image_size, "seed": cfg.seed},
        "whitening": common,
    }
    check_params(cfg.params)  # all of them before anything trains
    fitted: dict[str, BaseDetector] = {}
    seconds: dict[str, float] = {}
    for name, cls in DETECTORS.items():  # the registry's order: the mixture reuses the autoencoder
        if name not in cfg.detectors:
            continue
        t0 = time.monotonic()
        if progress:
            progress(f"training {name} ...")
        det = cls(**{**defaults[name], **cfg.params.get(name, {})})
        if isinstance(det, MixtureDetector):
            ae = fitted.get("autoencoder")
            encoder = (
                ae.encoder_model() if isinstance(ae, AutoencoderDetector) and det.backbone == "autoencoder" else None
            )
            det.fit(x_normal, encoder=encoder, verbose=verbose)
        elif _learns_every_label(det, labels):
            det.fit(x_all, [str(lbl) for lbl in labels], verbose=verbose)
        elif isinstance(det, AutoencoderDetector | CamDetector | OcsvmDetector | WhiteningDetector):
            det.fit(x_normal, verbose=verbose)
        if cfg.weights is not None and getattr(det, "weights", None) == weights_path:
            det.weights = cfg.weights  # type: ignore[attr-defined]  # record the URI, not the temp copy
        fitted[name] = det
        seconds[name] = time.monotonic() - t0
        if progress:
            progress(f"trained {name} in {seconds[name]:.1f}s")
    return fitted, seconds


def write_training_report(
    out: str,
    bundle: ModelBundle,
    x_normal: np.ndarray,
    skipped: Sequence[dict[str, str | None]],
    storage_options: StorageOptions | None,
) -> None:
    """What a person checks before trusting a model: curves and reconstructions."""
    curves = {
        name: getattr(det, "history_", {}) for name, det in bundle.detectors.items() if getattr(det, "history_", None)
    }
    write_json(join(out, "training", "curves.json"), curves, storage_options)
    write_json(join(out, "training", "skipped.json"), list(skipped), storage_options)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
        for ax, (name, hist) in zip(axes[0], curves.items(), strict=True):
            for key in ("loss", "val_loss"):
                if key in hist:
                    ax.plot(range(1, len(hist[key]) + 1), hist[key], label=key)
            ax.set_title(f"{name}: loss per epoch")
            ax.set_xlabel("epoch")
            ax.set_yscale("log")
            ax.legend()
        write_bytes(join(out, "training", "curves.png"), _png(fig, plt), storage_options)
    ae = bundle.detectors.get("autoencoder")
    if isinstance(ae, AutoencoderDetector):
        k = min(8, len(x_normal))
        rng = np.random.default_rng(0)
        sample = x_normal[rng.choice(len(x_normal), k, replace=False)]
        recon = ae.reconstruct(sample)
        fig, axes = plt.subplots(2, k, figsize=(1.3 * k, 2.8), squeeze=False)
        cmap = "gray" if sample.shape[-1] == 1 else None
        for i in range(k):
            axes[0][i].imshow(sample[i].squeeze(), cmap=cmap, vmin=0, vmax=255)
            axes[1][i].imshow(recon[i].squeeze(), cmap=cmap, vmin=0, vmax=1)
            axes[0][i].axis("off")
            axes[1][i].axis("off")
        axes[0][0].set_title("original", fontsize=8, loc="left")
        axes[1][0].set_title("reconstruction", fontsize=8, loc="left")
        write_bytes(join(out, "training", "reconstructions.png"), _png(fig, plt), storage_options)
    write_json(join(out, "training", "calibration.json"), bundle.calibration, storage_options)


def _png(fig: Any, plt: Any) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
