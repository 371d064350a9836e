"""The commit ledger: _run.json rules, part files as commits (local, memory://, S3), and the
assembly of rows that arrive in any order and possibly twice into whole shards."""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import pyarrow as pa
import pytest

from jobs.ledger import (
    ShardAssembler,
    commit_part,
    committed_shards,
    part_uri,
    plan_run,
    read_results,
    run_uri,
    write_run,
)
from jobs.schema import RESULT_SCHEMA, to_table
from jobs.scoring import SEQ, SHARD_N, finish_part
from jobs.storage import read_json, write_bytes

FACTS = {"model_version": "v1", "source": "file:///src", "manifest_fingerprint": "abc", "model_uri": "m"}


def _rows(shard_id: str, seqs: list[int], shard_n: int) -> pa.Table:
    """Scored rows of RESULT_SCHEMA plus the internal columns, as the actors emit them."""
    now = dt.datetime.now(dt.UTC)
    rows = [
        {
            "image_id": f"{shard_id}#{i}",
            "shard": f"uri-{shard_id}",
            "shard_id": shard_id,
            "member": str(i),
            "status": "ok",
            "model_version": "v1",
            "run_id": "r",
            "scored_at": now,
            "recon_error": float(i),
        }
        for i in seqs
    ]
    t = to_table(rows)
    return t.append_column(SEQ, pa.array(seqs, pa.int64())).append_column(
        SHARD_N, pa.array([shard_n] * len(seqs), pa.int64())
    )


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def out(request: Any, tmp_path: Any, memory_root: str) -> tuple[str, dict[str, Any] | None]:
    if request.param == "local":
        return str(tmp_path / "results"), None
    if request.param == "memory":
        return memory_root, None
    s3 = request.getfixturevalue("s3")
    return f"{s3['root']}/results", s3["storage_options"]


def test_new_run_then_resume_rules(out: tuple[str, Any]) -> None:
    uri, so = out
    plan = plan_run(uri, None, FACTS, so)
    assert plan.is_new and plan.run_id and not plan.committed
    write_run(uri, plan, so)
    record = read_json(run_uri(uri), so)
    assert record["run_id"] == plan.run_id and record["model_version"] == "v1" and record["created_at"]
    # another call without --run-id or with another id is refused, naming the run it holds
    for other in (None, "other-run"):
        with pytest.raises(ValueError, match=f"holds run {plan.run_id}; pass --run-id {plan.run_id} to resume"):
            plan_run(uri, other, FACTS, so)
    # the same id resumes, and sees the committed parts
    commit_part(uri, "s1", finish_part([_rows("s1", [0, 1], 2)]), so)
    again = plan_run(uri, plan.run_id, FACTS, so)
    assert not again.is_new and again.committed == {"s1"} and again.record == record
    # ... but not with another model or a changed source
    with pytest.raises(ValueError, match="was started with model_version='v1'"):
        plan_run(uri, plan.run_id, {**FACTS, "model_version": "v2"}, so)
    with pytest.raises(ValueError, match="manifest_fingerprint"):
        plan_run(uri, plan.run_id, {**FACTS, "manifest_fingerprint": "changed"}, so)


def test_parts_without_run_file_and_bad_run_ids_are_refused(tmp_path: Any) -> None:
    uri = str(tmp_path / "results")
    commit_part(uri, "s1", finish_part([_rows("s1", [0], 1)]))
    with pytest.raises(ValueError, match=r"part file\(s\) but no _run\.json"):
        plan_run(uri, "r1", FACTS)
    for bad in ("", "a/b", "../x", "x" * 65, "-lead"):
        with pytest.raises(ValueError, match="--run-id must be"):
            plan_run(str(tmp_path / "fresh"), bad, FACTS)


def test_parts_are_the_commits(out: tuple[str, Any]) -> None:
    uri, so = out
    assert committed_shards(uri, so) == frozenset()
    commit_part(uri, "aaa", finish_part([_rows("aaa", [1, 0, 2], 3)]), so)
    commit_part(uri, "bbb", finish_part([]), so)  # a shard with no images is committed too
    # a temporary of a write in progress (or killed) is not a commit
    write_bytes(part_uri(uri, "aaa").rsplit("/", 1)[0] + "/.tmp-123-ccc.parquet", b"partial", so)
    assert committed_shards(uri, so) == {"aaa", "bbb"}
    table = read_results(uri, so)
    assert table.schema == RESULT_SCHEMA
    assert table.column("member").to_pylist() == ["0", "1", "2"]  # record order within the part
    with pytest.raises(ValueError, match="RESULT_SCHEMA"):
        commit_part(uri, "x", pa.table({"a": [1]}), so)


def test_local_commit_leaves_no_temporary(tmp_path: Any) -> None:
    uri = str(tmp_path / "results")
    commit_part(uri, "s", finish_part([_rows("s", [0], 1)]))
    assert os.listdir(tmp_path / "results" / "parts") == ["s.parquet"]


def test_assembler_completes_shards_in_any_order_and_drops_repeats() -> None:
    asm = ShardAssembler()
    # the last chunk of shard A (carrying its count) arrives first, mixed with rows of B
    first = pa.concat_tables([_rows("A", [4, 5], 6), _rows("B", [0, 1], -1)])
    assert asm.add(first) == []
    assert asm.add(_rows("A", [0, 1, 2], -1)) == []
    assert asm.open_shards == ["A", "B"]
    # a retried batch repeats rows 1 and 2 of A, and brings the missing row 3
    done = asm.add(_rows("A", [1, 2, 3], -1))
    assert [sid for sid, _ in done] == ["A"]
    part = finish_part(done[0][1])
    assert part.column("member").to_pylist() == ["0", "1", "2", "3", "4", "5"]
    assert asm.duplicates == 2
    # rows of a committed shard that arrive late are dropped, not a new shard
    assert asm.add(_rows("A", [0], 6)) == []
    assert asm.duplicates == 3 and asm.open_shards == ["B"]
    (b,) = asm.add(_rows("B", [2], 3))
    assert b[0] == "B" and sum(t.num_rows for t in b[1]) == 3
    assert asm.done == {"A", "B"} and asm.open_shards == []
