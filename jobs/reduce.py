"""``imgscan reduce``: global thresholds per score over all results of a run, flags, report.

Input (written by the scoring job)::

    RESULTS_URI/_run.json            {"run_id", "model_uri", "model_version", "source", "created_at", ...}
    RESULTS_URI/parts/*.parquet      one per shard, schema jobs.schema.RESULT_SCHEMA

Output under REPORT_URI: ``thresholds.json``, ``flagged.parquet``,
``summary.json``, ``report.html`` (one self-contained file).

The parts are streamed batch by batch with column projection, never loaded
whole: pass 1 reads status, labels and the score columns (counts, moments,
the tail a quantile needs); IQR and quantiles in the middle take one or two
more passes over their columns (``jobs.thresholds.RankSearch``); the last pass
flags rows and keeps only the flagged ones. Memory is bounded by the tails,
one batch, and the flagged rows.
"""

from __future__ import annotations

import datetime as dt
import io
import math
import posixpath
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from detectors.columns import ANOMALY_SCORE, DEFECT_CLASS
from jobs.reduce_metrics import Confusion, LabelledSample, label_codes
from jobs.schema import SCORE_DIRECTIONS
from jobs.storage import (
    StorageError,
    StorageOptions,
    filesystem,
    join,
    list_files,
    read_json,
    redact,
    write_bytes,
    write_json,
)
from jobs.thresholds import MAX_VALUES, Direction, Moments, Rule, Threshold, ThresholdError, ThresholdFitter

MISMATCH = "cam_mismatch"  # the label-audit rule: cam_pred != label
EACH = "each"  # --rule each=RULE: every meaningful score gets RULE (flags per detector)
FUSED = ANOMALY_SCORE.name
DEFAULT_RULE = "quantile:0.999"
HISTOGRAM_BINS = 60
BATCH_SIZE = 131_072


@dataclass(frozen=True)
class ReduceConfig:
    """What ``imgscan reduce`` does; validated once.

    ``rules``: ``"SCORE=RULE"`` (one per score; ``RULE`` "off" leaves the score
    out), ``"each=RULE"`` (every meaningful score of the bundle gets RULE: flags per
    detector) or a bare ``"RULE"`` that replaces ``default_rule``, the rule of
    ``anomaly_score``. ``cam_mismatch=off`` turns the label audit off.

    By default only ``anomaly_score`` is thresholded; the other meaningful scores
    (what the bundle's detectors declare) get histograms and metrics, and flags only
    when a rule names them. Results scored before ``anomaly_score`` existed
    threshold every score with the default rule, as then.
    """

    results: str
    out: str
    rules: tuple[str, ...] = ()
    default_rule: str = DEFAULT_RULE
    calibration: str | None = None  # MODEL_URI of the calibration (default: the run's model)
    anomaly_label: str = "anomaly"
    top_k: int = 24  # images in the report's gallery
    report: bool = True
    batch_size: int = BATCH_SIZE
    max_values: int = MAX_VALUES  # per column: values held for exact quantiles
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.parsed_rules()  # raises on bad rules
        if self.top_k < 0:
            raise ValueError(f"--top-k must be >= 0. Received: {self.top_k}.")
        if self.batch_size < 1 or self.max_values < 16:
            raise ValueError("batch_size must be >= 1 and max_values >= 16.")

    def parsed_rules(self) -> Rules:
        default = Rule.parse(self.default_rule)
        explicit: dict[str, Rule | None] = {}
        audit: bool | None = None
        each: Rule | None = None
        for text in self.rules:
            if "=" not in text:
                default = Rule.parse(text)
                continue
            score, _, rule = (s.strip() for s in text.partition("="))
            if score in explicit or (score == MISMATCH and audit is not None) or (score == EACH and each is not None):
                raise ValueError(f"--rule {score}=... given twice; one rule per score.")
            if score == MISMATCH:
                if rule not in ("on", "off"):
                    raise ValueError(f"--rule {MISMATCH}= takes 'on' or 'off'. Received: {rule!r}.")
                audit = rule == "on"
                continue
            if score == EACH:
                each = Rule.parse(rule)
                continue
            if score not in SCORE_DIRECTIONS:
                raise ValueError(
                    f"--rule {text!r}: {score!r} is not a score column; "
                    f"scores: {[*SCORE_DIRECTIONS, MISMATCH]} (or {EACH}=RULE for every meaningful score)."
                )
            explicit[score] = None if rule == "off" else Rule.parse(rule)
        return Rules(default, explicit, audit is not False, each)


@dataclass(frozen=True)
class Rules:
    """The parsed ``--rule`` flags."""

    default: Rule  # anomaly_score's (every score's, for results without it)
    explicit: dict[str, Rule | None]  # score -> its rule, None for "off"
    audit: bool  # the cam_mismatch label audit
    each: Rule | None  # every meaningful score's rule, when given


def log(msg: str) -> None:
    print(f"[imgscan reduce] {redact(msg)}", file=sys.stderr, flush=True)


# -- reading the run ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Part:
    uri: str
    path: str
    num_rows: int
    schema: pa.Schema
    #: column -> nulls in the part, from the footer's statistics (absent: the writer kept none)
    null_counts: Mapping[str, int] = field(default_factory=dict)


class RunResults:
    """The parts of one run, read batch by batch with column projection."""

    def __init__(self, results: str, storage_options: StorageOptions | None = None, batch_size: int = BATCH_SIZE):
        self.uri, self.so, self.batch_size = results, dict(storage_options or {}), batch_size
        try:
            self.run: dict[str, Any] = read_json(join(results, "_run.json"), self.so)
        except StorageError as e:
            raise StorageError(f"No run at {results}: _run.json missing or unreadable ({e}).") from e
        except ValueError as e:
            raise ValueError(f"{results}/_run.json is not valid JSON: {e}") from e
        self.fs, _ = filesystem(results, self.so)
        self.parts = [self._open(info) for info in list_files(join(results, "parts"), self.so) if _is_part(info)]
        if not self.parts:
            raise ValueError(f"No result parts under {join(results, 'parts')} (expected *.parquet files).")
        self.columns = set(self.parts[0].schema.names)
        for p in self.parts[1:]:
            self.columns &= set(p.schema.names)
        #: the columns every part has, in the first part's order
        self.column_order = [n for n in self.parts[0].schema.names if n in self.columns]

    def _open(self, info: Mapping[str, Any]) -> Part:
        try:
            with self.fs.open(info["path"], "rb") as f:
                pf = pq.ParquetFile(f)
                return Part(info["name"], info["path"], pf.metadata.num_rows, pf.schema_arrow, _null_counts(pf))
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"Result part {info['name']} is not a readable Parquet file: {e}") from e

    @property
    def num_rows(self) -> int:
        return sum(p.num_rows for p in self.parts)

    def all_null(self, column: str) -> bool:
        """True when the footers show no value in ``column`` (absent, or null in every row)."""
        if column not in self.columns:
            return True
        return all(column in p.null_counts and p.null_counts[column] == p.num_rows for p in self.parts)

    def batches(self, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        cols = [c for c in dict.fromkeys(columns) if c in self.columns]
        for part in self.parts:
            with self.fs.open(part.path, "rb") as f:
                pf = pq.ParquetFile(f, read_dictionary=[c for c in ("status", "shard") if c in cols])
                yield from pf.iter_batches(batch_size=self.batch_size, columns=cols)


def _null_counts(pf: pq.ParquetFile) -> dict[str, int]:
    """column -> nulls over the row groups, for the flat columns whose every row group has statistics."""
    md = pf.metadata
    out: dict[str, int] = {}
    for j in range(md.num_columns):
        path = md.schema.column(j).path
        counts = [md.row_group(i).column(j).statistics for i in range(md.num_row_groups)]
        if "." not in path and all(s is not None and s.has_null_count for s in counts):
            out[path] = sum(s.null_count for s in counts if s is not None)
    return out


def _is_part(info: Mapping[str, Any]) -> bool:
    base = posixpath.basename(info["path"])
    return base.endswith(".parquet") and not base.startswith(("_", ".")) and ".tmp" not in base


def _strings(arr: pa.Array) -> pa.Array:
    return arr.dictionary_decode() if pa.types.is_dictionary(arr.type) else arr


def ok_mask(batch: pa.RecordBatch) -> np.ndarray:
    """bool (n,): status == "ok" (error rows are never used in a threshold)."""
    status = batch.column("status")
    if pa.types.is_dictionary(status.type) and status.null_count == 0:
        # compare the small dictionary once, then look the indices up (no string per row)
        hit = np.asarray(pc.equal(status.dictionary, "ok").to_numpy(zero_copy_only=False), dtype=bool)
        return hit[status.indices.to_numpy()] if len(hit) else np.zeros(len(status), bool)
    return _bools(pc.equal(_strings(status), "ok"))


def _bools(arr: pa.Array) -> np.ndarray:
    """A boolean Arrow array -> bool (n,), null as False."""
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), dtype=bool)


def score_values(batch: pa.RecordBatch, column: str) -> np.ndarray:
    """float64 (n,), NaN where null."""
    return np.asarray(batch.column(column).to_numpy(zero_copy_only=False), dtype=np.float64)


# -- model facts (cheap: JSON only, no Keras) --------------------------------------------------


@dataclass
class ModelFacts:
    uri: str | None
    calibration: dict[str, dict[str, Any]] = field(default_factory=dict)
    cam_classes: list[str] | None = None
    cam_anomaly_class: str | None = None  # the CAM's anomaly class (labelled or self-made defects)
    #: the columns the detectors declare meaningful (None: unknown, the bundle predates the declaration)
    anomaly_columns: list[str] | None = None
    error: str | None = None  # why the bundle could not be read


def read_model_facts(uri: str | None, storage_options: StorageOptions | None) -> ModelFacts:
    """Calibration statistics, declared anomaly columns and CAM classes from a bundle's meta.json files."""
    if not uri:
        return ModelFacts(None, error="no model URI in _run.json")
    from detectors.fusion import null_calibration
    from jobs.bundle import BundleError, read_manifest

    facts = ModelFacts(uri)
    try:
        manifest = read_manifest(uri, storage_options)
        declared: list[str] | None = []
        for name in manifest["detectors"]:
            meta = read_json(join(uri, name, "meta.json"), storage_options)
            facts.calibration.update(meta.get("calibration") or {})
            if declared is not None and "anomaly_columns" in meta:
                declared.extend(str(c) for c in meta["anomaly_columns"])
            else:
                declared = None
            if name == "cam":
                facts.cam_classes = [str(c) for c in meta.get("classes", [])]
                anomaly = (meta.get("params") or {}).get("anomaly_class")
                facts.cam_anomaly_class = DEFECT_CLASS if DEFECT_CLASS in facts.cam_classes else anomaly
        facts.anomaly_columns = declared
        if declared is not None:
            facts.calibration[FUSED] = null_calibration()
    except (BundleError, StorageError, ValueError) as e:
        facts.error = str(e)
    return facts


#: held-out normal scores per declared column below which a calibrated anomaly_score threshold is
#: hard to reach: from 100 (gamma-like) scores, one 5x beyond the largest gets p ~ 1e-3.4 (detectors.fusion)
FEW_CALIBRATION = 100


def few_calibration(facts: ModelFacts) -> str | None:
    """A one-line note when the bundle's calibration is too small for anomaly_score to reach a calibrated
    threshold easily (its tail is honest about what so few normal scores show), else None."""
    if not facts.anomaly_columns:
        return None
    sizes = [int(facts.calibration.get(c, {}).get("n") or 0) for c in facts.anomaly_columns]
    n = min((k for k in sizes if k > 0), default=FEW_CALIBRATION)
    if n >= FEW_CALIBRATION:
        return None
    return (
        f"note: the bundle's detectors kept as few as {n} normal scores to calibrate on; from so few, "
        "anomaly_score puts an image at 1 in 1,000 only far beyond all of them. To flag more, rank by "
        f"anomaly_score, use --rule {FUSED}=quantile:Q, or calibrate the bundle on more normal images "
        "('imgscan calibrate')."
    )


def _notes(columns: Mapping[str, _Column], facts: ModelFacts) -> list[str]:
    """What a reader of the flags should know about them (the log, summary.json and the report)."""
    fused = columns.get(FUSED)
    few = few_calibration(facts)
    calibrated = fused is not None and fused.threshold is not None and fused.threshold.rule.startswith("calibrated")
    return [few] if few and calibrated else []


# -- the reducer -------------------------------------------------------------------------------


@dataclass
class _Column:
    """Per score column: its fitter (None: shown, not thresholded) and what pass 1 and the flag pass count."""

    name: str
    direction: Direction
    explicit: bool
    fitter: ThresholdFitter | None
    moments: Moments = field(default_factory=Moments)
    sample: LabelledSample = field(default_factory=LabelledSample)
    n_missing: int = 0  # ok rows where the score is null/NaN
    threshold: Threshold | None = None
    confusion: Confusion = field(default_factory=Confusion)
    flagged: int = 0
    edges: np.ndarray | None = None
    counts: np.ndarray | None = None


def reduce(cfg: ReduceConfig) -> dict[str, Any]:
    """Run the reducer; writes the outputs under ``cfg.out`` and returns the summary."""
    so = cfg.storage_options
    run = RunResults(cfg.results, so, cfg.batch_size)
    rules = cfg.parsed_rules()
    log(f"{len(run.parts)} part files, {run.num_rows} rows, run {run.run.get('run_id')}")

    missing = [s for s, r in rules.explicit.items() if r is not None and s not in run.columns]
    if missing:
        raise ValueError(f"Score column(s) {missing} missing from the results at {cfg.results}.")
    model_uri = cfg.calibration or run.run.get("model_uri")
    facts = read_model_facts(model_uri, so)
    plan, shown = _plan_columns(rules, run, facts)
    if any(r.kind == "calibrated" for r, _ in plan.values()) and facts.error:
        raise ValueError(f"Rule calibrated needs the model bundle's calibration, but {facts.error}.")

    columns: dict[str, _Column] = {}
    skipped: dict[str, str] = {}
    for s, (rule, is_explicit) in plan.items():
        if rule.kind == "calibrated" and not is_explicit and not facts.calibration.get(s, {}).get("n"):
            skipped[s] = f"no calibration for this score in {model_uri} (its detector is absent or does not produce it)"
            continue
        fitter = ThresholdFitter(
            s,
            rule,
            SCORE_DIRECTIONS[s],
            n_upper=run.num_rows,
            calibration=facts.calibration,
            anomaly_label=cfg.anomaly_label,
            max_values=cfg.max_values,
        )
        columns[s] = _Column(s, SCORE_DIRECTIONS[s], is_explicit, fitter)
    for s in shown:
        columns.setdefault(s, _Column(s, SCORE_DIRECTIONS[s], False, None))

    mismatch_on = rules.audit and {"cam_pred", "label"} <= run.columns
    stats = _RunStats()
    extra = ["shard", "error", "label", "model_version", "run_id", *(["cam_pred"] if mismatch_on else [])]
    first_pass(
        run,
        _fitters(columns),
        on_batch=lambda batch, ok, values, codes: _count(stats, columns, batch, ok, values, codes, mismatch_on),
        columns=[*extra, *(n for n, c in columns.items() if c.fitter is None)],
        anomaly_label=cfg.anomaly_label,
    )
    _check_one_model(stats, run)
    for c in list(columns.values()):
        if c.moments.n == 0:
            if c.explicit:
                raise ThresholdError(
                    f"{c.name}: score column missing from the results (no valid value in {run.num_rows} rows)."
                )
            if c.fitter is not None:
                skipped[c.name] = "no valid scores in this run (its detector is absent or does not produce it)"
            del columns[c.name]
    thresholds = finish_thresholds(run, _fitters(columns))
    for name, c in columns.items():
        if name in thresholds:
            t = c.threshold = thresholds[name]
            log(f"{name}: {t.rule} -> {t.value:.6g} ({c.direction} is anomalous, n={t.n})")
    notes = _notes(columns, facts)
    for note in notes:
        log(note)

    mismatch = _mismatch_classes(facts, stats, mismatch_on)
    flagged = _flag_pass(run, columns, cfg, mismatch, stats)
    return _write_outputs(cfg, run, columns, flagged, stats, skipped, mismatch, facts, notes)


def _plan_columns(rules: Rules, run: RunResults, facts: ModelFacts) -> tuple[dict[str, tuple[Rule, bool]], list[str]]:
    """(score -> (its rule, given explicitly), the meaningful scores shown without a threshold).

    The meaningful scores are what the bundle's detectors declare; for a bundle that
    predates the declaration, every score column the results hold.
    """
    present = [s for s in SCORE_DIRECTIONS if s in run.columns and s != FUSED]
    if facts.anomaly_columns is not None:
        meaningful = [s for s in facts.anomaly_columns if s in run.columns]
    else:
        meaningful = present
    fused = not run.all_null(FUSED)
    plan: dict[str, tuple[Rule, bool]] = {}
    if fused:
        plan[FUSED] = (rules.default, False)
        if rules.each is not None:
            plan.update({s: (rules.each, False) for s in meaningful})
    else:
        log(f"results without {FUSED} (scored before imgscan had it): every score gets the default rule")
        plan.update({s: (rules.each or rules.default, False) for s in meaningful})
    for s, r in rules.explicit.items():
        if r is None:
            plan.pop(s, None)
        else:
            plan[s] = (r, True)
    shown = [s for s in meaningful if s not in plan and rules.explicit.get(s, "on") is not None]
    return plan, shown


def _fitters(columns: Mapping[str, _Column]) -> dict[str, ThresholdFitter]:
    return {n: c.fitter for n, c in columns.items() if c.fitter is not None}


@dataclass
class _RunStats:
    rows: int = 0
    ok: int = 0
    status: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    shard_rows: Counter[str] = field(default_factory=Counter)
    shard_errors: Counter[str] = field(default_factory=Counter)
    versions: Counter[str] = field(default_factory=Counter)
    run_ids: set[str] = field(default_factory=set)
    predictions: set[str] = field(default_factory=set)
    n_labelled: int = 0
    n_anomalies: int = 0
    any_confusion: Confusion = field(default_factory=Confusion)
    mismatch_flagged: int = 0


def _codes(batch: pa.RecordBatch, anomaly_label: str) -> np.ndarray:
    if "label" not in batch.schema.names:
        return np.full(batch.num_rows, -1, np.int8)
    return label_codes(_strings(batch.column("label")), anomaly_label)


def _counts(arr: pa.Array) -> Counter[str]:
    vc = pc.value_counts(_strings(arr))
    return Counter({str(v): int(n) for v, n in zip(vc.field(0).to_pylist(), vc.field(1).to_pylist(), strict=True)})


OnBatch = Callable[[pa.RecordBatch, np.ndarray, dict[str, np.ndarray], np.ndarray], None]


def first_pass(
    run: RunResults,
    fitters: Mapping[str, ThresholdFitter],
    *,
    on_batch: OnBatch | None = None,
    columns: Sequence[str] = (),
    anomaly_label: str = "anomaly",
) -> None:
    """Stream status, labels and the score columns of ``fitters`` once, feeding
    each fitter the valid (status "ok", finite) scores of its column.

    ``on_batch(batch, ok, values, codes)`` sees every batch too (``columns`` are
    read for it): ok bool (n,), values column -> float64 (n,) with NaN for null,
    codes int8 (n,) from ``label_codes``.
    """
    want_labels = on_batch is not None or any(f.rule.kind == "f1" for f in fitters.values())
    read = ["status", *(["label"] if want_labels else []), *columns, *fitters]
    for batch in run.batches(read):
        ok = ok_mask(batch)
        codes = _codes(batch, anomaly_label) if want_labels else np.full(batch.num_rows, -1, np.int8)
        values = {name: score_values(batch, name) for name in fitters}
        for name, fitter in fitters.items():
            valid = ok & np.isfinite(values[name])
            fitter.feed(values[name][valid], codes[valid])
        if on_batch is not None:
            on_batch(batch, ok, values, codes)


def finish_thresholds(run: RunResults, fitters: Mapping[str, ThresholdFitter]) -> dict[str, Threshold]:
    """After ``first_pass``: the refusals, then as many more passes as exact
    quantiles in the middle (IQR) need, over their columns only."""
    for fitter in fitters.values():
        fitter.end_pass()
    while pending := {n: f for n, f in fitters.items() if not f.done}:
        log(f"exact quantiles: one more pass over {list(pending)}")
        for batch in run.batches(["status", *pending]):
            ok = ok_mask(batch)
            for name, fitter in pending.items():
                v = score_values(batch, name)
                fitter.feed(v[ok & np.isfinite(v)])
        for fitter in pending.values():
            fitter.end_pass()
    return {name: f.result() for name, f in fitters.items()}


def _count(
    st: _RunStats,
    columns: Mapping[str, _Column],
    batch: pa.RecordBatch,
    ok: np.ndarray,
    values: Mapping[str, np.ndarray],
    codes: np.ndarray,
    mismatch_on: bool,
) -> None:
    """The run's counts from one batch of the first pass."""
    st.rows += batch.num_rows
    st.ok += int(ok.sum())
    st.status += _counts(batch.column("status"))
    names = batch.schema.names
    if "shard" in names:
        st.shard_rows += _counts(batch.column("shard"))
        if not ok.all():
            bad = pa.array(~ok)
            st.shard_errors += _counts(batch.column("shard").filter(bad))
            if "error" in names:
                st.reasons += _counts(batch.column("error").filter(bad).drop_null())
    if "model_version" in names:
        st.versions += _counts(batch.column("model_version"))
    if "run_id" in names:
        st.run_ids.update(_counts(batch.column("run_id")))
    st.n_labelled += int((ok & (codes >= 0)).sum())
    st.n_anomalies += int((ok & (codes == 1)).sum())
    if mismatch_on:
        st.predictions.update(str(p) for p in pc.unique(batch.column("cam_pred").drop_null()).to_pylist())
    for c in columns.values():
        v = values[c.name] if c.name in values else score_values(batch, c.name)
        valid = ok & np.isfinite(v)
        c.n_missing += int(ok.sum() - valid.sum())
        c.moments.update(v[valid])
        c.sample.feed(v[valid], codes[valid])


def _check_one_model(st: _RunStats, run: RunResults) -> None:
    if len(st.versions) > 1:
        detail = ", ".join(f"{v} ({n} rows)" for v, n in st.versions.most_common())
        raise ValueError(
            f"Results at {run.uri} mix {len(st.versions)} models ({detail}); thresholds of different models "
            "cannot be mixed: reduce each model's results separately."
        )
    declared = run.run.get("model_version")
    if declared and st.versions and declared not in st.versions:
        raise ValueError(
            f"Results at {run.uri} were scored by model {next(iter(st.versions))}, but _run.json names "
            f"{declared}; refusing to mix."
        )


@dataclass(frozen=True)
class _Mismatch:
    classes: frozenset[str]
    source: str  # where the classes come from


def _mismatch_classes(facts: ModelFacts, st: _RunStats, on: bool) -> _Mismatch | None:
    if not on or not st.predictions:
        return None
    if facts.cam_classes:
        return _Mismatch(frozenset(facts.cam_classes), f"model bundle {facts.uri}")
    log(f"{MISMATCH}: CAM classes taken from the predictions in this run ({facts.error})")
    return _Mismatch(frozenset(st.predictions), f"predictions in this run ({facts.error})")


def _flag_pass(
    run: RunResults, columns: dict[str, _Column], cfg: ReduceConfig, mismatch: _Mismatch | None, st: _RunStats
) -> pa.Table:
    for c in columns.values():
        m = c.moments
        lo, hi = m.min, m.max
        if c.threshold is not None:
            lo, hi = min(lo, c.threshold.value), max(hi, c.threshold.value)
        c.edges = np.linspace(lo, hi, HISTOGRAM_BINS + 1)
        c.counts = np.zeros(HISTOGRAM_BINS, np.int64)
    kept: list[pa.Table] = []
    rules = _rule_names(columns, mismatch)
    for batch in run.batches(run.column_order):
        ok = ok_mask(batch)
        codes = _codes(batch, cfg.anomaly_label)
        fired: dict[str, np.ndarray] = {}
        for c in columns.values():
            assert c.edges is not None and c.counts is not None
            v = score_values(batch, c.name)
            valid = ok & np.isfinite(v)
            c.counts += np.histogram(v[valid], bins=c.edges)[0]
            if c.threshold is None:
                continue
            f = valid & c.threshold.beyond(v)
            fired[c.name] = f
            c.flagged += int(f.sum())
            c.confusion.update(f[valid], codes[valid])
        if mismatch is not None:
            lab, pred = _strings(batch.column("label")), _strings(batch.column("cam_pred"))
            audit = pc.and_(pc.is_in(lab, value_set=pa.array(sorted(mismatch.classes))), pc.not_equal(pred, lab))
            fired[MISMATCH] = ok & _bools(audit)
            st.mismatch_flagged += int(fired[MISMATCH].sum())
        any_flag = np.zeros(batch.num_rows, bool)
        for f in fired.values():
            any_flag |= f
        st.any_confusion.update(any_flag[ok], codes[ok])
        if any_flag.any():
            idx = np.flatnonzero(any_flag)
            table = pa.Table.from_batches([batch]).take(pa.array(idx))
            names = [[rules[k] for k, f in fired.items() if f[i]] for i in idx]
            kept.append(table.append_column("rules", pa.array(names, pa.list_(pa.string()))))
    if not kept:
        empty = pa.schema([run.parts[0].schema.field(n) for n in run.column_order])
        kept.append(empty.empty_table().append_column("rules", pa.array([], pa.list_(pa.string()))))
    return _rank(pa.concat_tables(kept, promote_options="permissive"), columns, mismatch)


def _rule_names(columns: Mapping[str, _Column], mismatch: _Mismatch | None) -> dict[str, str]:
    out = {c.name: f"{c.name}={c.threshold.rule}" for c in columns.values() if c.threshold is not None}
    if mismatch is not None:
        out[MISMATCH] = MISMATCH
    return out


def _rank(flagged: pa.Table, columns: Mapping[str, _Column], mismatch: _Mismatch | None) -> pa.Table:
    """Adds ``rank_<score>`` (1 = most anomalous of the run by that score; every
    more anomalous row is flagged too, so ranking the flagged rows is ranking
    the run) and ``rank`` (by the best per-score rank, then rules fired), sorted by rank."""
    n = flagged.num_rows
    names = flagged.column("rules").to_pylist()
    per_score: list[np.ndarray] = []
    thresholded = [c for c in columns.values() if c.threshold is not None]
    for c in thresholded:
        assert c.threshold is not None
        fired = np.array([f"{c.name}={c.threshold.rule}" in r for r in names], dtype=bool)
        v = np.asarray(flagged.column(c.name).to_numpy(zero_copy_only=False), dtype=np.float64)
        key = -v if c.direction == "high" else v
        per_score.append(_ranks(key, fired))
    if mismatch is not None and "cam_prob" in flagged.schema.names:
        fired = np.array([MISMATCH in r for r in names], dtype=bool)
        prob = np.nan_to_num(np.asarray(flagged.column("cam_prob").to_numpy(zero_copy_only=False), np.float64))
        per_score.append(_ranks(-prob, fired))
    keys = [c.name for c in thresholded] + ([MISMATCH] if mismatch is not None else [])
    big = np.iinfo(np.int64).max
    best = np.min(np.stack([np.where(r > 0, r, big) for r in per_score]), axis=0) if per_score else np.zeros(n)
    n_rules = np.array([len(r) for r in names], np.int64)
    ids = flagged.column("image_id").to_pylist()
    order = np.array(sorted(range(n), key=lambda i: (best[i], -n_rules[i], ids[i])), np.int64)
    flagged = flagged.take(pa.array(order, pa.int64()))
    for name, r in zip(keys, per_score, strict=True):
        flagged = flagged.append_column(f"rank_{name}", pa.array(r[order], pa.int64(), mask=r[order] == 0))
    flagged = flagged.append_column("n_rules", pa.array(n_rules[order], pa.int64()))
    return flagged.append_column("rank", pa.array(np.arange(1, n + 1), pa.int64()))


def _ranks(key: np.ndarray, fired: np.ndarray) -> np.ndarray:
    """int64 (n,): 1-based "min" rank of ``key`` ascending among ``fired`` rows, 0 elsewhere."""
    out = np.zeros(len(key), np.int64)
    idx = np.flatnonzero(fired)
    if len(idx):
        k = key[idx]
        out[idx] = np.searchsorted(np.sort(k), k, side="left") + 1
    return out


def _write_outputs(
    cfg: ReduceConfig,
    run: RunResults,
    columns: Mapping[str, _Column],
    flagged: pa.Table,
    st: _RunStats,
    skipped: Mapping[str, str],
    mismatch: _Mismatch | None,
    facts: ModelFacts,
    notes: list[str],
) -> dict[str, Any]:
    so = cfg.storage_options
    run_id = run.run.get("run_id") or (sorted(st.run_ids)[0] if len(st.run_ids) == 1 else None)
    model_version = run.run.get("model_version") or next(iter(st.versions), None)
    created = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    thresholds: dict[str, Any] = {
        "run_id": run_id,
        "model_version": model_version,
        "results": cfg.results,
        "created_at": created,
        "anomaly_label": cfg.anomaly_label,
        "thresholds": {name: {**c.threshold.to_json(), "run_id": run_id} for name, c in columns.items() if c.threshold},
        "skipped": dict(skipped),
    }
    if mismatch is not None:
        thresholds["label_audit"] = {
            "rule": MISMATCH,
            "description": "cam_pred != label, for rows whose label is a class of the CAM model",
            "classes": sorted(mismatch.classes),
            "classes_from": mismatch.source,
        }
    per_score: dict[str, Any] = {}
    for name, c in columns.items():
        entry: dict[str, Any] = {
            "rule": c.threshold.rule if c.threshold is not None else None,
            "flagged": c.flagged if c.threshold is not None else None,
            "scored": c.moments.n,
            "missing": c.n_missing,
        }
        auc = c.sample.metrics(c.direction)
        if auc is not None:
            entry.update(auc)
            if c.threshold is not None:
                entry.update(c.confusion.to_json())
        per_score[name] = entry
    n_errors = st.status.get("error", 0)
    summary: dict[str, Any] = {
        "run_id": run_id,
        "model_version": model_version,
        "results": cfg.results,
        "out": cfg.out,
        "created_at": created,
        "rows": st.rows,
        "parts": len(run.parts),
        "scored": st.ok,
        "errors": n_errors,
        "other_status": {k: v for k, v in st.status.items() if k not in ("ok", "error")},
        "error_reasons": dict(st.reasons.most_common(20)),
        "errors_per_shard": {s: {"rows": st.shard_rows[s], "errors": n} for s, n in st.shard_errors.most_common()},
        "flagged": {
            "overall": flagged.num_rows,
            "per_score": {name: c.flagged for name, c in columns.items() if c.threshold is not None}
            | ({MISMATCH: st.mismatch_flagged} if mismatch else {}),
        },
        "scores": per_score,
        "anomaly_columns": facts.anomaly_columns,
        "notes": notes,
        "labels": {"anomaly_label": cfg.anomaly_label, "labelled": st.n_labelled, "anomalies": st.n_anomalies},
        "skipped_scores": dict(skipped),
    }
    if st.n_anomalies and st.n_labelled > st.n_anomalies:
        summary["overall"] = st.any_confusion.to_json()
    buf = io.BytesIO()
    pq.write_table(flagged, buf)
    write_bytes(join(cfg.out, "flagged.parquet"), buf.getvalue(), so)
    write_json(join(cfg.out, "thresholds.json"), thresholds, so)
    if cfg.report:
        from jobs.report import ReportInput, write_report

        summary["report"] = join(cfg.out, "report.html")
        write_report(
            ReportInput(
                summary=summary,
                thresholds=thresholds,
                histograms={
                    n: (c.edges, c.counts) for n, c in columns.items() if c.edges is not None and c.counts is not None
                },
                flagged=flagged.slice(0, cfg.top_k),
                model_uri=facts.uri,
            ),
            summary["report"],
            so,
        )
    write_json(join(cfg.out, "summary.json"), _finite(summary), so)
    log(f"{st.rows} rows: {st.ok} scored, {n_errors} errors, {flagged.num_rows} flagged; outputs in {cfg.out}")
    return summary


def _finite(obj: Any) -> Any:
    """NaN/inf -> None, so summary.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj
