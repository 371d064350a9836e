"""Decode image bytes into uint8 arrays; a bad image becomes a reason, not a crash.

JPEGs can be decoded at the size a model needs: libjpeg scales in the DCT domain
(1/2, 1/4, 1/8) for a fraction of the work of a full decode, so a camera photo
bound for a 64 px model is never decoded at 12 megapixels.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# A decompression bomb is refused above this many pixels (PIL's default is 89M
# with only a warning below 2x that; we make any excess an error row).
MAX_PIXELS = 64_000_000
# PIL's own bomb check (2 x 89M pixels, an exception raised inside Image.open) would overrule
# --max-pixels above it and word the refusal its own way: the limit is ours, checked below
# from the header, before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None
#: an input file larger than this is refused unread (an image row with status "error"):
#: the biggest camera raws and 16-bit TIFF scans are ~200 MB; an archive member of 10 GB
#: must not be pulled into a decode task's memory
MAX_BYTES = 256 * 1024 * 1024

#: a JPEG decoded for a model of input size s keeps at least this many times s pixels on its
#: short side: the antialiased resize that follows then averages over >= 2 source pixels per
#: output pixel, as it does after a full decode, so the scores barely move (bench/photos.py)
DRAFT_MARGIN = 2


@dataclass(frozen=True)
class Decoded:
    """One decoded image: ``pixels`` uint8 (h, w, c) with c in {1, 3}, or an error.

    ``width`` / ``height`` are the stored image's full size (EXIF orientation applied),
    also when ``pixels`` were decoded at a reduced scale.
    """

    pixels: np.ndarray | None
    width: int | None
    height: int | None
    error: str | None


def check_limits(max_pixels: int, max_bytes: int) -> None:
    """Refuse per-image limits that no image could meet (flags ``--max-pixels``/``--max-bytes``)."""
    for flag, value in (("--max-pixels", max_pixels), ("--max-bytes", max_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be a whole number >= 1. Received: {value!r}.")


def too_large(n_bytes: int | None, max_bytes: int) -> str:
    """The reason of an input refused for its size in bytes (None: not read to its end)."""
    if n_bytes is None:
        return f"file too large: over the limit of {max_bytes} bytes (--max-bytes)"
    return f"file too large: {n_bytes} bytes exceeds the limit of {max_bytes} bytes (--max-bytes)"


def decode_image(
    data: bytes | None,
    *,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
    min_size: int | None = None,
    gray: bool = False,
) -> Decoded:
    """Bytes of any format PIL opens -> uint8 pixels, EXIF orientation applied.

    Gray, RGB, RGBA (alpha dropped), palette, 16-bit, CMYK and the rest are
    converted to gray ("L") or RGB. Never raises for bad data: the reason is in
    ``error`` (zero bytes, truncated, not an image, over ``max_bytes`` bytes, over
    ``max_pixels`` pixels; that limit is checked on the size the header announces,
    before any decoding).

    ``min_size``: a JPEG is decoded at the smallest DCT scale (1, 1/2, 1/4, 1/8) that
    leaves at least ``min_size`` pixels on its short side (its pixels are then smaller
    than ``width`` x ``height``); None decodes every image whole. ``gray``: a colour JPEG
    may be decoded as its luma plane only (c = 1), for a gray model. Other formats are
    decoded whole whatever these say.
    """
    if data is None or len(data) == 0:
        return Decoded(None, None, None, "empty file (0 bytes)")
    if len(data) > max_bytes:
        return Decoded(None, None, None, too_large(len(data), max_bytes))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as opened:
                w, h = opened.size  # from the header: nothing is decoded yet
                if w * h > max_pixels:
                    return Decoded(
                        None, w, h, f"image too large: {w}x{h} pixels exceeds the limit of {max_pixels} (--max-pixels)"
                    )
                if min_size is not None and opened.format == "JPEG":
                    # draft asks for the smallest scale whose size is >= the size given, on both
                    # sides: a square request bounds the short side whatever the orientation
                    opened.draft("L" if gray else "RGB", (min_size, min_size))
                stored = opened.size
                im = ImageOps.exif_transpose(opened)
                im.load()
                if im.size != stored:  # orientation 5..8 swaps the sides (a draft scale does not)
                    w, h = h, w
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
