"""Real image archives built from the digits scikit-learn ships (no download).

Used by the demo, the tests and the benchmarks: the same archive in each
source format (a folder with class subfolders, WebDataset tar shards, Parquet
files with image bytes), with known anomalies and corrupt files mixed in.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from jobs.storage import StorageOptions, join, write_bytes

ANOMALY_LABEL = "anomaly"

#: name -> bytes of a file that is not a readable image, and why
CORRUPT_FILES: dict[str, bytes] = {
    "empty.png": b"",
    "not-an-image.png": b"this is a text file with an image extension\n",
}


def digits(size: int = 32, *, classes: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 8x8 digits of ``sklearn.datasets.load_digits``, upscaled to
    ``size`` (bilinear): uint8 (n, size, size) and int labels (n,)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images / 16.0 * 255.0).round().astype(np.uint8)
    keep = np.isin(d.target, classes) if classes is not None else np.ones(len(imgs), bool)
    out = np.stack(
        [np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR)) for im in imgs[keep]]
    )
    return out, d.target[keep]


def make_anomalies(images: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, list[str]]:
    """Anomalous variants of uint8 (n, s, s) digits, one per input, cycling
    through kinds: noise, inverted, blotch (a filled square), stripes."""
    n, s, _ = images.shape
    kinds = ["noise", "inverted", "blotch", "stripes"]
    out = np.empty_like(images)
    names = []
    for i in range(n):
        kind = kinds[i % len(kinds)]
        img = images[i].copy()
        if kind == "noise":
            img = rng.integers(0, 256, size=(s, s), dtype=np.uint8)
        elif kind == "inverted":
            img = 255 - img
        elif kind == "blotch":
            k = s // 3
            y, x = rng.integers(0, s - k, size=2)
            img[y : y + k, x : x + k] = 255
        else:
            img[:, :: max(2, s // 8)] = 255
        out[i] = img
        names.append(kind)
    return out, names


def png_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def truncated_png(image: np.ndarray) -> bytes:
    data = png_bytes(image)
    return data[: len(data) // 2]


@dataclass(frozen=True)
class Sample:
    key: str  # unique within the archive, no dots
    data: bytes
    label: str | None


def samples(images: np.ndarray, labels: Sequence[str | None], prefix: str = "img") -> list[Sample]:
    return [
        Sample(f"{prefix}{i:06d}", png_bytes(im), lbl) for i, (im, lbl) in enumerate(zip(images, labels, strict=True))
    ]


def corrupt_samples(image: np.ndarray, label: str | None = None) -> list[Sample]:
    """Three unreadable images: zero bytes, text, a truncated PNG."""
    return [
        Sample("corrupt-empty", CORRUPT_FILES["empty.png"], label),
        Sample("corrupt-text", CORRUPT_FILES["not-an-image.png"], label),
        Sample("corrupt-truncated", truncated_png(image), label),
    ]


def write_folder(uri: str, items: Sequence[Sample], storage_options: StorageOptions | None = None) -> None:
    """``uri/<label>/<key>.png`` (``uri/<key>.png`` when unlabelled)."""
    for s in items:
        write_bytes(join(uri, s.label or "", f"{s.key}.png"), s.data, storage_options)


def write_tar_shards(
    uri: str, items: Sequence[Sample], per_shard: int, storage_options: StorageOptions | None = None
) -> list[str]:
    """WebDataset shards ``uri/shard-000000.tar``: ``KEY.png`` + ``KEY.cls``."""
    out = []
    for n, start in enumerate(range(0, len(items), per_shard)):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for s in items[start : start + per_shard]:
                _add(tar, f"{s.key}.png", s.data)
                if s.label is not None:
                    _add(tar, f"{s.key}.cls", s.label.encode())
        shard = join(uri, f"shard-{n:06d}.tar")
        write_bytes(shard, buf.getvalue(), storage_options)
        out.append(shard)
    return out


def write_parquet_shards(
    uri: str, items: Sequence[Sample], per_shard: int, storage_options: StorageOptions | None = None
) -> list[str]:
    """Parquet files ``uri/part-000000.parquet`` with columns id, image (bytes), label."""
    out = []
    for n, start in enumerate(range(0, len(items), per_shard)):
        chunk = items[start : start + per_shard]
        table = pa.table(
            {
                "id": [s.key for s in chunk],
                "image": pa.array([s.data for s in chunk], type=pa.binary()),
                "label": [s.label for s in chunk],
            }
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        shard = join(uri, f"part-{n:06d}.parquet")
        write_bytes(shard, buf.getvalue(), storage_options)
        out.append(shard)
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@dataclass(frozen=True)
class DemoArchive:
    train_uri: str  # folder with class subfolders, clean digits
    scan_uri: str  # tar shards: held-out digits + known anomalies + corrupt files
    n_scan: int  # inputs in the scan archive (every one must yield a row)
    n_anomalies: int
    n_corrupt: int


def build_demo_archive(
    root: str,
    *,
    size: int = 32,
    n_anomalies: int = 40,
    per_shard: int = 100,
    seed: int = 0,
    storage_options: StorageOptions | None = None,
) -> DemoArchive:
    """Training folder (70% of the digits) and a scan archive (the other 30%,
    ``n_anomalies`` known anomalies labelled ``anomaly``, 3 corrupt files)."""
    rng = np.random.default_rng(seed)
    imgs, labels = digits(size)
    order = rng.permutation(len(imgs))
    n_train = int(0.7 * len(imgs))
    tr, te = order[:n_train], order[n_train:]
    train_uri, scan_uri = join(root, "train"), join(root, "scan")
    write_folder(train_uri, samples(imgs[tr], [str(v) for v in labels[tr]]), storage_options)
    anomalies, _ = make_anomalies(imgs[te[:n_anomalies]], rng)
    items = (
        samples(imgs[te], [str(v) for v in labels[te]], "digit")
        + samples(anomalies, [ANOMALY_LABEL] * len(anomalies), "anomaly")
        + corrupt_samples(imgs[te[0]])
    )
    items = [items[i] for i in rng.permutation(len(items))]
    write_tar_shards(scan_uri, items, per_shard, storage_options)
    write_bytes(
        join(root, "archive.json"), json.dumps({"train": train_uri, "scan": scan_uri}).encode(), storage_options
    )
    return DemoArchive(train_uri, scan_uri, len(items), len(anomalies), 3)
