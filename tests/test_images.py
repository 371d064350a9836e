"""decode_image on every colour mode PIL opens, and on every kind of bad file (a reason, never a raise)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from jobs.images import MAX_PIXELS, decode_image


def _encode(im: Image.Image, fmt: str = "PNG", **kwargs: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _ramp(h: int = 12, w: int = 20) -> np.ndarray:
    """uint8 (h, w): a horizontal ramp with a bright top-left corner (to see rotations)."""
    img = np.tile(np.linspace(0, 200, w).astype(np.uint8), (h, 1))
    img[:3, :3] = 255
    return img


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header announces width x height pixels but holds no pixel data: a bomb costs nothing."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_gray_keeps_values_and_one_channel() -> None:
    g = _ramp()
    d = decode_image(_encode(Image.fromarray(g, "L")))
    assert d.error is None and d.pixels is not None
    assert d.pixels.shape == (12, 20, 1) and d.pixels.dtype == np.uint8
    assert (d.width, d.height) == (20, 12)
    np.testing.assert_array_equal(d.pixels[:, :, 0], g)


def test_bilevel_becomes_gray() -> None:
    g = _ramp() > 100
    d = decode_image(_encode(Image.fromarray(g).convert("1")))
    assert d.pixels is not None and d.pixels.shape == (12, 20, 1)
    assert set(np.unique(d.pixels)) <= {0, 255}


def test_rgb_and_rgba_give_three_channels() -> None:
    rgb = np.dstack([_ramp(), 255 - _ramp(), np.full((12, 20), 7, np.uint8)])
    d = decode_image(_encode(Image.fromarray(rgb, "RGB")))
    assert d.pixels is not None
    np.testing.assert_array_equal(d.pixels, rgb)
    rgba = np.dstack([rgb, np.full((12, 20), 9, np.uint8)])  # alpha is dropped, colour kept
    d = decode_image(_encode(Image.fromarray(rgba, "RGBA")))
    assert d.pixels is not None and d.pixels.shape == (12, 20, 3)
    np.testing.assert_array_equal(d.pixels, rgb)


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_is_expanded(transparency: bool) -> None:
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:4] = (255, 0, 0)
    rgb[4:] = (0, 0, 255)
    pal = Image.fromarray(rgb, "RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    kwargs = {"transparency": 0} if transparency else {}
    d = decode_image(_encode(pal, **kwargs))
    assert d.error is None and d.pixels is not None
    assert d.pixels.shape == (8, 8, 3)
    np.testing.assert_array_equal(d.pixels[0, 0], (255, 0, 0))
    np.testing.assert_array_equal(d.pixels[7, 7], (0, 0, 255))


def test_sixteen_bit_gray_is_scaled_to_eight_bits() -> None:
    v = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    im = Image.fromarray(v)
    assert im.mode.startswith("I;16")
    d = decode_image(_encode(im))
    assert d.error is None and d.pixels is not None
    assert d.pixels.shape == (1, 4, 1)
    np.testing.assert_array_equal(d.pixels[0, :, 0], [0, 1, 128, 255])


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    data = _encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    d = decode_image(data)
    assert d.error is None and d.pixels is not None and d.pixels.shape == (16, 16, 3)
    r, g, b = d.pixels[8, 8].astype(int)
    assert r > 200 and g < 60 and b < 60


def test_exif_orientation_is_applied() -> None:
    g = _ramp(12, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _encode(Image.fromarray(g, "L"), "PNG", exif=exif)
    d = decode_image(data)
    assert d.error is None and d.pixels is not None
    assert (d.width, d.height) == (12, 20) and d.pixels.shape == (20, 12, 1)
    expected = np.asarray(Image.fromarray(g, "L").transpose(Image.Transpose.ROTATE_270))
    np.testing.assert_array_equal(d.pixels[:, :, 0], expected)
    assert d.pixels[0, -1, 0] == 255  # the bright corner moved from top-left to top-right


@pytest.mark.parametrize(
    ("width", "height"),
    [
        (10_000, 8_000),  # over our limit, under PIL's: our check
        (12_000, 10_000),  # PIL's warning range (89M..179M): made an error
        (100_000, 100_000),  # over PIL's hard limit
    ],
)
def test_decompression_bomb_is_refused_without_decoding(width: int, height: int) -> None:
    assert width * height > MAX_PIXELS
    d = decode_image(_png_header_only(width, height))
    assert d.pixels is None
    assert d.error is not None and d.error.startswith("image too large"), d.error


def test_pixel_limit_is_a_parameter() -> None:
    d = decode_image(_encode(Image.fromarray(_ramp(), "L")), max_pixels=100)
    assert d.pixels is None and d.error is not None and "exceeds the limit of 100" in d.error
    assert (d.width, d.height) == (20, 12)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty file"),
        (None, "empty file"),
        (b"this is a text file with an image extension\n", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an image"),  # a signature, then garbage
    ],
)
def test_unreadable_bytes_give_a_reason(data: bytes | None, reason: str) -> None:
    d = decode_image(data)
    assert d.pixels is None and d.error is not None
    assert d.error.startswith(reason), d.error


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_gives_a_reason(fmt: str) -> None:
    rng = np.random.default_rng(0)
    data = _encode(Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8), "L"), fmt)
    d = decode_image(data[: len(data) // 2])
    assert d.pixels is None and d.error is not None
    assert d.error.startswith("corrupt image"), d.error
