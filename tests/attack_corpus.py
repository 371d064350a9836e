"""A reproducible corpus of bad input for ``imgscan score`` (#12): every kind of broken, odd or
hostile file a large archive meets, each with the outcome the scoring job must give it.

``python tests/attack_corpus.py DIR`` writes it (same bytes every time: every random source is
seeded); ``tests/test_attack_input.py`` scores it over local disk and the S3 API.

Two sources, since a source holds either loose image files or archives:

* ``files/``: loose image files (bad images, odd modes and sizes, odd names, links, hidden files);
* ``archives/``: tar and Parquet shards (hostile member names, cut archives, nested archives,
  wrong schemas, null and mistyped cells).

``Expect`` says, per input, what its one row must be: ``ok``, or ``error`` with words of the
reason a person reads. Hidden files are not inputs (no row), by design, as in every listing.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import io
import os
import struct
import sys
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

SEED = 12
#: an input over this many bytes is refused (the job runs with ``--max-bytes MAX_BYTES``)
MAX_BYTES = 1_000_000


@dataclass(frozen=True)
class Expect:
    """The row an input must give: ``status`` "ok" or "error"; an error's reason holds ``reason``.
    ``kind`` names what is being tried (several inputs may try one kind)."""

    kind: str
    status: str
    reason: str = ""
    local_only: bool = False  # not tried on the S3 API (symlinks: an object store has none)


@functools.cache
def _digits() -> np.ndarray:
    from sklearn.datasets import load_digits

    return np.asarray(load_digits().images[:8] / 16.0 * 255.0, dtype=np.uint8)


def _digit(seed: int = 0, size: int = 48) -> np.ndarray:
    """A real digit (sklearn's), upscaled: uint8 (size, size)."""
    return np.asarray(Image.fromarray(_digits()[seed]).resize((size, size), Image.Resampling.BILINEAR))


def _save(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def huge_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` pixels over a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def huge_gif() -> bytes:
    """A GIF whose screen and only frame declare 65,535 x 65,535 pixels."""
    small = _save(Image.fromarray(_digit()).convert("P"), "GIF")
    data = bytearray(small)
    data[6:10] = struct.pack("<HH", 65535, 65535)  # logical screen
    at = data.index(b"\x2c")  # image descriptor: left, top, width, height
    data[at + 5 : at + 9] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


def huge_jpeg(side: int = 20_000) -> bytes:
    """A JPEG of ``side`` x ``side`` pixels as its SOF header declares them (the entropy data of a
    small image follows: the pixel limit must refuse it from the header, before any decoding)."""
    data = bytearray(_save(Image.fromarray(_digit()), "JPEG", quality=90))
    at = data.index(b"\xff\xc0")  # SOF0: length(2) precision(1) height(2) width(2)
    data[at + 5 : at + 9] = struct.pack(">HH", side, side)
    return bytes(data)


def _rgb() -> Image.Image:
    d = _digit()
    return Image.fromarray(np.dstack([d, d // 2, 255 - d]), "RGB")


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees on display
    return _save(Image.fromarray(_digit()[:, :30]), "JPEG", exif=exif.tobytes())


def _animated_gif() -> bytes:
    frames = [Image.fromarray(_digit(i)).convert("P") for i in range(3)]
    return _save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def _multipage_tiff() -> bytes:
    pages = [Image.fromarray(_digit(i)) for i in range(3)]
    return _save(pages[0], "TIFF", save_all=True, append_images=pages[1:])


def _palette_transparent() -> bytes:
    im = _rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _save(im, "PNG", transparency=0)


def _cut(data: bytes, fraction: float) -> bytes:
    return data[: max(1, int(len(data) * fraction))]


def _noise(h: int, w: int) -> bytes:
    rng = np.random.default_rng(SEED)  # incompressible: bytes ~ pixels
    return _save(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)), "PNG")


def file_inputs() -> dict[str, tuple[bytes, Expect]]:
    """Loose files: name -> (bytes, what its row must be)."""
    rng = np.random.default_rng(SEED)
    png = _save(Image.fromarray(_digit()), "PNG")
    jpeg = _save(_rgb(), "JPEG", quality=90)
    webp = _save(_rgb(), "WEBP", quality=80)
    tiff = _save(Image.fromarray(_digit()), "TIFF")
    corrupt = "corrupt image"
    out: dict[str, tuple[bytes, Expect]] = {
        "zero-bytes.png": (b"", Expect("zero bytes", "error", "empty file")),
        "zero-size.jpg": (b"", Expect("zero-size file", "error", "empty file")),
        "random-bytes.jpg": (rng.bytes(4096), Expect("random bytes", "error", "not an image")),
        "page.png": (
            b"<!doctype html><html><body>hello</body></html>",
            Expect("HTML as image", "error", "not an image"),
        ),
        "notes.gif": (b"just some text\n" * 20, Expect("text as image", "error", "not an image")),
        "huge-declared.png": (huge_png(), Expect("PNG declaring 100000x100000", "error", "too large")),
        "huge-declared.gif": (huge_gif(), Expect("GIF declaring 65535x65535", "error", "too large")),
        "jpeg-20000x20000.jpg": (huge_jpeg(), Expect("20000x20000 JPEG", "error", "too large")),
        "over-byte-limit.png": (_noise(1100, 1100), Expect("over --max-bytes", "error", "file too large")),
        "one-by-one.png": (_save(Image.new("L", (1, 1), 200), "PNG"), Expect("1x1", "ok")),
        "one-by-n.png": (_save(Image.fromarray(_digit()[:1]), "PNG"), Expect("1xN", "ok")),
        "n-by-one.png": (_save(Image.fromarray(_digit()[:, :1].copy()), "PNG"), Expect("Nx1", "ok")),
        "gray16.png": (_save(Image.fromarray(_digit().astype(np.uint16) * 257), "PNG"), Expect("16-bit PNG", "ok")),
        "gray16.tif": (_save(Image.fromarray(_digit().astype(np.uint16) * 257), "TIFF"), Expect("16-bit TIFF", "ok")),
        "float.tif": (_save(Image.fromarray(_digit().astype(np.float32) / 255), "TIFF"), Expect("float TIFF", "ok")),
        "cmyk.jpg": (_save(_rgb().convert("CMYK"), "JPEG"), Expect("CMYK JPEG", "ok")),
        "progressive.jpg": (_save(_rgb(), "JPEG", progressive=True), Expect("progressive JPEG", "ok")),
        "palette-transparent.png": (_palette_transparent(), Expect("palette PNG with transparency", "ok")),
        "animated.gif": (_animated_gif(), Expect("animated GIF", "ok")),
        "multipage.tif": (_multipage_tiff(), Expect("multi-page TIFF", "ok")),
        "exif-rotated.jpg": (_exif_rotated(), Expect("EXIF-rotated JPEG", "ok")),
        "rgba.webp": (_save(_rgb().convert("RGBA"), "WEBP"), Expect("WebP with alpha", "ok")),
        "garbage.bmp": (b"BM" + rng.bytes(200), Expect("BMP with a garbage header", "error", "")),
        "name with spaces.png": (png, Expect("name with spaces", "ok")),
        "ünïcødé-数字.png": (png, Expect("unicode name", "ok")),
        "hash#in#name.png": (png, Expect("# in the name", "ok")),
        "question?mark.png": (png, Expect("? in the name", "ok")),
        "100%25 percent%.png": (png, Expect("% in the name", "ok")),
        # moto's server answers 404 to a key with a newline (S3 itself takes any UTF-8): local only
        "new\nline.png": (png, Expect("newline in the name", "ok", local_only=True)),
        "brackets[1].png": (png, Expect("glob characters in the name", "ok")),
        ".hidden.png": (png, Expect("hidden file (not an input)", "none")),
    }
    for frac in (0.1, 0.5, 0.9):
        out[f"truncated-{int(frac * 100)}.jpg"] = (_cut(jpeg, frac), Expect("truncated JPEG", "error", corrupt))
        out[f"truncated-{int(frac * 100)}.png"] = (_cut(png, frac), Expect("truncated PNG", "error", ""))
    for frac in (0.3, 0.8):
        out[f"truncated-{int(frac * 100)}.webp"] = (_cut(webp, frac), Expect("truncated WebP", "error", ""))
        out[f"truncated-{int(frac * 100)}.tif"] = (_cut(tiff, frac), Expect("truncated TIFF", "error", ""))
    return out


#: symlinks (local only): name -> (target relative to the files folder or absolute, expectation)
LINKS: dict[str, tuple[str, Expect]] = {
    "link-to-image.png": ("one-by-one.png", Expect("symlink to an image", "ok", local_only=True)),
    "dangling-link.png": ("no-such-file.png", Expect("dangling symlink", "error", "read failed", local_only=True)),
}


def _tar(members: list[tuple[str, bytes | None, str | None]], *, gz: bool = False) -> bytes:
    """A tar of (name, bytes, link target): bytes None with a target is a symlink member."""
    buf = io.BytesIO()
    # gzip's header holds a time: mtime=0 keeps the bytes the same from run to run
    with (
        gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) if gz else contextlib.nullcontext(buf) as out,
        tarfile.open(fileobj=out, mode="w") as tar,
    ):
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link
                tar.addfile(info)
            else:
                info.size = len(data or b"")
                tar.addfile(info, io.BytesIO(data or b""))
    return buf.getvalue()


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


#: archive -> member (or "<unreadable>") -> expectation
ArchiveExpect = dict[str, dict[str, Expect]]


def archive_inputs() -> tuple[dict[str, bytes], ArchiveExpect]:
    """Archives: name -> bytes, and per archive the rows it must give (by member name)."""
    rng = np.random.default_rng(SEED)
    png = _save(Image.fromarray(_digit()), "PNG")
    png2 = _save(Image.fromarray(_digit(1)), "PNG")
    files: dict[str, bytes] = {}
    expect: ArchiveExpect = {}

    def add(name: str, data: bytes, rows: dict[str, Expect]) -> None:
        files[name], expect[name] = data, rows

    ok = Expect("member of a sound tar", "ok")
    add(
        "traversal.tar",
        _tar([("../../escaped.png", png, None), ("/etc/absolute.png", png2, None), ("a/../../b.png", png, None)]),
        {
            "../../escaped.png": Expect("tar member named ../", "ok"),
            "/etc/absolute.png": Expect("tar member with an absolute name", "ok"),
            "a/../../b.png": Expect("tar member climbing out of a folder", "ok"),
        },
    )
    whole = _tar([(f"s{i:03d}.png", png, None) for i in range(6)])
    with tarfile.open(fileobj=io.BytesIO(whole)) as t:
        members = t.getmembers()
    cut = members[3].offset_data + members[3].size // 2  # in the middle of the fourth image
    before = [m.name for m in members if m.offset_data + m.size <= cut]
    add(
        "cut-midway.tar",
        whole[:cut],
        {"<unreadable>": Expect("tar cut off midway", "error", "tar archive unreadable")}
        | dict.fromkeys(before, ok),  # what precedes the cut is scored
    )
    add(
        "nested.tar",
        _tar([("outer.png", png, None), ("inner.tar", _tar([("in.png", png, None)]), None)]),
        {"outer.png": ok, "inner.tar": Expect("tar inside a tar", "error", "archive inside the archive")},
    )
    add(
        "links.tar",
        _tar([("real.png", png, None), ("passwd.png", None, "/etc/passwd"), ("up.png", None, "../../x.png")]),
        {
            "real.png": ok,
            "passwd.png": Expect("tar symlink member to /etc/passwd", "error", "links are not followed"),
            "up.png": Expect("tar symlink member climbing out", "error", "links are not followed"),
        },
    )
    add(
        "repeated-names.tar",
        _tar([("x.png", png, None), ("y.cls", b"1", None), ("x.png", png2, None)]),
        {"x.png": Expect("repeated member name", "ok"), "x.png@2": Expect("repeated member name", "ok")},
    )
    gz = _tar([(f"g{i}.png", png, None) for i in range(4)], gz=True)
    add(
        "truncated.tar.gz",
        gz[: len(gz) // 2],
        {"<unreadable>": Expect("truncated tar.gz", "error", "tar archive unreadable")},
    )
    add(
        "random-bytes.tar",
        rng.bytes(3000),
        {"<unreadable>": Expect("random bytes as tar", "error", "tar archive unreadable")},
    )
    add("empty.tar", _tar([]), {})  # a sound archive with no images: no row, its shard committed empty
    add(
        "big-member.tar",
        _tar([("small.png", png, None), ("big.png", _noise(1100, 1100), None)]),
        {"small.png": ok, "big.png": Expect("tar member over --max-bytes", "error", "file too large")},
    )
    add(
        "wrong-schema.parquet",
        _parquet(pa.table({"a": [1, 2, 3], "b": ["x", "y", "z"]})),
        {"<unreadable>": Expect("Parquet with the wrong schema", "error", "no image-bytes column")},
    )
    add(
        "null-images.parquet",
        _parquet(pa.table({"id": ["p0", "p1", "p2"], "image": [png, None, png2]})),
        {
            "p0": Expect("Parquet row", "ok"),
            "p1": Expect("Parquet null image cell", "error", "is null"),
            "p2": Expect("Parquet row", "ok"),
        },
    )
    add(
        "string-images.parquet",
        _parquet(pa.table({"id": ["t0", "t1"], "image": ["not bytes", "<svg onload=alert(1)>"]})),
        {
            "t0": Expect("Parquet image column of strings", "error", "not bytes"),
            "t1": Expect("Parquet image column of strings", "error", "not bytes"),
        },
    )
    add(
        "mixed-labels.parquet",
        _parquet(
            pa.table(
                {
                    "id": ["m0", "m1", "m2", "m3"],
                    "image": [png, png2, png, png2],
                    "label": ["1", "cat", None, "3.5 <b>"],
                }
            )
        ),
        {f"m{i}": Expect("Parquet label column of mixed kinds", "ok") for i in range(4)},
    )
    add(
        "random-bytes.parquet",
        rng.bytes(2000),
        {"<unreadable>": Expect("random bytes as Parquet", "error", "parquet file unreadable")},
    )
    return files, expect


def write_corpus(root: Path, *, links: bool = True) -> None:
    """``root/files/`` and ``root/archives/``; with ``links``, the symlinks too (local disk only)."""
    (root / "files").mkdir(parents=True, exist_ok=True)
    (root / "archives").mkdir(parents=True, exist_ok=True)
    for name, (data, _) in file_inputs().items():
        (root / "files" / name).write_bytes(data)
    if links:
        for name, (target, _) in LINKS.items():
            os.symlink(target, root / "files" / name)
    for name, data in archive_inputs()[0].items():
        (root / "archives" / name).write_bytes(data)


def kinds() -> set[str]:
    """Every kind of bad input the corpus tries."""
    files = {e.kind for _, e in file_inputs().values()} | {e.kind for _, e in LINKS.values()}
    archives = {e.kind for rows in archive_inputs()[1].values() for e in rows.values()}
    return files | archives


def main(argv: list[str], write: Callable[[Path], None] = write_corpus) -> int:
    if len(argv) != 1:
        print("usage: python tests/attack_corpus.py DIR", file=sys.stderr)
        return 2
    write(Path(argv[0]))
    print(f"wrote {len(kinds())} kinds of bad input under {argv[0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
