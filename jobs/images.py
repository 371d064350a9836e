"""Decode image bytes into uint8 arrays; a bad image becomes a reason, not a crash."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A decompression bomb is refused above this many pixels (PIL's default is 89M
# with only a warning below 2x that; we make any excess an error row).
MAX_PIXELS = 64_000_000


@dataclass(frozen=True)
class Decoded:
    """One decoded image: ``pixels`` uint8 (h, w, c) with c in {1, 3}, or an error."""

    pixels: np.ndarray | None
    width: int | None
    height: int | None
    error: str | None


def decode_image(data: bytes | None, *, max_pixels: int = MAX_PIXELS) -> Decoded:
    """Bytes of any format PIL opens -> uint8 pixels, EXIF orientation applied.

    Gray, RGB, RGBA (alpha dropped), palette, 16-bit, CMYK and the rest are
    converted to gray ("L") or RGB. Never raises for bad data: the reason is in
    ``error`` (zero bytes, truncated, not an image, over ``max_pixels`` pixels).
    """
    if data is None or len(data) == 0:
        return Decoded(None, None, None, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                w, h = opened.size
                if w * h > max_pixels:
                    return Decoded(None, w, h, f"image too large: {w}x{h} pixels exceeds the limit of {max_pixels}")
                im = ImageOps.exif_transpose(opened)
                im.load()
                w, h = im.size
                return Decoded(_to_array(im), w, h, None)
    except UnidentifiedImageError:
        return Decoded(None, None, None, "not an image (format not recognised)")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Decoded(None, None, None, f"image too large: {e}")
    except (OSError, SyntaxError, ValueError, EOFError) as e:  # truncated / corrupt data
        return Decoded(None, None, None, f"corrupt image: {e}")
    except Exception as e:
        # Pillow's format plugins raise a zoo of other types on hostile input
        # (struct.error, IndexError, TypeError, ...): one bad file must never end a job.
        return Decoded(None, None, None, f"corrupt image: {type(e).__name__}: {e}")


def _to_array(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)[:, :, None]
    if im.mode in ("1", "L", "LA", "F"):
        im = im.convert("L")
        return np.asarray(im, dtype=np.uint8)[:, :, None]
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    return np.asarray(im.convert("RGB"), dtype=np.uint8)
