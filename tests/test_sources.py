"""Sources: every format (folder, tar shards, Parquet) on local disk, memory:// and a real S3 API;
labels, stable unique ids, read failures as records, and the one-line errors."""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tarfile
from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.demo_data import (
    corrupt_samples,
    digits,
    png_bytes,
    samples,
    write_folder,
    write_parquet_shards,
    write_tar_shards,
)
from jobs.sources import Shard, SourceError, list_shards, read_shard
from jobs.storage import join, write_bytes


@pytest.fixture(scope="module")
def items() -> list[Any]:
    imgs, labels = digits(8, classes=[0, 1, 2])
    imgs, labels = imgs[:60], labels[:60]
    return samples(imgs, [str(v) for v in labels]) + corrupt_samples(imgs[0], "0")


WRITERS: dict[str, Callable[..., Any]] = {
    "folder": lambda root, items, so: write_folder(root, items, so),
    "tar": lambda root, items, so: write_tar_shards(root, items, 25, so),
    "parquet": lambda root, items, so: write_parquet_shards(root, items, 25, so),
}


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def store(request: Any, tmp_path: Any, memory_root: str) -> tuple[str, dict[str, Any] | None]:
    if request.param == "local":
        return str(tmp_path / "src"), None
    if request.param == "memory":
        return memory_root, None
    s3 = request.getfixturevalue("s3")
    return f"{s3['root']}/src", s3["storage_options"]


def _all_records(shards: list[Shard], so: Any) -> list[Any]:
    return [r for s in shards for r in read_shard(s, so)]


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_every_format_yields_every_input_once_with_label_and_stable_id(
    fmt: str, store: tuple[str, Any], items: list[Any]
) -> None:
    root, so = store
    WRITERS[fmt](root, items, so)
    shards = list_shards(root, so)
    assert shards and all(s.kind == {"folder": "files"}.get(fmt, fmt) for s in shards)
    records = _all_records(shards, so)
    assert len(records) == len(items)  # row count == input count
    ids = [r.image_id for r in records]
    assert len(set(ids)) == len(ids)
    scheme = root.split("://", 1)[0] if "://" in root else "file"
    assert all(i.startswith(f"{scheme}://") for i in ids), ids[:3]
    by_key = {r.member.split(".", 1)[0]: r for r in records}
    for s in items:
        rec = by_key[s.key]
        assert rec.label == s.label, s.key
        assert rec.data == s.data and rec.error is None
        assert rec.shard_id in {sh.shard_id for sh in shards}
    # listing again gives the same manifest and ids: resume depends on it
    assert list_shards(root, so) == shards
    assert [r.image_id for r in _all_records(shards, so)] == ids
    # the manifest row survives the trip through a Ray Data dataset row (JSON fields)
    assert [Shard.from_row(s.to_row()) for s in shards] == shards


def test_folder_groups_files_per_label_and_root_images_have_no_label(tmp_path: Any, items: list[Any]) -> None:
    root = str(tmp_path / "src")
    write_folder(root, items[:10], None)
    write_bytes(join(root, "loose.png"), items[0].data)
    shards = list_shards(root, files_per_shard=3)
    by_label: dict[str | None, int] = {}
    for s in shards:
        assert len(s.members) <= 3 and len(set(s.labels)) == 1
        by_label[s.labels[0]] = by_label.get(s.labels[0], 0) + len(s.members)
    assert by_label[None] == 1
    assert sum(by_label.values()) == 11
    assert len({s.shard_id for s in shards}) == len(shards)


def test_tar_labels_from_cls_or_json_and_several_images_per_key(tmp_path: Any) -> None:
    img = png_bytes(np.zeros((4, 4), np.uint8))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in [
            ("a.png", img),
            ("a.cls", b"7\n"),
            ("sub/b.jpg", img),
            ("sub/b.json", json.dumps({"label": "cat"}).encode()),
            ("c.png", img),
            ("c.seg.png", img),  # a second image of sample "c"
            ("notes.txt", b"not an image, not counted"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path = tmp_path / "shard-000000.tar.gz"
    path.write_bytes(buf.getvalue())
    (shard,) = list_shards(str(tmp_path))
    recs = list(read_shard(shard))
    assert [(r.member, r.label) for r in recs] == [
        ("a.png", "7"),
        ("sub/b.jpg", "cat"),
        ("c.png", None),
        ("c.seg.png", None),
    ]
    assert recs[0].image_id == f"{shard.uri}#a.png"


def test_broken_tar_keeps_what_was_read_and_reports_the_rest(tmp_path: Any, items: list[Any]) -> None:
    write_tar_shards(str(tmp_path), items[:10], 100)
    data = (tmp_path / "shard-000000.tar").read_bytes()
    (tmp_path / "shard-000000.tar").write_bytes(data[: len(data) // 2])
    (shard,) = list_shards(str(tmp_path))
    recs = list(read_shard(shard))
    assert 0 < len(recs) <= 10
    assert recs[-1].data is None and recs[-1].error and "tar archive unreadable" in recs[-1].error
    assert all(r.error is None for r in recs[:-1])


def test_repeated_names_become_distinct_ids(tmp_path: Any) -> None:
    img = png_bytes(np.zeros((4, 4), np.uint8))
    table = pa.table({"id": ["x", "y", "x", "x"], "image": pa.array([img] * 4, pa.binary())})
    pq.write_table(table, tmp_path / "p.parquet")
    (shard,) = list_shards(str(tmp_path))
    assert [r.member for r in read_shard(shard)] == ["x", "y", "x@2", "x@3"]


def test_parquet_variants(tmp_path: Any) -> None:
    img = png_bytes(np.zeros((4, 4), np.uint8))
    # Hugging Face style struct column, no id column: ids are row numbers
    hf = pa.table({"img": pa.array([{"bytes": img, "path": "a.png"}] * 2), "target": [3, 4]})
    pq.write_table(hf, tmp_path / "hf.parquet")
    (shard,) = list_shards(str(tmp_path / "hf.parquet"))
    recs = list(read_shard(shard))
    assert [(r.member, r.label, r.data == img) for r in recs] == [("row0", "3", True), ("row1", "4", True)]
    # no image column: one error record that says what was expected
    pq.write_table(pa.table({"a": [1], "b": ["x"]}), tmp_path / "bad.parquet")
    (bad,) = list_shards(str(tmp_path / "bad.parquet"))
    (rec,) = list(read_shard(bad))
    assert rec.data is None and rec.error and "no image-bytes column" in rec.error


def test_a_file_gone_after_listing_is_an_error_record(tmp_path: Any, items: list[Any]) -> None:
    root = tmp_path / "src"
    write_folder(str(root), [dataclasses.replace(s, label=None) for s in items[:5]], None)
    (shard,) = list_shards(str(root))
    os.remove(shard.members[2].removeprefix("file://"))
    recs = list(read_shard(shard))
    assert len(recs) == 5
    assert recs[2].data is None and recs[2].error and recs[2].error.startswith("read failed")
    assert all(r.error is None for i, r in enumerate(recs) if i != 2)


def test_missing_empty_and_mixed_sources_are_errors(tmp_path: Any, items: list[Any]) -> None:
    with pytest.raises(SourceError, match="Source not found"):
        list_shards(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(SourceError, match="Source is empty"):
        list_shards(str(tmp_path / "empty"))
    mixed = str(tmp_path / "mixed")
    write_tar_shards(mixed, items[:4], 10)
    write_bytes(join(mixed, "stray.png"), items[0].data)
    with pytest.raises(SourceError, match="mixes 1 tar/Parquet file"):
        list_shards(mixed)


@pytest.mark.s3
def test_missing_s3_prefix_is_an_error(s3: dict[str, Any]) -> None:
    with pytest.raises(SourceError, match="Source not found"):
        list_shards(f"{s3['root']}/nothing-here", s3["storage_options"])
