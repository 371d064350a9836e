"""How visible the bench's defects are to the best detector of a Gaussian texture model.

    PYTHONPATH=. python bench/gaussian_ceiling.py [--archives ...] [--defects ...]

A measurement, never a detector. Model each archive as a stationary Gaussian texture: its
64x64 training crops (``bench.accuracy.texture_set``, the full bench's draw) give the mean
grey level and the power spectrum P(f). For such a texture the best test of "this crop
carries signal d" is the whitened correlation with d, whose detectability is
d'^2 = sum_f |D(f)|^2 / P(f) (D: the 2-D DFT of d), and whose AUROC is Phi(d' / sqrt(2)).
Per cell, two numbers:

* ``known``: that AUROC for a detector told everything about each defect (place, size, shape,
  sign, amplitude): d = defect crop - its normal crop (the bench pastes into copies, so this is
  exact), low-passed by a Gaussian of ``--lowpass`` px first, so that the uint8 rounding of a
  soft stain (steps no detector can know in advance) does not count as signal. The mean over
  the cell's crops. No detector of this texture model does better;
* ``scan``: the whitened matched filter for the kind's shape (soft disks of 8-24 px for
  stain/hole/blur/photo, 1-px lines of 8-24 px at 12 angles for scratch), maximised over
  place, size and angle and taken in absolute value (sign unknown): the model's detector when
  all it knows is the family. Its AUROC against the normal crops.

Textures are not Gaussian (brick is far from it: its mortar lines are what a network sees a
stain break), so ``known`` is no bound for a detector that models more than the spectrum; it
says how much of a defect is there in the second-order statistics every detector sees first.

Measured 2026-12-03: see the README's Accuracy section.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.accuracy import ARCHIVES, CROP, DEFECTS, SEED, SIZES, texture_set

SCAN_SIZES = (8, 12, 16, 20, 24)
ANGLES = 12


def spectrum(train: np.ndarray) -> tuple[float, np.ndarray]:
    """uint8 (n, CROP, CROP) -> (mean grey level, power spectrum float64 (CROP, CROP))."""
    x = train.astype(np.float64)
    mu = float(x.mean())
    power = (np.abs(np.fft.fft2(x - mu)) ** 2).mean(axis=0)
    return mu, power + 1e-6 * power.mean()


def known_signal_auroc(normal: np.ndarray, defect: np.ndarray, power: np.ndarray, lowpass: float) -> np.ndarray:
    """Per paired crop, Phi(d'/sqrt 2) of the whitened test for d = defect - normal -> float (n,)."""
    d = defect.astype(np.float64) - normal.astype(np.float64)
    if lowpass > 0:
        d = ndimage.gaussian_filter(d, (0, lowpass, lowpass))
    dprime = np.sqrt((np.abs(np.fft.fft2(d)) ** 2 / power).sum(axis=(1, 2)))
    return np.asarray(norm.cdf(dprime / np.sqrt(2)))


def templates(kind: str) -> list[np.ndarray]:
    """The shapes the scan looks for, float64 (CROP, CROP) each, centred on pixel (0, 0)."""
    out = []
    if kind == "scratch":
        from skimage.draw import line_aa

        c = CROP // 2
        for length in (SIZES[0], (SIZES[0] + SIZES[1]) // 2, SIZES[1]):
            for a in np.linspace(0, np.pi, ANGLES, endpoint=False):
                dy, dx = (length - 1) * np.sin(a) / 2, (length - 1) * np.cos(a) / 2
                rr, cc, val = line_aa(round(c - dy), round(c - dx), round(c + dy), round(c + dx))
                t = np.zeros((CROP, CROP))
                t[rr, cc] = val
                out.append(np.roll(t, (-c, -c), (0, 1)))
        return out
    for size in SCAN_SIZES:
        r = (size - 1) / 2
        yy, xx = np.mgrid[0:size, 0:size]
        disk = ndimage.gaussian_filter(((yy - r) ** 2 + (xx - r) ** 2 <= r * r).astype(np.float64), size / 6)
        t = np.zeros((CROP, CROP))
        t[:size, :size] = disk
        out.append(np.roll(t, (-(size // 2), -(size // 2)), (0, 1)))
    return out


def scan_scores(crops: np.ndarray, mu: float, power: np.ndarray, kind: str, n_normal: int) -> np.ndarray:
    """max over templates and places of |whitened correlation| / its spread on the normal crops -> (n,)."""
    f = np.fft.fft2(crops.astype(np.float64) - mu)
    best = np.full(len(crops), -np.inf)
    m = SIZES[1] // 2  # places whose template would wrap around the crop's edge are skipped
    for t in templates(kind):
        r = np.real(np.fft.ifft2(f * np.conj(np.fft.fft2(t)) / power))[:, m : CROP - m, m : CROP - m]
        r = np.abs(r / r[:n_normal].std())
        best = np.maximum(best, r.reshape(len(crops), -1).max(axis=1))
    return best


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archives", nargs="+", default=list(ARCHIVES), choices=ARCHIVES)
    p.add_argument("--defects", nargs="+", default=list(DEFECTS), choices=DEFECTS)
    p.add_argument("--lowpass", type=float, default=1.5, help="px; 0 counts the rounding steps as signal too")
    p.add_argument("--train", type=int, default=300)
    p.add_argument("--test", type=int, default=100)
    args = p.parse_args(argv)
    lines = [
        f"| archive | defect | known (lowpass {args.lowpass:g} px) | known (no lowpass) | scan |",
        "|---|---|---|---|---|",
    ]
    for a in args.archives:
        ts = texture_set(a, args.defects, args.train, args.test, SEED)
        mu, power = spectrum(ts.train)
        normal = ts.test[ts.kind == ""]
        for k in args.defects:
            defect = ts.test[ts.kind == k]
            known = known_signal_auroc(normal, defect, power, args.lowpass).mean()
            raw = known_signal_auroc(normal, defect, power, 0.0).mean()
            s = scan_scores(np.concatenate([normal, defect]), mu, power, k, len(normal))
            y = np.r_[np.zeros(len(normal)), np.ones(len(defect))]
            lines.append(f"| {a} | {k} | {known:.3f} | {raw:.3f} | {roc_auc_score(y, s):.3f} |")
            print(lines[-1], flush=True)
    os.makedirs("bench/out", exist_ok=True)
    with open("bench/out/gaussian_ceiling.md", "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
