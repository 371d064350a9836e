"""Per-pixel evidence maps: local aggregation, peaks and bilinear upsampling."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def box_mean(maps: np.ndarray, window: int) -> np.ndarray:
    """Mean over a ``window`` x ``window`` square around each pixel.

    maps: float array (n, h, w) -> float32 (n, h, w). Borders are reflected so a
    defect at the edge is not diluted by zeros.
    """
    if maps.size == 0:
        return maps.astype(np.float32)
    w = max(1, min(int(window), maps.shape[1], maps.shape[2]))
    return ndimage.uniform_filter(maps.astype(np.float32), size=(1, w, w), mode="reflect")


def peak_location(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row/column of each map's maximum as fractions in [0, 1] of height/width
    (the centre of the peak cell), so they apply to the original image size.

    maps: float array (n, h, w) -> two float32 arrays (n,).
    """
    n, h, w = maps.shape
    if n == 0:
        return np.zeros(0, np.float32), np.zeros(0, np.float32)
    flat = maps.reshape(n, -1).argmax(axis=1)
    ys, xs = np.divmod(flat, w)
    return ((ys + 0.5) / h).astype(np.float32), ((xs + 0.5) / w).astype(np.float32)


def upsample(maps: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear upsampling of maps (n, h, w) or (h, w) to (…, height, width), float32.

    Pixel centres are aligned (as ``tf.image.resize(method="bilinear")``), so the
    peak of a map stays over the same part of the image.
    """
    single = maps.ndim == 2
    m = maps[None] if single else maps
    n, h, w = m.shape
    ys = (np.arange(height) + 0.5) * h / height - 0.5
    xs = (np.arange(width) + 0.5) * w / width - 0.5
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    out = (
        np.stack(
            [ndimage.map_coordinates(m[i].astype(np.float32), [yy, xx], order=1, mode="nearest") for i in range(n)]
        )
        if n
        else np.zeros((0, height, width), np.float32)
    )
    return out[0] if single else out.astype(np.float32)
