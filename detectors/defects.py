"""Self-made defects for training on normal images only (CutPaste-style).

A patch cut from a random place of a normal image (possibly another one) is
pasted elsewhere, with a random flip/rotation and brightness change; or a thin
"scar" of random intensity is drawn. A classifier that tells these apart from
untouched images learns local irregularity without ever seeing a real defect.
"""

from __future__ import annotations

import numpy as np


def make_defects(
    images: np.ndarray, rng: np.random.Generator, *, min_frac: float = 0.1, max_frac: float = 0.3
) -> np.ndarray:
    """uint8 (n, s, s, c) normal images -> uint8 (n, s, s, c) images with one defect each."""
    n, s, _, c = images.shape
    out = images.copy()
    for i in range(n):
        if rng.random() < 0.75:
            ph = int(rng.integers(max(2, int(s * min_frac)), max(3, int(s * max_frac)) + 1))
            pw = int(rng.integers(max(2, int(s * min_frac)), max(3, int(s * max_frac)) + 1))
            src = images[int(rng.integers(n))]
            sy, sx = int(rng.integers(0, s - ph + 1)), int(rng.integers(0, s - pw + 1))
            patch = src[sy : sy + ph, sx : sx + pw].astype(np.float32)
            if rng.random() < 0.5:
                patch = patch[:, ::-1]
            if rng.random() < 0.5:
                patch = patch[::-1]
            patch = np.clip(patch * rng.uniform(0.7, 1.3) + rng.uniform(-30, 30), 0, 255)
        else:  # scar: a thin stripe of one colour
            ph, pw = (int(rng.integers(1, max(2, s // 16) + 1)), int(rng.integers(s // 8, s // 3 + 1)))
            if rng.random() < 0.5:
                ph, pw = pw, ph
            patch = np.broadcast_to(rng.uniform(0, 255, size=c), (ph, pw, c)).astype(np.float32)
        dy, dx = int(rng.integers(0, s - ph + 1)), int(rng.integers(0, s - pw + 1))
        out[i, dy : dy + ph, dx : dx + pw] = patch.astype(np.uint8)
    return out
