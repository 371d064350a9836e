"""Accuracy of the imgscan detectors beside the baselines a user would try first.

    PYTHONPATH=. python bench/accuracy.py [--only digits|texture] [--archives ...] [--defects ...]
                                          [--params JSON] [--seed N] [--data-seed N] [--quick]

Two real-image benchmarks, every number from one run on the same seeded splits:

* **digits** (``sklearn.datasets.load_digits`` upscaled to 32x32), one-vs-rest: for
  each digit, train on 70% of it; test on its other 30% (normal) plus 30% of
  every other digit (anomalous). Image AUROC per digit and the mean.
* **texture**: one normal archive per image scikit-image ships that is unlike
  the others (``brick``, ``grass``, ``gravel``, the ``immunohistochemistry``
  slide as grey levels, the scanned ``page``): 64x64 crops of the white squares
  of a checkerboard of ~96 px blocks to train on, crops of the black squares to
  test (``checkerboard`` says why not two halves). Each defect kind is pasted
  into a copy of each normal test crop (paired) at
  a random place and size (8-24 px): ``photo`` (a patch of a photo that ships
  with scikit-image or scikit-learn: camera, astronaut, coffee, chelsea, rocket,
  china, flower; never an archive's texture, never trained on), ``scratch`` (a
  thin anti-aliased line at a random angle, dark or bright), ``stain`` (a soft
  blob shifting the intensity by 25-60 grey levels), ``hole`` (a flat-filled
  disk) and ``blur`` (a Gaussian blur inside a soft disk). A defect must change
  the pixels it covers by at least ``MIN_CHANGE`` grey levels on average (else it is placed
  again), so that none is invisible (a hole on blank paper). AUROC per cell:
  the archive's normal test crops against the crops of that kind. Localization:
  how often a map's peak (fractions of height/width) falls inside the defect's
  bounding box, padded by ``BOX_PAD`` px (the coarsest map's cells are 4 px wide,
  so a peak cell centred on a 1-px scratch can sit 2 px off it).

The defects here are made by this file only; the CAM's self-made training
defects (``detectors/defects.py``) are separate code that never sees these kinds'
generators or the photos, so the table measures how detection carries over.
``--archives`` also takes ``HELD_OUT_ARCHIVES`` (crops of five other images scikit-image
ships: moon, retina, coins, cell, hubble_deep_field): the same defects on archives the
tables do not show, to check a change there before it becomes a default; and
``ALIGNED_ARCHIVES`` (``aligned-digit1``, ``-digit3``, ``-digit8``: one digit at 64 px, 70% of its
images to train, the others as normal test images): the same defects on an aligned
archive, where every image shows one object in one place, not a stationary texture.

The imgscan detectors are built and fitted by ``jobs.train.fit_detectors``, as
``imgscan train`` does, with its defaults; only the image size is the one that
fits the data (32 for digits, 64 for the 64x64 crops). ``anomaly_score`` is the
fused score of ``detectors.fusion`` over the fitted detectors' columns. Baselines
on raw pixels: IsolationForest, kNN distance (mean distance to the 5 nearest
training images), GaussianMixture on PCA(32); and HOG + OneClassSVM (imgscan's
``ocsvm``).

The tables are printed and written to ``bench/out/accuracy.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from scipy import ndimage
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline

from detectors import BaseDetector
from detectors.fusion import anomaly_score
from jobs.train import TrainConfig, fit_detectors

SEED = 0
CROP = 64
SIZES = (8, 24)  # side of a defect's box, px (inclusive)
MIN_CHANGE = 8.0  # mean |change| over the pixels a defect covers, grey levels, below which it is placed again
BOX_PAD = 2
ARCHIVES = ("brick", "grass", "gravel", "ihc", "page")
#: archives the bench's tables do not show, to check a default on (``--archives``): any image
#: ``skimage.data`` ships without a download and that is not one of ``PHOTOS`` (the photo
#: defects are cut from those)
HELD_OUT_ARCHIVES = ("moon", "retina", "coins", "cell", "hubble_deep_field")
#: aligned archives (``--archives``), local defects where the texture models' premise fails: one
#: digit of ``load_digits`` at 64 px, 70% of it to train and the rest as normal test images
ALIGNED_ARCHIVES = ("aligned-digit1", "aligned-digit3", "aligned-digit8")
DEFECTS = ("photo", "scratch", "stain", "hole", "blur")
PHOTOS = ("camera", "astronaut", "coffee", "chelsea", "rocket", "china.jpg", "flower.jpg")
FUSED = "anomaly_score"
# (detector, map name, peak-y column, peak-x column)
PEAKS = (
    ("autoencoder", "recon", "recon_peak_y", "recon_peak_x"),
    ("mixture", "gmm", "gmm_peak_y", "gmm_peak_x"),
    ("cam", "cam", "cam_peak_y", "cam_peak_x"),
    ("whitening", "white", "white_peak_y", "white_peak_x"),
)
BASELINE_ROWS = (
    "IsolationForest(pixels)",
    "HOG + OneClassSVM (ocsvm_score)",
    "kNN-5 distance(pixels)",
    "GMM on PCA(32)(pixels)",
)


def log(msg: str) -> None:
    print(f"[accuracy] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- detectors
@dataclass
class Fitted:
    detectors: dict[str, BaseDetector]
    fit_seconds: dict[str, float] = field(default_factory=dict)


def fit_imgscan(
    x: np.ndarray,
    *,
    image_size: int,
    params: dict[str, dict[str, Any]],
    seed: int = SEED,
    detectors: Sequence[str] | None = None,
    calibration_replicas: int | None = None,
) -> Fitted:
    """Fit the detectors on normal uint8 images (n, s, s) with ``jobs.train.fit_detectors``,
    the function ``imgscan train`` uses, and its defaults (one label: the CAM learns normal vs
    self-made defects; the mixture reuses the autoencoder's encoder). ``params`` overrides
    hyper-parameters per detector, as ``imgscan train --param`` does; ``calibration_replicas``
    (None: the default) as ``imgscan train --calibration-replicas`` does."""
    cfg = TrainConfig(source="<bench>", out="<bench>", image_size=image_size, channels=1, seed=seed, params=params)
    if detectors:
        cfg = replace(cfg, detectors=tuple(detectors))
    if calibration_replicas is not None:
        cfg = replace(cfg, calibration_replicas=calibration_replicas)
    fitted, seconds = fit_detectors(cfg, x[..., None], [None] * len(x), np.ones(len(x), bool), channels=1)
    return Fitted(fitted, seconds)


def fused_score(fitted: Fitted, scores: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
    """``detectors.fusion.anomaly_score`` over the merged score columns -> float64 (n,)."""
    merged = {k: v for cols in scores.values() for k, v in cols.items()}
    return np.asarray(anomaly_score(list(fitted.detectors.values()), merged), dtype=np.float64)


def directed_columns(fitted: Fitted) -> list[tuple[str, str, str]]:
    """(detector, column, direction) of every score column with a direction."""
    return [
        (name, c.name, c.direction)
        for name, det in fitted.detectors.items()
        for c in det.columns
        if c.direction is not None
    ]


# ---------------------------------------------------------------- baselines (pixels)
def pixel_baselines(train: np.ndarray, test: np.ndarray) -> dict[str, np.ndarray]:
    """Anomaly scores (high = anomalous) of the pixel baselines; uint8 (n, s, s) in."""
    a = train.reshape(len(train), -1).astype(np.float64) / 255.0
    b = test.reshape(len(test), -1).astype(np.float64) / 255.0
    iso = IsolationForest(random_state=SEED).fit(a)
    nn = NearestNeighbors(n_neighbors=5).fit(a)
    pca_gmm = make_pipeline(
        PCA(n_components=min(32, len(a) - 1), random_state=SEED), GaussianMixture(random_state=SEED)
    ).fit(a)
    return {
        "IsolationForest(pixels)": -iso.score_samples(b),
        "kNN-5 distance(pixels)": nn.kneighbors(b)[0].mean(axis=1),
        "GMM on PCA(32)(pixels)": -pca_gmm.score_samples(b),
    }


def auroc(y: np.ndarray, score: np.ndarray, direction: str) -> float:
    s = np.asarray(score, dtype=np.float64)
    if not np.all(np.isfinite(s)):
        return float("nan")
    return float(roc_auc_score(y, s if direction == "high" else -s))


def all_scores(
    fitted: Fitted, x_train: np.ndarray, x_test: np.ndarray
) -> tuple[dict[str, tuple[np.ndarray, str]], dict[str, dict[str, np.ndarray]]]:
    """Every directed imgscan column, the fused score and every baseline on ``x_test``
    -> ({row: (scores (n,), direction)}, the detectors' raw columns)."""
    raw = {name: det.score(x_test) for name, det in fitted.detectors.items()}
    rows: dict[str, tuple[np.ndarray, str]] = {}
    rows[FUSED] = (fused_score(fitted, raw), "high")
    for name, col, direction in directed_columns(fitted):
        if np.all(np.isnan(np.asarray(raw[name][col], dtype=np.float64))):
            continue  # a column this configuration does not produce (ae_kl without a VAE)
        label = "HOG + OneClassSVM (ocsvm_score)" if name == "ocsvm" else f"{name}.{col}"
        rows[label] = (np.asarray(raw[name][col]), direction)
    for label, s in pixel_baselines(x_train, x_test).items():
        rows[label] = (s, "high")
    return rows, raw


def keep_scores(path: str, fitted: Fitted, raw: dict[str, dict[str, np.ndarray]], labels: np.ndarray) -> None:
    """Write what the fusion reads, to re-fuse without refitting (``bench/fusion_rules.py``):
    ``path.npz`` (``labels``: the test crops' labels as strings, and every directed raw column,
    float64 (n,)) and ``path.json`` (per detector its declared anomaly columns; per column its
    calibration statistics)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    cols = {
        col: np.asarray(raw[name][col], dtype=np.float64)
        for name, col, _ in directed_columns(fitted)
        if name in raw and col in raw[name]
    }
    arrays = {"labels": np.asarray(labels).astype(str), **cols}
    np.savez_compressed(f"{path}.npz", **arrays)  # type: ignore[arg-type]
    meta = {
        name: {"anomaly_columns": list(det.anomaly_columns_ or ()), "calibration": det.calibration_}
        for name, det in fitted.detectors.items()
    }
    with open(f"{path}.json", "w") as f:
        json.dump(meta, f)


def aurocs(rows: dict[str, tuple[np.ndarray, str]], y: np.ndarray, keep: np.ndarray | None = None) -> dict[str, float]:
    k = slice(None) if keep is None else keep
    return {r: auroc(y[k], s[k], d) for r, (s, d) in rows.items()}


def ordered(rows: Sequence[str]) -> list[str]:
    """Fused first, then imgscan's columns, then the baselines."""
    head = [r for r in rows if r == FUSED]
    mid = [r for r in rows if r != FUSED and r not in BASELINE_ROWS]
    return head + mid + [r for r in BASELINE_ROWS if r in rows]


# ---------------------------------------------------------------- digits
def digits_benchmark(
    classes: Sequence[int],
    params: dict[str, dict[str, Any]],
    seed: int = SEED,
    data_seed: int = SEED,
    detectors: Sequence[str] | None = None,
    keep: str | None = None,
    calibration_replicas: int | None = None,
) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    from jobs.demo_data import digits

    images, labels = digits(32)
    rng = np.random.default_rng(data_seed)
    is_train = np.zeros(len(images), bool)
    for d in range(10):  # one 70/30 split per class, shared by every digit's run
        idx = np.flatnonzero(labels == d)
        is_train[rng.permutation(idx)[: round(0.7 * len(idx))]] = True
    test = ~is_train
    per_digit: dict[int, dict[str, float]] = {}
    fit_times: dict[str, list[float]] = {}
    for d in classes:
        x_train = images[is_train & (labels == d)]
        x_test, y = images[test], (labels[test] != d).astype(int)
        t0 = time.monotonic()
        fitted = fit_imgscan(
            x_train,
            image_size=32,
            params=params,
            seed=seed,
            detectors=detectors,
            calibration_replicas=calibration_replicas,
        )
        rows, raw = all_scores(fitted, x_train, x_test)
        per_digit[d] = aurocs(rows, y)
        if keep:
            keep_scores(os.path.join(keep, f"digit{d}"), fitted, raw, labels[test])
        for k, v in fitted.fit_seconds.items():
            fit_times.setdefault(k, []).append(v)
        best = max(per_digit[d].items(), key=lambda kv: -1 if np.isnan(kv[1]) else kv[1])
        log(
            f"digit {d}: {len(x_train)} train, {len(x_test)} test, best {best[0]} {best[1]:.3f}, "
            f"{time.monotonic() - t0:.0f}s"
        )
    return per_digit, {k: float(np.mean(v)) for k, v in fit_times.items()}


# ---------------------------------------------------------------- texture archives
def to_grey(img: np.ndarray) -> np.ndarray:
    """uint8 (h, w) or (h, w, 3) -> uint8 (h, w) luma."""
    if img.ndim == 2:
        return img.astype(np.uint8)
    return np.round(img[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)


def archive_image(name: str) -> np.ndarray:
    """The normal image of an archive, uint8 (h, w)."""
    from skimage import data

    loaders: dict[str, Callable[[], np.ndarray]] = {
        "brick": data.brick,
        "grass": data.grass,
        "gravel": data.gravel,
        "ihc": data.immunohistochemistry,
        "page": data.page,
    }
    return to_grey(loaders[name]() if name in loaders else getattr(data, name)())


def photo_images() -> list[np.ndarray]:
    """The photos defect patches are cut from, uint8 (h, w) each."""
    from skimage import data
    from sklearn.datasets import load_sample_image

    return [to_grey(load_sample_image(p) if p.endswith(".jpg") else getattr(data, p)()) for p in PHOTOS]


def checkerboard(img: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(train blocks, test blocks) of uint8 (h, w): a grid of blocks about 1.5 crops on a side
    (at least one crop), alternating like a checkerboard between training and test.

    Not two halves: the scanned page is lit from the right (its left half is grey, its
    right half white) and has its heading at the top, so either half alone is another
    distribution than the other, and every test crop, defect or not, was out of the
    training distribution (every score, the pixel baselines too, was at chance there). A
    user's archive of normal images is sampled from the same scenes and lighting it will
    be scanned in; the checkerboard gives both sides every part of the image, and still
    no test crop overlaps a training crop.
    """
    h, w = img.shape
    side = CROP * 3 // 2
    rows = np.array_split(np.arange(h), max(1, h // side))
    cols = np.array_split(np.arange(w), max(1, w // side))
    train, test = [], []
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            (train if (i + j) % 2 == 0 else test).append(img[r[0] : r[-1] + 1, c[0] : c[-1] + 1])
    return train, test


def random_crops(blocks: Sequence[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """n random CROP x CROP crops, each inside one of the uint8 (h, w) blocks (drawn in
    proportion to the crop positions it offers) -> uint8 (n, CROP, CROP)."""
    room = np.array([(b.shape[0] - CROP + 1) * (b.shape[1] - CROP + 1) for b in blocks], dtype=np.float64)
    which = rng.choice(len(blocks), size=n, p=room / room.sum())
    out = []
    for k in which:
        b = blocks[k]
        y, x = int(rng.integers(0, b.shape[0] - CROP + 1)), int(rng.integers(0, b.shape[1] - CROP + 1))
        out.append(b[y : y + CROP, x : x + CROP])
    return np.stack(out)


def soft_disk(size: int, rng: np.random.Generator, softness: float) -> np.ndarray:
    """float32 (size, size) in [0, 1]: an ellipse with random axes filling the box,
    its edge blurred by ``softness`` px."""
    c = (size - 1) / 2
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ry, rx = c * rng.uniform(0.7, 1.0), c * rng.uniform(0.7, 1.0)
    inside = (((yy - c) / max(ry, 0.5)) ** 2 + ((xx - c) / max(rx, 0.5)) ** 2 <= 1.0).astype(np.float32)
    return ndimage.gaussian_filter(inside, softness) if softness > 0 else inside


def _photo(crop: np.ndarray, rng: np.random.Generator, ctx: dict[str, Any]) -> tuple[np.ndarray, tuple[int, int]]:
    h, w = (int(v) for v in rng.integers(SIZES[0], SIZES[1] + 1, size=2))
    src = ctx["photos"][int(rng.integers(len(ctx["photos"])))]
    sy, sx = int(rng.integers(0, src.shape[0] - h + 1)), int(rng.integers(0, src.shape[1] - w + 1))
    return src[sy : sy + h, sx : sx + w].astype(np.float32), (h, w)


def paste(crop: np.ndarray, kind: str, rng: np.random.Generator, ctx: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """One defect of ``kind`` in uint8 (CROP, CROP) -> (uint8 (CROP, CROP), box int (4,) y0, x0, y1, x1 inclusive)."""
    x = crop.astype(np.float32)
    out, box = x, np.zeros(4, int)
    area = np.zeros((CROP, CROP), bool)  # the pixels the defect covers
    for _ in range(50):  # placed again until it really changes the crop
        size = int(rng.integers(SIZES[0], SIZES[1] + 1))
        out = x.copy()
        if kind == "photo":
            patch, (h, w) = _photo(crop, rng, ctx)
            y0, x0 = int(rng.integers(0, CROP - h + 1)), int(rng.integers(0, CROP - w + 1))
            out[y0 : y0 + h, x0 : x0 + w] = patch
            box = np.array([y0, x0, y0 + h - 1, x0 + w - 1])
            area[:] = False
            area[y0 : y0 + h, x0 : x0 + w] = True
        elif kind == "scratch":
            from skimage.draw import line_aa

            angle = rng.uniform(0, np.pi)
            dy, dx = (size - 1) * np.sin(angle), (size - 1) * np.cos(angle)
            ys0 = rng.uniform(max(0.0, -dy), CROP - 1 - max(0.0, dy))
            xs0 = rng.uniform(max(0.0, -dx), CROP - 1 - max(0.0, dx))
            value = rng.uniform(0, 40) if rng.random() < 0.5 else rng.uniform(215, 255)
            rr, cc, val = line_aa(round(ys0), round(xs0), round(ys0 + dy), round(xs0 + dx))
            ok = (rr >= 0) & (rr < CROP) & (cc >= 0) & (cc < CROP)
            mask = np.zeros((CROP, CROP), np.float32)
            mask[rr[ok], cc[ok]] = val[ok]
            if rng.random() < 0.5:  # a 2-px scratch
                mask = ndimage.grey_dilation(mask, size=(2, 2))
            out = x * (1 - mask) + value * mask
            area = mask > 0.25
            ys, xs = np.nonzero(area)
            box = np.array([ys.min(), xs.min(), ys.max(), xs.max()])
        else:
            y0, x0 = int(rng.integers(0, CROP - size + 1)), int(rng.integers(0, CROP - size + 1))
            region = x[y0 : y0 + size, x0 : x0 + size]
            if kind == "stain":
                m = soft_disk(size, rng, softness=size / 6)
                shift = rng.uniform(25, 60) * (1 if rng.random() < 0.5 else -1)
                new = region + shift * m
            elif kind == "hole":
                m = soft_disk(size, rng, softness=0)
                new = region * (1 - m) + rng.uniform(0, 255) * m
            elif kind == "blur":
                m = soft_disk(size, rng, softness=1.0)
                blurred = ndimage.gaussian_filter(x, rng.uniform(2.0, 4.0), mode="reflect")
                new = region * (1 - m) + blurred[y0 : y0 + size, x0 : x0 + size] * m
            else:
                raise ValueError(f"Expected a defect kind among {list(DEFECTS)}. Received: {kind!r}.")
            out[y0 : y0 + size, x0 : x0 + size] = new
            box = np.array([y0, x0, y0 + size - 1, x0 + size - 1])
            area[:] = False
            area[y0 : y0 + size, x0 : x0 + size] = m > 0.5
        out = np.clip(np.round(out), 0, 255)
        if area.any() and np.abs(out - x)[area].mean() >= MIN_CHANGE:
            break
    return out.astype(np.uint8), box


@dataclass
class TextureSet:
    archive: str
    train: np.ndarray  # uint8 (n, 64, 64) normal crops of the training blocks
    test: np.ndarray  # uint8 (m, 64, 64): normal crops of the test blocks, then every kind's defect crops
    kind: np.ndarray  # object (m,): "" for normal, else the defect kind
    boxes: np.ndarray  # int (m, 4): y0, x0, y1, x1 of the defect, inclusive (-1 when none)


def aligned_split(archive: str, n_train: int, n_test: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(train, normal test) uint8 (n, CROP, CROP) of an ``ALIGNED_ARCHIVES`` digit: up to
    ``n_train`` of a random 70% of its images, and up to ``n_test`` of the others."""
    from jobs.demo_data import digits

    images, _ = digits(CROP, classes=[int(archive.rsplit("digit", 1)[1])])
    order = rng.permutation(len(images))
    cut = round(0.7 * len(images))
    return images[order[: min(cut, n_train)]], images[order[cut : cut + n_test]]


def texture_set(archive: str, kinds: Sequence[str], n_train: int, n_test: int, seed: int = SEED) -> TextureSet:
    """``n_train`` crops of the training blocks; ``n_test`` normal crops of the test blocks, and
    per defect kind a copy of each with one defect of that kind pasted."""
    rng = np.random.default_rng([seed, (ARCHIVES + HELD_OUT_ARCHIVES + ALIGNED_ARCHIVES).index(archive)])
    ctx = {"photos": photo_images()}
    if archive in ALIGNED_ARCHIVES:
        train, normal = aligned_split(archive, n_train, n_test, rng)
        n_test = len(normal)
    else:
        train_blocks, test_blocks = checkerboard(archive_image(archive))
        train = random_crops(train_blocks, n_train, rng)
        normal = random_crops(test_blocks, n_test, rng)
    parts, kind, boxes = [normal], [""] * n_test, [np.full((n_test, 4), -1)]
    for k in kinds:
        # paired: each kind is pasted into copies of the same normal test crops, so a cell's
        # AUROC compares the defect, not which crops two separate draws happened to pick
        pasted = [paste(c, k, rng, ctx) for c in normal]
        parts.append(np.stack([p[0] for p in pasted]))
        boxes.append(np.stack([p[1] for p in pasted]))
        kind += [k] * n_test
    return TextureSet(archive, train, np.concatenate(parts), np.array(kind, dtype=object), np.concatenate(boxes))


def peaks_inside(raw: dict[str, dict[str, np.ndarray]], ts: TextureSet, keep: np.ndarray) -> dict[str, float]:
    """Per map: share of the crops in ``keep`` whose peak lies in the (padded) defect box."""
    by0, bx0, by1, bx1 = (ts.boxes[keep, i] for i in range(4))
    res = {}
    for det, name, cy, cx in PEAKS:
        if det not in raw:
            continue
        py = np.asarray(raw[det][cy], dtype=np.float64)[keep] * CROP
        px = np.asarray(raw[det][cx], dtype=np.float64)[keep] * CROP
        inside = (py >= by0 - BOX_PAD) & (py <= by1 + 1 + BOX_PAD) & (px >= bx0 - BOX_PAD) & (px <= bx1 + 1 + BOX_PAD)
        res[name] = float(np.mean(inside))
    return res


ArchiveResult = tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, float], float]


def archive_benchmark(
    archive: str,
    kinds: Sequence[str],
    n_train: int,
    n_test: int,
    params: dict[str, dict[str, Any]],
    seed: int = SEED,
    data_seed: int = SEED,
    detectors: Sequence[str] | None = None,
    keep: str | None = None,
    calibration_replicas: int | None = None,
) -> ArchiveResult:
    """One archive: fit once, score its normal and defect crops
    -> ({kind: {row: AUROC}}, {kind: {map: share inside}}, fit seconds, CPU-seconds of this process)."""
    t0, cpu0 = time.monotonic(), time.process_time()
    ts = texture_set(archive, kinds, n_train, n_test, data_seed)
    fitted = fit_imgscan(
        ts.train,
        image_size=CROP,
        params=params,
        seed=seed,
        detectors=detectors,
        calibration_replicas=calibration_replicas,
    )
    rows, raw = all_scores(fitted, ts.train, ts.test)
    if keep:
        keep_scores(os.path.join(keep, archive), fitted, raw, ts.kind)
    auc, loc = {}, {}
    for k in kinds:
        cell = (ts.kind == "") | (ts.kind == k)
        auc[k] = aurocs(rows, (ts.kind == k).astype(int), cell)
        loc[k] = peaks_inside(raw, ts, ts.kind == k)
    summary = ", ".join(f"{k} {auc[k].get(FUSED, float('nan')):.3f}" for k in kinds)
    cpu = time.process_time() - cpu0
    log(f"{archive}: fused AUROC {summary}; {time.monotonic() - t0:.0f} s wall, {cpu:.0f} CPU-s")
    return auc, loc, fitted.fit_seconds, cpu


def texture_benchmark(
    archives: Sequence[str],
    kinds: Sequence[str],
    n_train: int,
    n_test: int,
    params: dict[str, dict[str, Any]],
    seed: int = SEED,
    data_seed: int = SEED,
    detectors: Sequence[str] | None = None,
    jobs: int = 1,
    meanwhile: Callable[[], None] | None = None,
    keep: str | None = None,
    calibration_replicas: int | None = None,
) -> tuple[dict[tuple[str, str], dict[str, float]], dict[tuple[str, str], dict[str, float]], dict[str, float], float]:
    """-> ({(archive, kind): {row: AUROC}}, {(archive, kind): {map: share inside}}, mean fit seconds,
    CPU-seconds of the archive processes). With ``jobs`` > 1 the archives run in that many processes
    (spawned: TensorFlow does not survive a fork), and ``meanwhile`` (the digits) runs here."""
    args = [
        (a, kinds, n_train, n_test, params, seed, data_seed, detectors, keep, calibration_replicas) for a in archives
    ]
    if jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(archive_benchmark, *a) for a in args]
            if meanwhile:
                meanwhile()
            results = [f.result() for f in futures]
    else:
        if meanwhile:
            meanwhile()
        results = [archive_benchmark(*a) for a in args]
    auc: dict[tuple[str, str], dict[str, float]] = {}
    loc: dict[tuple[str, str], dict[str, float]] = {}
    fit_times: dict[str, list[float]] = {}
    for a, (a_auc, a_loc, secs, _) in zip(archives, results, strict=True):
        for k in kinds:
            auc[a, k], loc[a, k] = a_auc[k], a_loc[k]
        for name, v in secs.items():
            fit_times.setdefault(name, []).append(v)
    cpu = float(sum(r[3] for r in results)) if jobs > 1 else 0.0  # in-process runs count in the caller's time
    return auc, loc, {k: float(np.mean(v)) for k, v in fit_times.items()}, cpu


# ---------------------------------------------------------------- tables
def fmt(v: float, digits: int = 3) -> str:
    return "—" if np.isnan(v) else f"{v:.{digits}f}"


SHORT = {
    FUSED: "**fused**",
    "autoencoder.recon_error": "recon_error",
    "autoencoder.recon_local": "recon_local",
    "mixture.gmm_loglik": "gmm_loglik",
    "mixture.gmm_local_loglik": "gmm_local",
    "cam.cam_prob": "cam_prob",
    "cam.cam_anomaly": "cam_anomaly",
    "whitening.white_excess": "white_excess",
    "whitening.white_deficit": "white_deficit",
    "HOG + OneClassSVM (ocsvm_score)": "HOG+OCSVM",
    "IsolationForest(pixels)": "IForest px",
    "kNN-5 distance(pixels)": "kNN-5 px",
    "GMM on PCA(32)(pixels)": "PCA-GMM px",
}


def _mean(vals: Sequence[float]) -> float:
    return float(np.mean(vals)) if vals and not any(np.isnan(vals)) else float("nan")


def digits_table(per_digit: dict[int, dict[str, float]], fit_times: dict[str, float]) -> str:
    classes = sorted(per_digit)
    rows = ordered(list(next(iter(per_digit.values()))))
    head = "| score | " + " | ".join(str(d) for d in classes) + " | **mean** | fit s |"
    lines = [head, "|" + "---|" * (len(classes) + 3)]
    for r in rows:
        vals = [per_digit[d][r] for d in classes]
        det = "ocsvm" if r.startswith("HOG") else r.split(".")[0]
        t = f"{fit_times[det]:.1f}" if det in fit_times else ""
        tag = " (baseline)" if r in BASELINE_ROWS else ""
        lines.append(f"| {r}{tag} | " + " | ".join(fmt(v) for v in vals) + f" | **{fmt(_mean(vals), 4)}** | {t} |")
    return "\n".join(lines)


def texture_tables(
    auc: dict[tuple[str, str], dict[str, float]],
    loc: dict[tuple[str, str], dict[str, float]],
    fit_times: dict[str, float],
) -> str:
    cells = list(auc)
    rows = ordered(list(auc[cells[0]]))
    lines = [
        "| archive | defect | " + " | ".join(SHORT.get(r, r) for r in rows) + " |",
        "|---|---|" + "---|" * len(rows),
    ]
    for a, k in cells:
        lines.append(f"| {a} | {k} | " + " | ".join(fmt(auc[a, k][r]) for r in rows) + " |")
    means = [_mean([auc[c][r] for c in cells]) for r in rows]
    lines.append("| **mean** | | " + " | ".join(f"**{fmt(m)}**" for m in means) + " |")
    maps = list(loc[cells[0]])
    if not maps:  # no detector with a map was fitted
        return "\n".join(lines)
    lines += [
        "",
        "Share of defect crops whose map peak lies inside the defect's box (padded by "
        f"{BOX_PAD} px); best = the best map of the cell.",
        "",
        "| archive | defect | " + " | ".join(maps) + " | best |",
        "|---|---|" + "---|" * (len(maps) + 1),
    ]
    for a, k in cells:
        v = [loc[a, k][m] for m in maps]
        lines.append(f"| {a} | {k} | " + " | ".join(f"{100 * x:.1f}%" for x in v) + f" | {100 * max(v):.1f}% |")
    mm = [_mean([loc[c][m] for c in cells]) for m in maps]
    lines.append("| **mean** | | " + " | ".join(f"{100 * x:.1f}%" for x in mm) + " | |")
    lines += ["", "Mean fit seconds per archive: " + ", ".join(f"{k} {v:.1f}" for k, v in fit_times.items())]
    return "\n".join(lines)


def goals(
    per_digit: dict[int, dict[str, float]] | None,
    auc: dict[tuple[str, str], dict[str, float]] | None,
    loc: dict[tuple[str, str], dict[str, float]] | None,
) -> str:
    """The issue's goals, each with the number it is judged on."""
    out = []
    if auc:
        if all(FUSED in v for v in auc.values()):
            f = [v[FUSED] for v in auc.values()]
            worst = min(auc, key=lambda c: auc[c][FUSED])
            out.append(
                f"- fused >= 0.95 in every texture cell: {'met' if min(f) >= 0.95 else 'NOT met'} "
                f"(lowest {min(f):.3f}, {worst[0]}/{worst[1]}); mean >= 0.97: "
                f"{'met' if np.mean(f) >= 0.97 else 'NOT met'} ({np.mean(f):.3f})"
            )
        else:
            out.append("- fused: detectors.fusion is not there; no fused score computed")
    if loc and all(loc.values()):
        best = {c: max(v.values()) for c, v in loc.items()}
        worst = min(best, key=lambda c: best[c])
        out.append(
            f"- best map's peak inside the defect >= 90% in every cell: "
            f"{'met' if best[worst] >= 0.9 else 'NOT met'} (lowest {100 * best[worst]:.1f}%, {worst[0]}/{worst[1]})"
        )
    if per_digit and all(FUSED in v for v in per_digit.values()):
        rows = [r for r in next(iter(per_digit.values())) if r not in BASELINE_ROWS and r != FUSED]
        means = {r: _mean([per_digit[d][r] for d in per_digit]) for r in rows}
        best_r = max(means, key=lambda r: -1.0 if np.isnan(means[r]) else means[r])
        fused = _mean([per_digit[d][FUSED] for d in per_digit])
        gap = means[best_r] - fused
        out.append(
            f"- digits: fused within 0.003 of the best single imgscan score: {'met' if gap <= 0.003 else 'NOT met'} "
            f"(fused {fused:.4f}, best {best_r} {means[best_r]:.4f})"
        )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 digits and smaller texture sets (for iteration)")
    p.add_argument("--only", choices=["digits", "texture"], help="run one benchmark")
    p.add_argument("--digits", type=int, nargs="+", help="digits to run (default: all, --quick: 1 3 8)")
    p.add_argument(
        "--archives",
        nargs="+",
        choices=ARCHIVES + HELD_OUT_ARCHIVES + ALIGNED_ARCHIVES,
        default=list(ARCHIVES),
        help=f"normal archives (the tables' are {', '.join(ARCHIVES)}; the others check defaults elsewhere)",
    )
    p.add_argument("--defects", nargs="+", choices=DEFECTS, default=list(DEFECTS), help="defect kinds")
    p.add_argument("--train", type=int, help="training crops per archive (default 300, --quick 150)")
    p.add_argument("--test", type=int, help="normal test crops, and crops per defect kind (default 100, --quick 60)")
    p.add_argument("--detectors", nargs="+", help="imgscan detectors to fit (default: all; fused is over these only)")
    p.add_argument("--params", default="{}", help='JSON overrides per detector, e.g. {"cam": {"epochs": 40}}')
    p.add_argument("--seed", type=int, default=SEED, help="seed of the imgscan detectors")
    p.add_argument(
        "--calibration-replicas", type=int, metavar="R", help="as imgscan train's (default: its default; 0: none)"
    )
    p.add_argument("--data-seed", type=int, default=SEED, help="seed of the splits, crops and defects")
    p.add_argument("--jobs", type=int, default=1, help="archives fitted in parallel processes (digits run beside)")
    p.add_argument("--out", default="bench/out/accuracy.md")
    p.add_argument(
        "--keep", metavar="DIR", help="also write each run's raw scores and calibration there (bench/fusion_rules.py)"
    )
    args = p.parse_args(argv)
    try:
        params = json.loads(args.params)
    except json.JSONDecodeError as e:
        p.error(f"--params is not JSON: {e}")
    if not isinstance(params, dict):
        p.error(f"--params must be a JSON object per detector. Received: {args.params}")
    classes = args.digits or ([1, 3, 8] if args.quick else list(range(10)))
    n_train = args.train or (150 if args.quick else 300)
    n_test = args.test or (60 if args.quick else 100)
    t0, cpu0 = time.monotonic(), time.process_time()
    parts = [f"Command: `PYTHONPATH=. python bench/accuracy.py {' '.join(sys.argv[1:] if argv is None else argv)}`"]
    per_digit: dict[int, dict[str, float]] | None = None
    auc = loc = None
    digit_parts: list[str] = []
    texture_cpu = 0.0

    def run_digits() -> None:
        nonlocal per_digit
        if args.only not in (None, "digits"):
            return
        per_digit, ft = digits_benchmark(
            classes,
            params,
            args.seed,
            args.data_seed,
            args.detectors,
            keep=args.keep,
            calibration_replicas=args.calibration_replicas,
        )
        digit_parts.extend(
            [
                "",
                "### Digits, one-vs-rest (32x32, image AUROC; the means differ in the 4th decimal, so it is shown; "
                "fit s = mean seconds to fit one detector)",
                "",
                digits_table(per_digit, ft),
            ]
        )
        print("\n".join(digit_parts[-3:]), flush=True)

    if args.only in (None, "texture"):
        auc, loc, ft, texture_cpu = texture_benchmark(
            args.archives,
            args.defects,
            n_train,
            n_test,
            params,
            args.seed,
            args.data_seed,
            args.detectors,
            jobs=args.jobs,
            meanwhile=run_digits,
            keep=args.keep,
            calibration_replicas=args.calibration_replicas,
        )
        parts += digit_parts
        parts += [
            "",
            f"### Texture defects (64x64 crops; {n_train} train per archive, {n_test} normal test crops and "
            f"{n_test} per defect kind; image AUROC of normal vs that kind)",
            "",
            texture_tables(auc, loc, ft),
        ]
        print("\n".join(parts[-3:]), flush=True)
    else:
        run_digits()
        parts += digit_parts
    parts += ["", "Goals (issue #10):", goals(per_digit, auc, loc)]
    load = os.getloadavg()
    parts += [
        "",
        f"Total: {time.monotonic() - t0:.0f} s wall, {time.process_time() - cpu0 + texture_cpu:.0f} CPU-s "
        f"(this process and the archive processes); "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
    ]
    print("\n".join(parts[-4:]), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
