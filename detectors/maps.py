"""Per-pixel evidence maps: local aggregation, peaks and bilinear upsampling."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def box_mean(maps: np.ndarray, window: int) -> np.ndarray:
    """Mean over a ``window`` x ``window`` square around each pixel.

    maps: float array (n, h, w) -> float32 (n, h, w), or float64 when given float64
    (log-likelihoods keep their digits). Borders are reflected so a defect at the
    edge is not diluted by zeros.
    """
    dtype = np.float64 if maps.dtype == np.float64 else np.float32
    if maps.size == 0:
        return maps.astype(dtype)
    w = max(1, min(int(window), maps.shape[1], maps.shape[2]))
    return ndimage.uniform_filter(maps.astype(dtype), size=(1, w, w), mode="reflect")


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


def grid_mean(fmaps: np.ndarray, grid: int) -> np.ndarray:
    """Average-pool feature maps over a ``grid`` x ``grid`` partition of their cells.

    fmaps: float array (n, h, w, d) -> (n, g * g * d) with g = min(grid, h, w);
    cells split as evenly as ``np.array_split`` does when h or w is not a
    multiple of g. ``grid=1`` is global average pooling.
    """
    n, h, w, d = fmaps.shape
    g = max(1, min(int(grid), h, w))
    rows = np.array_split(np.arange(h), g)
    cols = np.array_split(np.arange(w), g)
    cells = [fmaps[:, r[0] : r[-1] + 1, c[0] : c[-1] + 1].mean(axis=(1, 2)) for r in rows for c in cols]
    return np.concatenate(cells, axis=1) if n else np.zeros((0, g * g * d), fmaps.dtype)


def smoothed_peak(maps: np.ndarray, divisor: int) -> tuple[np.ndarray, np.ndarray]:
    """``peak_location`` of maps (n, h, w) after a box mean over an odd window of
    about ``h // divisor`` cells (odd, so the window stays centred on its cell).

    A coarse map's single hottest cell often sits on the rim of a defect; the
    centre of the hottest neighbourhood lands inside it more often (brick/gravel
    benchmark, 16x16 maps: mixture 87.5% -> 95% with 3 cells, CAM 87.5% -> 93% with 5).
    """
    window = (maps.shape[1] // divisor) | 1
    return peak_location(box_mean(maps, window) if window > 1 else maps)


def relative_error(errors: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """Per-pixel error relative to the error normal images show at that pixel.

    errors: float array (n, h, w); normal: float array (h, w), the mean error of
    normal images per pixel -> float32 (n, h, w) = errors / (normal + mean(normal)).
    Dividing by ``normal`` discounts the pixels an autoencoder always gets wrong
    (image borders, where the brick benchmark's raw peaks landed; the stroke
    region of digits); adding its mean keeps pixels that normal images reconstruct
    perfectly (the empty corners of digits) from turning noise into peaks.
    """
    normal = np.asarray(normal, dtype=np.float32)
    if normal.shape != errors.shape[1:]:
        raise ValueError(f"Expected a normal-error map of shape {errors.shape[1:]}. Received: {normal.shape}.")
    floor = float(normal.mean())
    if floor <= 0.0:  # every normal image reconstructed exactly: nothing to compare with
        return errors.astype(np.float32)
    return (errors / (normal + floor)).astype(np.float32)
