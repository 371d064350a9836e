"""Accuracy of the imgscan detectors beside the baselines a user would try first.

    PYTHONPATH=. python bench/accuracy.py [--quick] [--only digits|texture] [--params JSON] [--seed N]

Two real-image benchmarks, every number from one run on the same seeded splits:

* **digits** (``sklearn.datasets.load_digits`` upscaled to 32x32), one-vs-rest: for
  each digit, train on 70% of it; test on its other 30% (normal) plus 30% of
  every other digit (anomalous). Image AUROC per digit and the mean.
* **texture**: 64x64 crops of ``skimage.data.brick()``; normal = crops of the
  top half; test = crops of the bottom half, half of them with a 16x16 patch of
  ``skimage.data.gravel()`` pasted at a random place. Gravel is never seen in
  training. Image AUROC, and localization: how often a detector's peak
  (fractions of height/width) falls inside the pasted patch.

The imgscan detectors are built and fitted by ``jobs.train.fit_detectors``, as
``imgscan train`` does, with its defaults; only the image size is the one that
fits the data (32 for digits, 64 for the 64x64 crops). Baselines on raw pixels:
IsolationForest, kNN distance (mean distance to the 5 nearest training images),
GaussianMixture on PCA(32); and HOG + OneClassSVM (imgscan's ``ocsvm``).

The table is printed and written to ``bench/out/accuracy.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from sklearn.decomposition import PCA
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score
from sklearn.mixture import GaussianMixture
from sklearn.neighbors import NearestNeighbors
from sklearn.pipeline import make_pipeline

from detectors import BaseDetector
from jobs.train import TrainConfig, fit_detectors

SEED = 0
TEXTURE_CROP = 64
PATCH = 16
# (detector, peak-y column, peak-x column) whose peaks are checked against the pasted patch
PEAKS = (
    ("cam", "cam_peak_y", "cam_peak_x"),
    ("autoencoder", "recon_peak_y", "recon_peak_x"),
    ("mixture", "gmm_peak_y", "gmm_peak_x"),
)


def log(msg: str) -> None:
    print(f"[accuracy] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- detectors
@dataclass
class Fitted:
    detectors: dict[str, BaseDetector]
    fit_seconds: dict[str, float] = field(default_factory=dict)


def fit_imgscan(x: np.ndarray, *, image_size: int, params: dict[str, dict[str, Any]], seed: int = SEED) -> Fitted:
    """Fit the four detectors on normal uint8 images (n, s, s) with ``jobs.train.fit_detectors``,
    the function ``imgscan train`` uses, and its defaults (one label: the CAM learns normal vs
    self-made defects; the mixture reuses the autoencoder's encoder). ``params`` overrides
    hyper-parameters per detector, as ``imgscan train --param`` does."""
    cfg = TrainConfig(source="<bench>", out="<bench>", image_size=image_size, channels=1, seed=seed, params=params)
    fitted, seconds = fit_detectors(cfg, x[..., None], [None] * len(x), np.ones(len(x), bool), channels=1)
    return Fitted(fitted, seconds)


def score_imgscan(fitted: Fitted, x: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    return {name: det.score(x) for name, det in fitted.detectors.items()}


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


def evaluate(
    fitted: Fitted, x_train: np.ndarray, x_test: np.ndarray, y: np.ndarray
) -> tuple[dict[str, float], dict[str, dict[str, np.ndarray]]]:
    """AUROC of every directed imgscan column and every baseline -> ({row: auroc}, raw scores)."""
    scores = score_imgscan(fitted, x_test)
    res: dict[str, float] = {}
    for name, col, direction in directed_columns(fitted):
        label = "HOG + OneClassSVM (ocsvm_score)" if name == "ocsvm" else f"{name}.{col}"
        res[label] = auroc(y, scores[name][col], direction)
    for label, s in pixel_baselines(x_train, x_test).items():
        res[label] = auroc(y, s, "high")
    return res, scores


BASELINE_ROWS = (
    "IsolationForest(pixels)",
    "HOG + OneClassSVM (ocsvm_score)",
    "kNN-5 distance(pixels)",
    "GMM on PCA(32)(pixels)",
)


# ---------------------------------------------------------------- digits
def digits_benchmark(
    classes: Sequence[int], params: dict[str, dict[str, Any]], seed: int = SEED
) -> tuple[dict[int, dict[str, float]], dict[str, float]]:
    from jobs.demo_data import digits

    images, labels = digits(32)
    rng = np.random.default_rng(SEED)
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
        fitted = fit_imgscan(x_train, image_size=32, params=params, seed=seed)
        per_digit[d], _ = evaluate(fitted, x_train, x_test, y)
        for k, v in fitted.fit_seconds.items():
            fit_times.setdefault(k, []).append(v)
        best = max(per_digit[d].items(), key=lambda kv: -1 if np.isnan(kv[1]) else kv[1])
        log(
            f"digit {d}: {len(x_train)} train, {len(x_test)} test, best {best[0]} {best[1]:.3f}, "
            f"{time.monotonic() - t0:.0f}s"
        )
    return per_digit, {k: float(np.mean(v)) for k, v in fit_times.items()}


# ---------------------------------------------------------------- texture
@dataclass
class TextureSet:
    train: np.ndarray  # uint8 (n, 64, 64) normal crops of the top half
    test: np.ndarray  # uint8 (m, 64, 64) crops of the bottom half
    y: np.ndarray  # int (m,): 1 = gravel patch pasted
    boxes: np.ndarray  # int (m, 2): top-left (y, x) of the patch (-1 when none)


def texture_set(n_train: int, n_test: int, seed: int = SEED) -> TextureSet:
    """Brick crops; half of the test crops get a 16x16 gravel patch at a random place."""
    from skimage import data

    brick, gravel = data.brick(), data.gravel()
    rng = np.random.default_rng(seed)
    h, w = brick.shape
    half = h // 2
    c = TEXTURE_CROP

    def crops(top: int, bottom: int, n: int) -> np.ndarray:
        ys = rng.integers(top, bottom - c + 1, size=n)
        xs = rng.integers(0, w - c + 1, size=n)
        return np.stack([brick[y : y + c, x : x + c] for y, x in zip(ys, xs, strict=True)])

    train = crops(0, half, n_train)
    test = crops(half, h, n_test)
    y = np.zeros(n_test, int)
    y[rng.permutation(n_test)[: n_test // 2]] = 1
    boxes = np.full((n_test, 2), -1)
    for i in np.flatnonzero(y):
        gy, gx = rng.integers(0, gravel.shape[0] - PATCH + 1), rng.integers(0, gravel.shape[1] - PATCH + 1)
        py, px = rng.integers(0, c - PATCH + 1, size=2)
        test[i, py : py + PATCH, px : px + PATCH] = gravel[gy : gy + PATCH, gx : gx + PATCH]
        boxes[i] = (py, px)
    return TextureSet(train, test, y, boxes)


def localization(scores: dict[str, dict[str, np.ndarray]], ts: TextureSet) -> dict[str, float]:
    """Share of defect crops whose peak (fractions) lies inside the pasted patch."""
    d = ts.y == 1
    res = {}
    for name, cy, cx in PEAKS:
        py = np.asarray(scores[name][cy])[d] * TEXTURE_CROP
        px = np.asarray(scores[name][cx])[d] * TEXTURE_CROP
        by, bx = ts.boxes[d, 0], ts.boxes[d, 1]
        inside = (py >= by) & (py <= by + PATCH) & (px >= bx) & (px <= bx + PATCH)
        res[f"{name} ({cy[:-2]})"] = float(np.mean(inside))
    return res


def texture_benchmark(
    n_train: int, n_test: int, params: dict[str, dict[str, Any]], seed: int = SEED
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    ts = texture_set(n_train, n_test)
    fitted = fit_imgscan(ts.train, image_size=TEXTURE_CROP, params=params, seed=seed)
    res, scores = evaluate(fitted, ts.train, ts.test, ts.y)
    return res, localization(scores, ts), fitted.fit_seconds


# ---------------------------------------------------------------- tables
def fmt(v: float, digits: int = 3) -> str:
    return "—" if np.isnan(v) else f"{v:.{digits}f}"


def digits_table(per_digit: dict[int, dict[str, float]], fit_times: dict[str, float]) -> str:
    classes = sorted(per_digit)
    rows = list(next(iter(per_digit.values())))
    head = "| score | " + " | ".join(str(d) for d in classes) + " | **mean** | fit s |"
    lines = [head, "|" + "---|" * (len(classes) + 3)]
    for r in [r for r in rows if r not in BASELINE_ROWS] + list(BASELINE_ROWS):
        vals = [per_digit[d][r] for d in classes]
        mean = float(np.mean(vals)) if not any(np.isnan(vals)) else float("nan")
        det = "ocsvm" if r.startswith("HOG") else r.split(".")[0]
        t = f"{fit_times[det]:.1f}" if det in fit_times else ""
        tag = " (baseline)" if r in BASELINE_ROWS else ""
        lines.append(f"| {r}{tag} | " + " | ".join(fmt(v) for v in vals) + f" | **{fmt(mean, 4)}** | {t} |")
    return "\n".join(lines)


def texture_table(res: dict[str, float], loc: dict[str, float], fit_times: dict[str, float]) -> str:
    lines = ["| score | AUROC | fit s |", "|---|---|---|"]
    for r in [r for r in res if r not in BASELINE_ROWS] + list(BASELINE_ROWS):
        det = "ocsvm" if r.startswith("HOG") else r.split(".")[0]
        t = f"{fit_times[det]:.1f}" if det in fit_times else ""
        tag = " (baseline)" if r in BASELINE_ROWS else ""
        lines.append(f"| {r}{tag} | {fmt(res[r])} | {t} |")
    lines += ["", "| peak of | inside the pasted patch |", "|---|---|"]
    lines += [f"| {k} | {100 * v:.1f}% |" for k, v in loc.items()]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="3 digits and a smaller texture set (for iteration)")
    p.add_argument("--only", choices=["digits", "texture"], help="run one benchmark")
    p.add_argument("--digits", type=int, nargs="+", help="digits to run (default: all, --quick: 1 3 8)")
    p.add_argument("--params", default="{}", help='JSON overrides per detector, e.g. {"cam": {"epochs": 40}}')
    p.add_argument("--seed", type=int, default=SEED, help="seed of the imgscan detectors (the data splits stay fixed)")
    p.add_argument("--out", default="bench/out/accuracy.md")
    args = p.parse_args(argv)
    params = json.loads(args.params)
    classes = args.digits or ([1, 3, 8] if args.quick else list(range(10)))
    n_train, n_test = (200, 200) if args.quick else (400, 400)
    t0 = time.monotonic()
    parts = [f"Command: `PYTHONPATH=. python bench/accuracy.py {' '.join(sys.argv[1:] if argv is None else argv)}`"]
    if args.only in (None, "digits"):
        per_digit, ft = digits_benchmark(classes, params, args.seed)
        parts += [
            "",
            "### Digits, one-vs-rest (32x32, image AUROC; the means differ in the 4th decimal, so it is shown; "
            "fit s = mean seconds to fit one detector)",
            "",
            digits_table(per_digit, ft),
        ]
        print("\n".join(parts[-3:]), flush=True)
    if args.only in (None, "texture"):
        res, loc, ft = texture_benchmark(n_train, n_test, params, args.seed)
        parts += [
            "",
            f"### Texture defects (brick, 64x64 crops, 16x16 gravel patch; {n_train} train, {n_test} test)",
            "",
            texture_table(res, loc, ft),
        ]
        print("\n".join(parts[-3:]), flush=True)
    parts += ["", f"Total time: {time.monotonic() - t0:.0f}s"]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(parts) + "\n")
    print(parts[-1])


if __name__ == "__main__":
    main()
