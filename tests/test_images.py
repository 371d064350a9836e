"""decode_image on every colour mode PIL opens, and on every kind of bad file (a reason, never a raise)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from jobs.images import MAX_PIXELS, Decoded, decode_image


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


# -- JPEGs decoded at the size a model needs (libjpeg's DCT scaling through PIL's draft) -------------

#: decode + resize of the fast path against the full decode, uint8 levels: DCT scaling averages
#: 8x8 blocks where the resize would average the same pixels; what differs is rounding and the
#: shape of the filters, a few levels at most on photo content
FAST_MEAN_TOL = 2.0
FAST_MAX_TOL = 40


def _photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """uint8 (height, width, 3): a real photo (scikit-image's astronaut) upscaled, with noise."""
    from skimage import data

    rng = np.random.default_rng(seed)
    big = np.asarray(Image.fromarray(data.astronaut()).resize((width, height), Image.Resampling.BICUBIC))
    return np.clip(big.astype(np.int16) + rng.integers(-6, 7, big.shape), 0, 255).astype(np.uint8)


def _jpeg(im: Image.Image, **kwargs: object) -> bytes:
    return _encode(im, "JPEG", quality=90, **kwargs)


def _model_input(d: object, size: int = 64, channels: int = 3) -> np.ndarray:
    from detectors.preprocessing import resize_uint8

    assert isinstance(d, Decoded) and d.pixels is not None, d
    return resize_uint8(d.pixels, size, channels).astype(np.int16)


def _assert_close(fast: np.ndarray, full: np.ndarray) -> None:
    diff = np.abs(fast - full)
    assert diff.mean() <= FAST_MEAN_TOL and diff.max() <= FAST_MAX_TOL, (diff.mean(), diff.max())


@pytest.mark.parametrize(
    ("kind", "kwargs"), [("baseline", {}), ("progressive", {"progressive": True}), ("4:4:4", {"subsampling": 0})]
)
def test_jpeg_fast_path_matches_full_decode(kind: str, kwargs: dict[str, object]) -> None:
    data = _jpeg(Image.fromarray(_photo(1600, 1200), "RGB"), **kwargs)
    full = decode_image(data)
    fast = decode_image(data, min_size=128)
    assert fast.error is None and fast.pixels is not None and full.pixels is not None
    # 1600x1200 -> 1/8 would leave 150 px, >= 128 on the short side: that scale is taken
    assert fast.pixels.shape == (150, 200, 3) and full.pixels.shape == (1200, 1600, 3)
    assert (fast.width, fast.height) == (full.width, full.height) == (1600, 1200)  # the stored size
    _assert_close(_model_input(fast), _model_input(full))


def test_jpeg_fast_path_keeps_twice_the_input_size() -> None:
    data = _jpeg(Image.fromarray(_photo(1000, 700), "RGB"))
    # 1/8 would leave 88 px on the short side, 1/4 leaves 175: the smallest scale >= 128
    d = decode_image(data, min_size=128)
    assert d.pixels is not None and d.pixels.shape == (175, 250, 3)


def test_jpeg_fast_path_applies_exif_orientation_after_scaling() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = _jpeg(Image.fromarray(_photo(1600, 1200), "RGB"), exif=exif)
    full = decode_image(data)
    fast = decode_image(data, min_size=128)
    assert fast.pixels is not None and full.pixels is not None
    assert full.pixels.shape == (1600, 1200, 3) and fast.pixels.shape == (200, 150, 3)
    assert (fast.width, fast.height) == (full.width, full.height) == (1200, 1600)  # displayed, full size
    _assert_close(_model_input(fast), _model_input(full))


def test_cmyk_jpeg_fast_path() -> None:
    cmyk = Image.fromarray(_photo(1200, 900), "RGB").convert("CMYK")
    data = _jpeg(cmyk)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    full = decode_image(data)
    fast = decode_image(data, min_size=64)
    assert fast.pixels is not None and fast.pixels.shape == (113, 150, 3)  # 1/8, colour converted
    assert (fast.width, fast.height) == (1200, 900)
    _assert_close(_model_input(fast, 32), _model_input(full, 32))


def test_gray_jpeg_fast_path() -> None:
    gray = Image.fromarray(_photo(1200, 900), "RGB").convert("L")
    data = _jpeg(gray)
    full = decode_image(data)
    fast = decode_image(data, min_size=64)
    assert fast.pixels is not None and fast.pixels.shape == (113, 150, 1)
    _assert_close(_model_input(fast, 32, 1), _model_input(full, 32, 1))


def test_colour_jpeg_for_a_gray_model_is_decoded_as_luma() -> None:
    data = _jpeg(Image.fromarray(_photo(1200, 900), "RGB"))
    fast = decode_image(data, min_size=64, gray=True)
    assert fast.pixels is not None and fast.pixels.shape == (113, 150, 1)
    # the JPEG's Y plane is the ITU-R 601 luma that resize_uint8 computes from RGB
    _assert_close(_model_input(fast, 32, 1), _model_input(decode_image(data), 32, 1))


def test_jpeg_smaller_than_the_input_size_is_decoded_whole() -> None:
    rgb = _photo(40, 30)
    d = decode_image(_jpeg(Image.fromarray(rgb, "RGB")), min_size=128)
    assert d.error is None and d.pixels is not None
    assert d.pixels.shape == (30, 40, 3) and (d.width, d.height) == (40, 30)
    np.testing.assert_array_equal(d.pixels, decode_image(_jpeg(Image.fromarray(rgb, "RGB"))).pixels)


def test_other_formats_ignore_the_fast_path() -> None:
    g = _ramp(120, 200)
    d = decode_image(_encode(Image.fromarray(g, "L")), min_size=16, gray=True)
    assert d.pixels is not None
    np.testing.assert_array_equal(d.pixels[:, :, 0], g)


def _jpeg_header_only(width: int, height: int) -> bytes:
    """A real small JPEG whose frame header (SOF0) is patched to announce width x height: the
    scan data is far too short for that size, so decoding it whole would be the bomb."""
    data = bytearray(_jpeg(Image.fromarray(_photo(16, 16), "RGB")))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.mark.parametrize(("width", "height"), [(10_000, 8_000), (12_000, 10_000), (40_000, 40_000)])
@pytest.mark.parametrize("min_size", [None, 128])
def test_jpeg_bomb_is_refused_from_its_header(width: int, height: int, min_size: int | None) -> None:
    d = decode_image(_jpeg_header_only(width, height), min_size=min_size)
    assert d.pixels is None and d.error is not None and d.error.startswith("image too large"), d.error
