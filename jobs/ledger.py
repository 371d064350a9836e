"""The commit ledger of a scoring run under RESULTS_URI (no Ray).

Layout (read by the reducer; keep the names)::

    RESULTS_URI/_run.json                 the run: run_id, model, source, manifest fingerprint, created_at
    RESULTS_URI/parts/<shard_id>.parquet  the results of one shard, RESULT_SCHEMA

The existence of a part file IS the commit of its shard: parts are written
whole (``storage.write_bytes``: write-then-rename locally, one atomic put on
object stores), so a reader never sees half a shard, and a re-run with the same
run id skips the shards whose part exists.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from jobs.schema import RESULT_SCHEMA
from jobs.scoring import SHARD_N
from jobs.sources import Shard
from jobs.storage import (
    StorageOptions,
    as_stored,
    exists,
    filesystem,
    join,
    read_json,
    read_parquet,
    write_json,
    write_parquet,
)

RUN_FILE = "_run.json"
PARTS_DIR = "parts"
PART_SUFFIX = ".parquet"
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: facts a resumed run must share with the run it resumes
SAME_ON_RESUME = ("model_version", "source", "manifest_fingerprint")


def run_uri(out: str) -> str:
    return join(out, RUN_FILE)


def part_uri(out: str, shard_id: str) -> str:
    return join(out, PARTS_DIR, f"{shard_id}{PART_SUFFIX}")


def new_run_id() -> str:
    """A fresh, sortable run id: UTC time + random suffix."""
    return f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def check_run_id(run_id: str) -> str:
    if not RUN_ID_PATTERN.match(run_id):
        raise ValueError(
            f"--run-id must be 1-64 characters of letters, digits, '.', '_' or '-', starting with a letter or "
            f"digit. Received: {run_id!r}."
        )
    return run_id


def manifest_fingerprint(shards: Sequence[Shard]) -> str:
    """sha256 over (shard_id, version) of every shard: a resumed run must see the same source."""
    h = hashlib.sha256()
    for s in sorted(shards, key=lambda s: s.shard_id):
        h.update(f"{s.shard_id}\x00{s.version}\n".encode())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class RunPlan:
    """What a call of the job will do under RESULTS_URI, decided before any cluster work."""

    record: dict[str, Any]  # the content of _run.json
    is_new: bool  # _run.json still has to be written
    committed: frozenset[str] = field(default_factory=frozenset)  # shard ids whose part exists

    @property
    def run_id(self) -> str:
        return str(self.record["run_id"])


def plan_run(
    out: str, run_id: str | None, facts: dict[str, Any], storage_options: StorageOptions | None = None
) -> RunPlan:
    """Read RESULTS_URI: start a new run or resume the one it holds. Writes nothing.

    Refuses (``ValueError``) to mix runs: RESULTS_URI holding another run id,
    a resume without ``--run-id``, or a resume whose model or source changed
    (its shards would no longer be the committed ones).
    """
    if run_id is not None:
        check_run_id(run_id)
    committed = committed_shards(out, storage_options)
    if exists(run_uri(out), storage_options):
        try:
            record: dict[str, Any] = read_json(run_uri(out), storage_options)
        except ValueError as e:
            raise ValueError(f"{run_uri(out)} is not valid JSON ({e}); choose another --out.") from e
        held = record.get("run_id")
        if run_id != held:
            raise ValueError(f"{out} holds run {held}; pass --run-id {held} to resume or choose another --out.")
        for key in SAME_ON_RESUME:
            # compared as stored: a credential that also occurs in the source URI is masked there
            if record.get(key) != as_stored(facts.get(key), storage_options):
                raise ValueError(
                    f"Run {held} in {out} was started with {key}={record.get(key)!r}; this call has "
                    f"{facts.get(key)!r}. Resume with the same model and source, or choose another --out."
                )
        return RunPlan(record, False, committed)
    if committed:
        raise ValueError(f"{out} holds {len(committed)} part file(s) but no {RUN_FILE}; choose another --out.")
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    return RunPlan({**facts, "run_id": run_id or new_run_id(), "created_at": created}, True, frozenset())


def write_run(out: str, plan: RunPlan, storage_options: StorageOptions | None = None) -> None:
    if plan.is_new:
        write_json(run_uri(out), plan.record, storage_options)


def committed_shards(out: str, storage_options: StorageOptions | None = None) -> frozenset[str]:
    """Shard ids whose part file exists under RESULTS_URI/parts/ (hidden temporaries excluded)."""
    fs, path = filesystem(join(out, PARTS_DIR), storage_options)
    try:
        names = fs.ls(path, detail=False)
    except FileNotFoundError:
        return frozenset()
    out_ids = set()
    for name in names:
        base = str(name).rstrip("/").rsplit("/", 1)[-1]
        if base.endswith(PART_SUFFIX) and not base.startswith("."):
            out_ids.add(base[: -len(PART_SUFFIX)])
    return frozenset(out_ids)


def commit_part(out: str, shard_id: str, table: pa.Table, storage_options: StorageOptions | None = None) -> str:
    """Write the part of one shard atomically; returns its URI."""
    if table.schema != RESULT_SCHEMA:
        raise ValueError(f"Expected a table of RESULT_SCHEMA. Received columns: {table.schema.names}.")
    uri = part_uri(out, shard_id)
    write_parquet(uri, table, storage_options)
    return uri


def read_results(out: str, storage_options: StorageOptions | None = None) -> pa.Table:
    """Every committed row of a run (all parts), RESULT_SCHEMA. For tests and small runs."""
    ids = sorted(committed_shards(out, storage_options))
    tables = [read_parquet(part_uri(out, sid), storage_options) for sid in ids]
    return pa.concat_tables(tables) if tables else RESULT_SCHEMA.empty_table()


class ShardAssembler:
    """Collects scored rows, arriving in any order and possibly twice (a retried
    task), per shard until the shard is complete.

    A row is keyed by ``image_id``: a repeat is dropped, so a shard completes
    with each of its inputs exactly once. ``_shard_n`` (set on the rows of a
    shard's last decoded table) says how many inputs complete it. Memory holds
    only the shards in flight.
    """

    def __init__(self) -> None:
        self._tables: dict[str, list[pa.Table]] = {}
        self._ids: dict[str, set[str]] = {}
        self._expected: dict[str, int] = {}
        self._done: set[str] = set()
        self.duplicates = 0  # rows dropped as repeats

    @property
    def done(self) -> frozenset[str]:
        """Shards completed so far."""
        return frozenset(self._done)

    @property
    def open_shards(self) -> list[str]:
        """Shards with rows buffered but not complete."""
        return sorted(self._tables)

    def add(self, table: pa.Table) -> list[tuple[str, list[pa.Table]]]:
        """Add scored rows; returns (shard_id, tables) of each shard this completed."""
        completed = []
        shard_col = table.column("shard_id")
        for shard_id in pc.unique(shard_col).to_pylist():
            sub = table.filter(pc.equal(shard_col, shard_id)) if table.num_rows else table
            if shard_id in self._done:
                self.duplicates += sub.num_rows
                continue
            seen = self._ids.setdefault(shard_id, set())
            keep = np.ones(sub.num_rows, dtype=bool)
            for i, image_id in enumerate(sub.column("image_id").to_pylist()):
                if image_id in seen:
                    keep[i] = False
                else:
                    seen.add(image_id)
            if not keep.all():
                self.duplicates += int((~keep).sum())
                sub = sub.filter(pa.array(keep))
            if sub.num_rows:
                self._tables.setdefault(shard_id, []).append(sub)
            n = pc.max(sub.column(SHARD_N)).as_py() if sub.num_rows else None
            if n is not None and n >= 0:
                self._expected[shard_id] = int(n)
            expected = self._expected.get(shard_id)
            if expected is not None and len(seen) >= expected:
                # more ids than inputs would mean two readings of a shard disagree: a bug, not bad data
                assert len(seen) == expected, (shard_id, len(seen), expected)
                completed.append((shard_id, self._tables.pop(shard_id, [])))
                del self._ids[shard_id], self._expected[shard_id]
                self._done.add(shard_id)
        return completed
