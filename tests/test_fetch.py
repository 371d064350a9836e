"""Fetching images by image_id from every source format, locally and in memory://."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from jobs.demo_data import corrupt_samples, samples, write_folder, write_parquet_shards, write_tar_shards
from jobs.fetch import fetch_images, locate
from jobs.sources import list_shards, read_shard


def _items(digits16: tuple[np.ndarray, np.ndarray]) -> tuple[list[Any], np.ndarray]:
    imgs, labels = digits16
    imgs = imgs[:30]
    return samples(imgs, [str(v) for v in labels[:30]]) + corrupt_samples(imgs[0], "0"), imgs


def _ids(source: str) -> list[str]:
    """The image_ids the scoring job gives (jobs.sources, the same reader)."""
    return [rec.image_id for shard in list_shards(source) for rec in read_shard(shard)]


@pytest.mark.parametrize("fmt", ["folder", "tar", "parquet"])
@pytest.mark.parametrize("where", ["local", "memory"])
def test_fetch_by_image_id(
    fmt: str, where: str, tmp_path: Any, memory_root: str, digits16: tuple[np.ndarray, np.ndarray]
) -> None:
    items, imgs = _items(digits16)
    root = str(tmp_path / "src") if where == "local" else f"{memory_root}/src"
    {
        "folder": write_folder,
        "tar": lambda u, i: write_tar_shards(u, i, 12),
        "parquet": lambda u, i: write_parquet_shards(u, i, 12),
    }[fmt](root, items)
    ids = _ids(root)
    assert len(ids) == 33
    by_key = {s.key: i for i, s in enumerate(items)}
    wanted = [i for i in ids if "img000005" in i or "img000017" in i or "img000029" in i or "corrupt-text" in i]
    got = fetch_images([*wanted, wanted[0]], None)
    assert set(got) == set(wanted)
    for image_id, f in got.items():
        key = next(k for k in by_key if k in image_id)
        if key.startswith("corrupt"):
            assert f.pixels is None and f.error == "not an image (format not recognised)"
        else:
            assert f.error is None and f.pixels is not None
            np.testing.assert_array_equal(f.pixels[:, :, 0], imgs[by_key[key]])


def test_missing_images_are_reasons_not_exceptions(tmp_path: Any, digits16: tuple[np.ndarray, np.ndarray]) -> None:
    items, _ = _items(digits16)
    shards = write_tar_shards(str(tmp_path / "tar"), items, 100)
    got = fetch_images(
        [
            f"{shards[0]}#nope.png",
            f"{tmp_path}/gone.tar#img000001.png",
            f"file://{tmp_path}/gone.png",
            f"{tmp_path}/gone.parquet#row3",
        ]
    )
    assert got[f"{shards[0]}#nope.png"].error == f"not found in {shards[0]}"
    assert "unreadable" in (got[f"{tmp_path}/gone.tar#img000001.png"].error or "")
    assert "No such file" in (got[f"file://{tmp_path}/gone.png"].error or "")
    assert got[f"{tmp_path}/gone.parquet#row3"].pixels is None


def test_locate() -> None:
    assert locate("s3://b/p/shard-000001.tar#x/img1.png") == ("tar", "s3://b/p/shard-000001.tar", "x/img1.png")
    assert locate("file:///a/part-0.parquet#row7") == ("parquet", "file:///a/part-0.parquet", "row7")
    assert locate("file:///a/3/img#1.png") == ("file", "file:///a/3/img#1.png", "img#1.png")
