"""The whitening detector on colour archives: the colour basis against whitening each RGB channel.

    PYTHONPATH=. python bench/colour.py

A measurement, never a detector; the accuracy bench (``bench/accuracy.py``) is grey. Four
colour images scikit-image ships (the ihc slide, the retina, the Hubble deep field, the cat:
none of them the photos the patches come from) give 64x64 colour crops: 300 of the top half
to train ``detectors.whitening.WhiteningDetector(channels=3)``, 100 of the bottom half to
test, and a copy of each with one colour defect pasted here (8-24 px): ``hue stain`` (a soft
shift of one channel), ``grey stain`` (of all three), ``hole`` (a disk of one random colour),
``scratch`` (a 1-px line of a random colour), ``photo`` (a patch of astronaut, coffee, chelsea
or rocket), ``blur``. Per cell the AUROC of the better declared column, for the detector as
it is (the eigenvectors of the archive's colour covariance) and with the identity basis (each
RGB channel whitened alone, as before 2026-12-03).

Measured 2026-12-03 (2 cores at load 2, 11 s): mean over the 24 cells 0.765 (RGB) -> 0.787
(colour basis). Holes, scratches and photo patches gain where the archive's colours are
narrow (cat hole 0.893 -> 0.983, cat photo 0.784 -> 0.868, ihc hole 0.979 -> 0.998); a
stain of one hue on the ihc slide 0.499 -> 0.632 and the retina 0.553 -> 0.655; blur loses
a little (ihc 0.862 -> 0.830, retina 0.618 -> 0.585: a blur takes energy from the brightness
component, and in the colour basis the minor components' energy is summed with it), and so
do Hubble photo patches (0.684 -> 0.650).

The colour basis makes the minor components count as much as brightness, and JPEG decodes
differ most in chroma: with the spectrum's floor taken per component, the DCT-scaled and
the full decode of the same colour photos moved ``white_excess`` / ``white_deficit`` by
0.26 / 0.52 of their spread (RGB: 0.05 / 0.11); with one floor for every component (what
``detectors.whitening`` does) by 0.07 / 0.12, at the same mean AUROC here (one-off check on
24 ihc crops upscaled to 800x600 JPEGs, as ``tests/test_score.py`` does with digits).
"""

from __future__ import annotations

import os
import sys

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import detectors.whitening as whitening

SIZE = 64
KINDS = ("hue stain", "grey stain", "hole", "scratch", "photo", "blur")


class RgbWhitening(whitening.WhiteningDetector):
    """Each RGB channel whitened alone (the identity colour basis)."""

    def _colour_basis(self, xb: np.ndarray) -> np.ndarray:
        return np.eye(xb.shape[3])


def crops(img: np.ndarray, rows: tuple[int, int], n: int, rng: np.random.Generator) -> np.ndarray:
    ys, xs = rng.integers(rows[0], rows[1] - SIZE, n), rng.integers(0, img.shape[1] - SIZE, n)
    return np.stack([img[y : y + SIZE, x : x + SIZE, :3] for y, x in zip(ys, xs, strict=True)])


def soft_disk(size: int, rng: np.random.Generator) -> np.ndarray:
    """float (SIZE, SIZE) in [0, 1]: a disk of ``size`` px at a random place, edge blurred by size/6
    over the whole crop (no box edge)."""
    yy, xx = np.mgrid[:SIZE, :SIZE]
    cy, cx = rng.integers(size // 2 + 1, SIZE - size // 2 - 1, 2)
    return np.asarray(ndimage.gaussian_filter((np.hypot(yy - cy, xx - cx) <= size / 2).astype(float), size / 6))


def defect(crop: np.ndarray, kind: str, rng: np.random.Generator, photos: list[np.ndarray]) -> np.ndarray:
    """One colour defect of ``kind`` in a uint8 (SIZE, SIZE, 3) crop -> uint8 (SIZE, SIZE, 3)."""
    from skimage.draw import line_aa

    x = crop.astype(float).copy()
    size = int(rng.integers(8, 25))
    if kind == "hue stain":
        x[..., rng.integers(3)] += rng.choice([-1, 1]) * rng.uniform(25, 60) * soft_disk(size, rng)
    elif kind == "grey stain":
        x += (rng.choice([-1, 1]) * rng.uniform(25, 60) * soft_disk(size, rng))[..., None]
    elif kind == "hole":
        x = np.where((soft_disk(size, rng) > 0.5)[..., None], rng.uniform(0, 255, 3), x)
    elif kind == "scratch":
        a, (cy, cx), half = rng.uniform(0, np.pi), rng.integers(12, SIZE - 12, 2), size / 2
        rr, cc, v = line_aa(
            round(cy - half * np.sin(a)),
            round(cx - half * np.cos(a)),
            round(cy + half * np.sin(a)),
            round(cx + half * np.cos(a)),
        )
        ok = (rr >= 0) & (rr < SIZE) & (cc >= 0) & (cc < SIZE)
        x[rr[ok], cc[ok]] = x[rr[ok], cc[ok]] * (1 - v[ok, None]) + rng.uniform(0, 255, 3) * v[ok, None]
    elif kind == "photo":
        p = photos[rng.integers(len(photos))]
        sy, sx = rng.integers(0, p.shape[0] - size), rng.integers(0, p.shape[1] - size)
        y0, x0 = rng.integers(0, SIZE - size, 2)
        x[y0 : y0 + size, x0 : x0 + size] = p[sy : sy + size, sx : sx + size, :3]
    elif kind == "blur":
        m = soft_disk(size, rng)[..., None]
        x = x * (1 - m) + ndimage.gaussian_filter(x, (3, 3, 0)) * m
    else:
        raise ValueError(f"Expected a kind among {list(KINDS)}. Received: {kind!r}.")
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def main() -> None:
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    archives = {
        "ihc": data.immunohistochemistry(),
        "retina": data.retina(),
        "hubble": data.hubble_deep_field(),
        "cat": data.cat(),
    }
    means: dict[str, list[float]] = {"rgb": [], "colour basis": []}
    print("| archive | detector | " + " | ".join(KINDS) + " |")
    print("|---|---|" + "---|" * len(KINDS))
    for name, img in archives.items():
        rng = np.random.default_rng(0)
        half = img.shape[0] // 2
        train, test = crops(img, (0, half), 300, rng), crops(img, (half, img.shape[0]), 100, rng)
        bad = {k: np.stack([defect(c, k, rng, photos) for c in test]) for k in KINDS}
        y = np.r_[np.zeros(len(test)), np.ones(len(test))]
        for label, cls in (("rgb", RgbWhitening), ("colour basis", whitening.WhiteningDetector)):
            det = cls(input_size=SIZE, channels=3).fit(train)
            normal = det.score(test)
            row = []
            for k in KINDS:
                odd = det.score(bad[k])
                cols = det.anomaly_columns_ or ()
                row.append(max(roc_auc_score(y, np.r_[normal[c], odd[c]]) for c in cols))
            means[label] += row
            print(f"| {name} | {label} | " + " | ".join(f"{v:.3f}" for v in row) + " |", flush=True)
    print("mean over cells: " + ", ".join(f"{k} {np.mean(v):.3f}" for k, v in means.items()))


if __name__ == "__main__":
    main()
