"""Turn user images of any size and colour mode into model input batches.

Pure numpy + Pillow: detectors call this so that ``fit`` and ``score`` accept
uint8 images of any size, gray or colour, and resize them to their input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

ImageBatch = np.ndarray | Sequence[np.ndarray]


def _to_uint8_hwc(image: np.ndarray) -> np.ndarray:
    """One image as uint8 (h, w, c) with c in {1, 3}."""
    arr = np.asarray(image)
    if arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    elif arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        raise ValueError(
            f"Expected uint8 images (values 0..255). Received: dtype={arr.dtype}. "
            "Convert with (x * 255).astype(np.uint8) for images scaled to [0, 1]."
        )
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(
            f"Expected an image of shape (h, w), (h, w, 1), (h, w, 3) or (h, w, 4). Received: shape={arr.shape}."
        )
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"Expected a non-empty image. Received: shape={arr.shape}.")
    if arr.shape[2] == 4:
        arr = arr[:, :, :3]  # alpha carries no content for these detectors
    return arr


def _convert_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    if arr.shape[2] == channels:
        return arr
    if channels == 3:
        return np.repeat(arr, 3, axis=2)
    # ITU-R 601 luma, the same weights as PIL's "L" mode.
    luma = arr[:, :, 0] * 0.299 + arr[:, :, 1] * 0.587 + arr[:, :, 2] * 0.114
    return np.round(luma).astype(np.uint8)[:, :, None]


def resize_uint8(image: np.ndarray, size: int, channels: int) -> np.ndarray:
    """Resize one image to uint8 (size, size, channels) with bilinear filtering."""
    arr = _convert_channels(_to_uint8_hwc(image), channels)
    if arr.shape[0] != size or arr.shape[1] != size:
        mode = "L" if channels == 1 else "RGB"
        pil = Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode=mode)
        arr = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR))
        if arr.ndim == 2:
            arr = arr[:, :, None]
    return arr


def to_uint8_batch(images: ImageBatch, size: int, channels: int) -> np.ndarray:
    """Images of any size/mode -> uint8 array (n, size, size, channels).

    ``images`` is a uint8 array (n, h, w) / (n, h, w, c) or a sequence of
    uint8 arrays (h, w) / (h, w, c) of possibly different sizes.
    """
    check_image_size(size)
    if channels not in (1, 3):
        raise ValueError(f"Expected channels to be 1 or 3. Received: channels={channels}.")
    if isinstance(images, np.ndarray):
        if images.ndim not in (3, 4):
            raise ValueError(
                f"Expected a batch of images of shape (n, h, w) or (n, h, w, c). Received: shape={images.shape}."
            )
        n = images.shape[0]
        if images.dtype == np.uint8 and images.ndim == 4 and images.shape[1:] == (size, size, channels):
            return images
    else:
        n = len(images)
    out = np.empty((n, size, size, channels), dtype=np.uint8)
    for i in range(n):
        out[i] = resize_uint8(images[i], size, channels)
    return out


def to_float_batch(images: ImageBatch, size: int, channels: int) -> np.ndarray:
    """Images -> float32 array (n, size, size, channels) scaled to [0, 1]."""
    return to_uint8_batch(images, size, channels).astype(np.float32) / 255.0


def check_image_size(size: int, *, multiple_of: int = 1, minimum: int = 8) -> None:
    if not isinstance(size, int | np.integer) or size < minimum or size % multiple_of:
        raise ValueError(
            f"Expected an image size that is an integer >= {minimum} and a multiple of "
            f"{multiple_of}. Received: image_size={size!r}."
        )


def check_non_empty(images: ImageBatch, what: str = "training images") -> int:
    n = len(images)
    if n == 0:
        raise ValueError(f"Expected at least one image in {what}. Received: 0 images.")
    return n
