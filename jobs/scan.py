"""``imgscan scan``: the nightly incremental scan = score what is new + reduce + history.

Layout under ROOT_URI (Hive-style partitions: DuckDB, pandas, Spark and pyarrow read
``ROOT_URI`` as one table with a ``scan_date`` column; names starting with ``_``
are ignored by all of them)::

    ROOT/scan_date=YYYY-MM-DD/_run.json           the night's scoring run (jobs/ledger.py)
    ROOT/scan_date=YYYY-MM-DD/parts/<shard>.parquet   its rows, RESULT_SCHEMA
    ROOT/scan_date=YYYY-MM-DD/_report/            thresholds.json, flagged.parquet, summary.json, report.html
    ROOT/_scan/scan.json                          what the root scans: source, model (fixed)
    ROOT/_scan/plans/YYYY-MM-DD.parquet           the items a night set out to score
    ROOT/_scan/ledger/YYYY-MM-DD.parquet          the same, written once every one is committed
    ROOT/_scan/superseded/scan_date=.../          old rows of items replaced in place, kept aside
    ROOT/_scan/history/YYYY-MM-DD.json            one night's figures (counts, flags, drift)
    ROOT/_scan/history.json, history.html         every night, as a table and a time series page

An *item* is what the source lists (``jobs.sources.list_items``): a tar or Parquet
file, or one image file, with its size and etag/mtime. A night scores the items
whose URI no earlier night recorded, or recorded with another version; image files
are grouped into shards afresh each night, so a file that lands in a folder never
moves the others into new shards. Every step of a night is finished by running the
night again, and skipped once its output exists: the plan, the parts (the scoring
job's per-shard commit), the ledger, the removal of replaced rows, the report, the
history entry. A night that is run again once complete writes nothing.
"""

from __future__ import annotations

import datetime as dt
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from jobs.drift import LEVEL, DriftMeter
from jobs.ledger import PARTS_DIR, committed_shards, part_uri
from jobs.schema import SCORE_DIRECTIONS
from jobs.score import ScoreConfig, preflight, score_shards
from jobs.sources import Item, group_shards, list_items
from jobs.storage import (
    StorageOptions,
    as_stored,
    exists,
    join,
    list_files,
    read_bytes,
    read_json,
    read_parquet,
    redact,
    remove,
    write_bytes,
    write_json,
    write_parquet,
)

DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
META = "_scan"
REPORT = "_report"
#: columns of a plan / ledger file: one row per item a night scores
ITEM_SCHEMA = pa.schema(
    [
        pa.field("uri", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("size", pa.int64(), nullable=False),
        pa.field("version", pa.string(), nullable=False),
        pa.field("folder", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("replaces", pa.string()),  # the night that held this item's previous version
    ]
)


@dataclass(frozen=True)
class ScanConfig:
    """Flags of ``imgscan scan``: those of ``score`` that make sense every night, plus the date
    and the reducer's rules (default: the bundle's calibrated thresholds, comparable across nights)."""

    score: ScoreConfig  # its ``out`` is ROOT_URI; each night scores into ROOT/scan_date=DATE
    date: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).date().isoformat())
    rules: tuple[str, ...] = ()
    default_rule: str = f"calibrated:{LEVEL}"
    anomaly_label: str = "anomaly"
    top_k: int = 24
    report: bool = True

    def __post_init__(self) -> None:
        check_date(self.date)
        if self.score.run_id is not None:
            raise ValueError("--run-id is not a scan flag: each night's run is named scan-DATE.")
        from jobs.reduce import ReduceConfig

        ReduceConfig(results="-", out="-", rules=self.rules, default_rule=self.default_rule, top_k=self.top_k)

    @property
    def root(self) -> str:
        return self.score.out


def check_date(text: str) -> str:
    try:
        ok = bool(DATE.match(text)) and dt.date.fromisoformat(text).isoformat() == text
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"--date must be a calendar date YYYY-MM-DD. Received: {text!r}.")
    return text


def log(msg: str) -> None:
    print(f"[imgscan scan] {redact(msg)}", file=sys.stderr, flush=True)


# -- where things live ---------------------------------------------------------------------------


def night_uri(root: str, date: str) -> str:
    return join(root, f"scan_date={date}")


def report_uri(root: str, date: str) -> str:
    return join(night_uri(root, date), REPORT)


def _meta(root: str, *parts: str) -> str:
    return join(root, META, *parts)


def plan_uri(root: str, date: str) -> str:
    return _meta(root, "plans", f"{date}.parquet")


def ledger_uri(root: str, date: str) -> str:
    return _meta(root, "ledger", f"{date}.parquet")


def history_entry_uri(root: str, date: str) -> str:
    return _meta(root, "history", f"{date}.json")


def history_page_uri(root: str) -> str:
    return _meta(root, "history.html")


def _dates(uri: str, suffix: str, storage_options: StorageOptions | None) -> list[str]:
    """The dates of the files ``DATE<suffix>`` directly under a prefix, sorted."""
    out = []
    for info in list_files(uri, storage_options):
        base = info["path"].rstrip("/").rsplit("/", 1)[-1]
        if base.endswith(suffix) and DATE.match(base[: -len(suffix)]):
            out.append(base[: -len(suffix)])
    return sorted(out)


# -- the scan ------------------------------------------------------------------------------------


def scan(cfg: ScanConfig) -> dict[str, Any]:
    """Score tonight's new and changed items, reduce them, add the night to the history.

    Nights that an interruption left unfinished are finished first (their plan
    holds). Returns tonight's history entry plus ``status`` ("scanned" or
    "already complete") and the URIs a person opens.
    """
    so = cfg.score.storage_options
    _size, _channels, version = preflight(cfg.score)
    _bind_root(cfg, version)
    ledgers = set(_dates(_meta(cfg.root, "ledger"), ".parquet", so))
    for date in _dates(_meta(cfg.root, "plans"), ".parquet", so):
        if date not in ledgers and date != cfg.date:
            log(f"night {date} was interrupted: finishing it first")
            _run_night(cfg, date)
    return _run_night(cfg, cfg.date)


def _bind_root(cfg: ScanConfig, version: str) -> None:
    """ROOT scans one source with one model: thresholds and drift stay comparable."""
    uri = _meta(cfg.root, "scan.json")
    facts = {"source": cfg.score.source, "model_version": version}
    if exists(uri, cfg.score.storage_options):
        held = read_json(uri, cfg.score.storage_options)
        for key, value in facts.items():
            if held.get(key) != as_stored(value, cfg.score.storage_options):  # as written: credentials masked
                raise ValueError(
                    f"{cfg.root} holds nightly scans with {key}={held.get(key)!r}; this call has {value!r}. "
                    "Nights of one root share the source and the model (so flags compare); choose another --out."
                )
        return
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    write_json(uri, {**facts, "model_uri": cfg.score.models, "created_at": created}, cfg.score.storage_options)


def _run_night(cfg: ScanConfig, date: str) -> dict[str, Any]:
    so, root = cfg.score.storage_options, cfg.root
    t0 = time.monotonic()
    complete = exists(ledger_uri(root, date), so)
    if complete:
        items = read_parquet(ledger_uri(root, date), so)
    elif exists(plan_uri(root, date), so):
        items = read_parquet(plan_uri(root, date), so)
        log(f"night {date}: resuming its plan of {items.num_rows} item(s)")
    else:
        items = plan_night(cfg, date)
        write_parquet(plan_uri(root, date), items, so)
    did = not complete
    if not complete:
        shards = group_shards([_item(r) for r in items.to_pylist()])
        if shards:
            night_cfg = replace(cfg.score, out=night_uri(root, date), run_id=f"scan-{date}")
            score_shards(night_cfg, shards)
        write_parquet(ledger_uri(root, date), items, so)
    superseded = supersede(root, date, items, so)
    summary: dict[str, Any] | None = None
    if items.num_rows and exists(join(night_uri(root, date), "_run.json"), so):
        if exists(join(report_uri(root, date), "summary.json"), so):
            summary = read_json(join(report_uri(root, date), "summary.json"), so)
        else:
            summary, did = _reduce(cfg, date), True
    if exists(history_entry_uri(root, date), so):
        entry = read_json(history_entry_uri(root, date), so)
    else:
        entry = _history_entry(cfg, date, items, summary, superseded, time.monotonic() - t0)
        write_json(history_entry_uri(root, date), entry, so)
        did = True
    if did:
        from jobs.history import write_history

        write_history(root, so)
    status = "scanned" if did else "already complete"
    return {**entry, "status": status, "history_page": history_page_uri(root)}


def plan_night(cfg: ScanConfig, date: str) -> pa.Table:
    """The items of the source that no other night recorded at their current version."""
    so, root = cfg.score.storage_options, cfg.root
    latest: dict[str, tuple[str, str]] = {}  # uri -> (version, night) of the newest night that scored it
    for night in _dates(_meta(root, "ledger"), ".parquet", so):
        if night == date:
            continue
        t = read_parquet(ledger_uri(root, night), so).select(["uri", "version"])
        for uri, version in zip(t.column("uri").to_pylist(), t.column("version").to_pylist(), strict=True):
            if uri not in latest or latest[uri][1] <= night:
                latest[uri] = (version, night)
    todo = [i for i in list_items(cfg.score.source, so) if latest.get(i.uri, ("", ""))[0] != i.version]
    shard_of: dict[str, str] = {}
    for shard in group_shards(todo):
        for uri in shard.members or (shard.uri,):
            shard_of[uri] = shard.shard_id
    rows = [
        {**_item_row(i), "shard_id": shard_of[i.uri], "replaces": latest[i.uri][1] if i.uri in latest else None}
        for i in todo
    ]
    n_new = sum(r["replaces"] is None for r in rows)
    n_shards = len(set(shard_of.values()))
    log(f"night {date}: {len(rows)} item(s) to score ({n_new} new, {len(rows) - n_new} changed), {n_shards} shard(s)")
    return pa.Table.from_pylist(rows, schema=ITEM_SCHEMA)


def _item_row(i: Item) -> dict[str, Any]:
    return {"uri": i.uri, "kind": i.kind, "size": i.size, "version": i.version, "folder": i.folder, "label": i.label}


def _item(row: dict[str, Any]) -> Item:
    return Item(row["uri"], row["kind"], row["size"], row["version"], row["folder"], row["label"])


def supersede(root: str, date: str, items: pa.Table, storage_options: StorageOptions | None = None) -> int:
    """Remove the earlier rows of the items this night rescored (replaced in place), so the
    table under ROOT holds each item's newest rows only. The old part is kept whole under
    ``_scan/superseded/`` first. Idempotent; returns the rows removed by this call."""
    so = storage_options
    replaced = items.filter(pc.is_valid(items.column("replaces")))
    removed = 0
    for night in sorted(set(replaced.column("replaces").to_pylist())):
        old = read_parquet(ledger_uri(root, night), so)
        uris = set(replaced.filter(pc.equal(replaced.column("replaces"), night)).column("uri").to_pylist())
        parts = {
            sid
            for uri, sid in zip(old.column("uri").to_pylist(), old.column("shard_id").to_pylist(), strict=True)
            if uri in uris
        }
        held = committed_shards(night_uri(root, night), so)
        for sid in sorted(parts & held):
            removed += _drop_rows(root, night, sid, uris, so)
    if removed:
        log(f"night {date}: {removed} earlier row(s) of replaced items moved to {_meta(root, 'superseded')}")
    return removed


def _drop_rows(root: str, night: str, shard_id: str, uris: set[str], so: StorageOptions | None) -> int:
    """Rows of ``uris`` out of one part of an earlier night (an archive's rows carry its URI in
    ``shard``; an image file's is its ``image_id``)."""
    uri = part_uri(night_uri(root, night), shard_id)
    table = read_parquet(uri, so)
    value_set = pa.array(sorted(uris), pa.string())
    drop = pc.or_(pc.is_in(table.column("shard"), value_set), pc.is_in(table.column("image_id"), value_set))
    n = int(pc.sum(drop).as_py() or 0)
    if n == 0:
        return 0
    keep_as = _meta(root, "superseded", f"scan_date={night}", PARTS_DIR, f"{shard_id}.parquet")
    if not exists(keep_as, so):
        write_bytes(keep_as, read_bytes(uri, so), so)
    rest = table.filter(pc.invert(drop))
    if rest.num_rows:
        write_parquet(uri, rest, so)
    else:
        remove(uri, so)
    return n


def _reduce(cfg: ScanConfig, date: str) -> dict[str, Any]:
    from jobs.reduce import ReduceConfig, reduce

    return reduce(
        ReduceConfig(
            results=night_uri(cfg.root, date),
            out=report_uri(cfg.root, date),
            rules=cfg.rules,
            default_rule=cfg.default_rule,
            anomaly_label=cfg.anomaly_label,
            top_k=cfg.top_k,
            report=cfg.report,
            storage_options=cfg.score.storage_options,
        )
    )


def _history_entry(
    cfg: ScanConfig,
    date: str,
    items: pa.Table,
    summary: dict[str, Any] | None,
    superseded: int,
    seconds: float,
) -> dict[str, Any]:
    """One night's figures: what it scored, errors, flags per score, drift per score."""
    replaces = items.column("replaces").to_pylist()
    entry: dict[str, Any] = {
        "date": date,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "items": {"total": items.num_rows, "new": sum(r is None for r in replaces)},
        "rows_superseded": superseded,
        "images": 0,
        "scored": 0,
        "errors": 0,
        "flagged": {"overall": 0, "per_score": {}},
        "drift": {},
        "seconds": round(seconds, 1),
    }
    entry["items"]["changed"] = entry["items"]["total"] - entry["items"]["new"]
    if summary is None:
        return entry
    entry.update(
        run_id=summary.get("run_id"),
        model_version=summary.get("model_version"),
        images=summary.get("rows", 0),
        scored=summary.get("scored", 0),
        errors=summary.get("errors", 0),
        flagged=summary.get("flagged", entry["flagged"]),
        report=summary.get("report"),
    )
    entry["drift"] = night_drift(cfg, date, list(summary.get("scores", {})))
    return entry


def night_drift(cfg: ScanConfig, date: str, scores: Sequence[str]) -> dict[str, Any]:
    """Drift per score of one night against the bundle's calibration (one pass over its parts)."""
    from jobs.reduce import RunResults, ok_mask, read_model_facts, score_values

    so = cfg.score.storage_options
    facts = read_model_facts(cfg.score.models, so)
    meters = {
        s: DriftMeter(s, SCORE_DIRECTIONS[s], facts.calibration[s])
        for s in scores
        if s in SCORE_DIRECTIONS and facts.calibration.get(s, {}).get("n")
    }
    if not meters:
        return {}
    run = RunResults(night_uri(cfg.root, date), so)
    for batch in run.batches(["status", *meters]):
        ok = ok_mask(batch)
        for name, meter in meters.items():
            if name in batch.schema.names:
                meter.feed(score_values(batch, name)[ok])
    return {name: meter.result() for name, meter in meters.items()}


def summary_line(result: dict[str, Any]) -> str:
    """The one line ``imgscan scan`` ends with."""
    date = result["date"]
    if result["status"] == "already complete":
        return (
            f"scan {date}: already complete ({result['images']} images scored that night); nothing new. "
            f"history: {result['history_page']}"
        )
    it = result["items"]
    drifted = [s for s, d in result.get("drift", {}).items() if d.get("drifted")]
    drift = f"drift in {', '.join(drifted)}" if drifted else "no drift"
    return (
        f"scan {date}: {it['total']} new or changed item(s) ({it['changed']} replaced), {result['images']} images "
        f"scored ({result['errors']} errors), {result['flagged']['overall']} flagged, {drift}; "
        f"history: {result['history_page']}"
    )
