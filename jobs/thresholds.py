"""Global thresholds of score columns: exact, streaming, memory bounded by the tail.

Pure (no files, no Ray). A ``ThresholdFitter`` is fed the valid scores of one
column batch by batch, one pass over the data after another, until it is
``done``; the reducer drives the passes over the Parquet parts of a run, the
tests drive them over numpy arrays (``fit_threshold``).

Rules (``Rule.parse``), applied on the anomalous side of the score:

* ``quantile:Q`` -- ``numpy.quantile(scores, Q)`` ("high" scores) or
  ``numpy.quantile(scores, 1 - Q)`` ("low"), exactly (linear interpolation);
* ``sigma:K``    -- mean + K·std (or mean − K·std), std with ddof=0 as ``numpy.std``;
* ``iqr:K``      -- Q3 + K·IQR (or Q1 − K·IQR), Q1/Q3 exact as above;
* ``calibrated:Q`` -- the Q (or 1 − Q) quantile of the normal training scores
  stored in the model bundle (``bundle.calibration``);
* ``f1``         -- the threshold of best F1 against known anomalies.

An image is flagged when its score is strictly beyond the threshold
(``> t`` for "high", ``< t`` for "low"); ``Threshold.beyond`` is that test.

Why hand-written: exact order statistics of a column far larger than memory
are not in numpy/pyarrow (pyarrow's ``quantile`` and t-digest load or
approximate), so the selection below keeps only what it needs: the tail
beyond the quantile (``TailBuffer``, one pass) or, for quantiles in the middle
(IQR), a histogram refined pass by pass down to a bucket small enough to hold
(``RankSearch``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

Direction = Literal["high", "low"]

RULE_KINDS = ("quantile", "sigma", "iqr", "calibrated", "f1")
DEFAULT_PARAMS: dict[str, float | None] = {
    "quantile": 0.999,
    "sigma": 3.0,
    "iqr": 1.5,
    "calibrated": 0.999,
    "f1": None,
}
#: at most this many float64 values are held per column (16 MiB); beyond, the
#: histogram is refined once more instead
MAX_VALUES = 2**21
HISTOGRAM_BINS = 2**16


class ThresholdError(ValueError):
    """A rule cannot be applied to these scores (the message says why, on one line)."""


@dataclass(frozen=True)
class Rule:
    """A threshold rule: ``kind`` in ``RULE_KINDS`` and its parameter (None for f1)."""

    kind: str
    param: float | None = None

    @classmethod
    def parse(cls, text: str) -> Rule:
        """``"quantile"``, ``"quantile:0.99"``, ``"sigma:3"``, ``"iqr"``, ``"calibrated:0.99"``, ``"f1"``."""
        kind, _, value = text.strip().partition(":")
        kind = kind.strip().lower()
        if kind not in RULE_KINDS:
            raise ValueError(
                f"Unknown threshold rule {text!r}; expected one of {list(RULE_KINDS)} (e.g. quantile:0.99)."
            )
        if kind == "f1":
            if value:
                raise ValueError(f"Rule f1 takes no parameter. Received: {text!r}.")
            return cls("f1", None)
        if not value:
            return cls(kind, DEFAULT_PARAMS[kind])
        try:
            param = float(value)
        except ValueError as e:
            raise ValueError(f"Rule {kind} expects a number after ':'. Received: {text!r}.") from e
        return cls(kind, param)

    def __post_init__(self) -> None:
        p = self.param
        if self.kind in ("quantile", "calibrated") and (p is None or not 0.0 < p < 1.0):
            raise ValueError(f"Rule {self.kind}:Q needs 0 < Q < 1. Received: Q={p}.")
        if self.kind == "sigma" and (p is None or not math.isfinite(p) or p <= 0):
            raise ValueError(f"Rule sigma:K needs K > 0. Received: K={p}.")
        if self.kind == "iqr" and (p is None or not math.isfinite(p) or p < 0):
            raise ValueError(f"Rule iqr:K needs K >= 0. Received: K={p}.")

    def __str__(self) -> str:
        return self.kind if self.param is None else f"{self.kind}:{self.param:g}"

    @property
    def params(self) -> dict[str, float]:
        name = {"quantile": "q", "calibrated": "q", "sigma": "k", "iqr": "k"}.get(self.kind)
        return {name: float(self.param)} if name and self.param is not None else {}


@dataclass(frozen=True)
class Threshold:
    """A fitted threshold of one score column."""

    score: str
    rule: str  # e.g. "quantile:0.999"
    params: dict[str, float]
    value: float
    direction: Direction
    n: int  # scores the value was fitted on (this run's; the calibration's for "calibrated")
    details: dict[str, float] = field(default_factory=dict)  # mean/std, q1/q3, f1, ...

    def beyond(self, values: np.ndarray) -> np.ndarray:
        """values: float (n,) -> bool (n,): strictly beyond the threshold; NaN never is."""
        v = np.asarray(values, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            return v > self.value if self.direction == "high" else v < self.value

    def to_json(self) -> dict[str, Any]:
        return {
            "rule": self.rule,
            "params": self.params,
            "value": self.value,
            "direction": self.direction,
            "n": self.n,
            "details": self.details,
        }


# -- streaming pieces -------------------------------------------------------------------------


@dataclass
class Moments:
    """Count, mean, sum of squared deviations, min and max, merged batch by batch
    (Chan et al.'s parallel update: float64, no catastrophic cancellation)."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0
    min: float = math.inf
    max: float = -math.inf

    def update(self, values: np.ndarray) -> None:
        """values: finite float64 (k,)."""
        k = len(values)
        if k == 0:
            return
        mean_b = float(values.mean())
        m2_b = float(np.square(values - mean_b).sum())
        n = self.n + k
        delta = mean_b - self.mean
        self.mean += delta * k / n
        self.m2 += m2_b + delta * delta * self.n * k / n
        self.n = n
        self.min = min(self.min, float(values.min()))
        self.max = max(self.max, float(values.max()))

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.n) if self.n else math.nan


def quantile_ranks(n: int, q: float) -> tuple[int, int, float]:
    """numpy's "linear" method: (lower rank, upper rank, weight) of quantile q of n sorted values."""
    virtual = (n - 1) * q
    lo = min(max(math.floor(virtual), 0), n - 1)
    hi = min(lo + 1, n - 1)
    return lo, hi, virtual - lo


def lerp(a: float, b: float, t: float) -> float:
    """numpy's ``_lerp``, bit for bit (it switches form at t >= 0.5)."""
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


class TailBuffer:
    """The ``m`` largest (``side="high"``) or smallest values of a stream.

    Memory: at most ~2·m + one batch of candidates. Values that cannot enter
    the tail (not beyond the current m-th value) are dropped at once, so the
    per-batch cost is one comparison for almost every value.
    """

    def __init__(self, m: int, side: Direction) -> None:
        self.m = max(1, int(m))
        self.side = side
        self._parts: list[np.ndarray] = []
        self._size = 0
        self._bound = -math.inf  # m-th largest kept so far (in "high" orientation)

    def feed(self, values: np.ndarray) -> None:
        v = values if self.side == "high" else -values  # negation is exact: one code path
        cand = v[v > self._bound] if self._size >= self.m else v
        if len(cand):
            self._parts.append(np.array(cand, dtype=np.float64))
            self._size += len(cand)
        if self._size >= 2 * self.m:
            self._shrink()

    def _shrink(self) -> None:
        arr = np.concatenate(self._parts) if len(self._parts) > 1 else self._parts[0]
        if len(arr) > self.m:
            arr = np.partition(arr, len(arr) - self.m)[len(arr) - self.m :]
        self._parts, self._size = [arr], len(arr)
        if len(arr) >= self.m:
            self._bound = float(arr.min())

    def sorted(self) -> np.ndarray:
        """float64 (min(m, seen),) ascending in the original orientation."""
        if not self._parts:
            return np.zeros(0)
        self._shrink()
        arr = np.sort(self._parts[0])
        return arr if self.side == "high" else -arr[::-1]

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self._parts)


@dataclass
class _Interval:
    lo: float
    hi: float
    closed: bool  # hi belongs to the interval
    below: int  # values < lo
    count: int  # values in the interval
    counts: np.ndarray | None = None  # histogram pass
    uniques: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)  # collect pass

    @property
    def key(self) -> tuple[float, float, bool]:
        return (self.lo, self.hi, self.closed)

    def select(self, v: np.ndarray) -> np.ndarray:
        upper = v <= self.hi if self.closed else v < self.hi
        return v[(v >= self.lo) & upper]

    @property
    def atomic(self) -> bool:
        """At most a handful of representable floats: collect them, do not refine."""
        x = self.lo
        for _ in range(4):
            x = float(np.nextafter(x, math.inf))
        return self.hi <= x

    def edges(self, bins: int) -> np.ndarray:
        e = np.linspace(self.lo, self.hi, bins + 1)
        e[0], e[-1] = self.lo, self.hi
        return np.maximum.accumulate(e)


class RankSearch:
    """Exact order statistics (0-based ranks of the ascending order) of a stream
    of ``n`` values in [lo, hi], found pass by pass.

    Each pass either histograms the interval that holds a rank into ``bins``
    buckets (the next pass looks only inside the bucket holding the rank), or,
    once the interval holds at most ``max_values`` values (or only a few
    representable floats), collects its distinct values with their counts and
    reads the rank off. Memory: ``bins`` counters or ``max_values`` values per
    wanted rank. Values must be fed identically in every pass.
    """

    def __init__(
        self,
        ranks: Sequence[int],
        lo: float,
        hi: float,
        n: int,
        *,
        bins: int = HISTOGRAM_BINS,
        max_values: int = MAX_VALUES,
    ) -> None:
        if any(not 0 <= r < n for r in ranks):
            raise ValueError(f"ranks {list(ranks)} out of range for {n} values")
        self.bins, self.max_values = bins, max_values
        root = _Interval(lo, hi, True, 0, n)
        self.found: dict[int, float] = {}
        self._where: dict[int, _Interval] = {}
        for r in ranks:
            self._place(r, root)
        self.passes = 0
        self._start_pass()

    def _place(self, rank: int, iv: _Interval) -> None:
        if iv.lo == iv.hi:
            self.found[rank] = iv.lo
        else:
            self._where[rank] = iv

    def _active(self) -> list[_Interval]:
        out: dict[tuple[float, float, bool], _Interval] = {}
        for iv in self._where.values():
            out.setdefault(iv.key, iv)
        return list(out.values())

    def _start_pass(self) -> None:
        for iv in self._active():
            iv.uniques = []
            iv.counts = None if iv.count <= self.max_values or iv.atomic else np.zeros(self.bins, np.int64)
        self._edges = {iv.key: iv.edges(self.bins) for iv in self._active() if iv.counts is not None}

    @property
    def done(self) -> bool:
        return not self._where

    def feed(self, values: np.ndarray) -> None:
        """values: float64 (k,), every valid value of the stream once per pass."""
        for iv in self._active():
            sub = iv.select(values)
            if not len(sub):
                continue
            if iv.counts is not None:
                # side="right" - 1: bucket b holds edges[b] <= v < edges[b+1]; hi (closed) -> last
                idx = np.minimum(np.searchsorted(self._edges[iv.key], sub, side="right") - 1, self.bins - 1)
                iv.counts += np.bincount(idx, minlength=self.bins)
            else:
                iv.uniques.append(np.unique(sub, return_counts=True))
                if sum(len(u) for u, _ in iv.uniques) > 4 * max(1024, min(iv.count, self.max_values)):
                    iv.uniques = [_merge_uniques(iv.uniques)]

    def end_pass(self) -> None:
        self.passes += 1
        children: dict[tuple[float, float, bool, int], _Interval] = {}
        for rank, iv in list(self._where.items()):
            if iv.counts is None:
                uniq, cnt = _merge_uniques(iv.uniques)
                pos = np.searchsorted(np.cumsum(cnt), rank - iv.below, side="right")
                if pos >= len(uniq):
                    raise AssertionError("values changed between passes")  # internal invariant
                self.found[rank] = float(uniq[pos])
                del self._where[rank]
                continue
            cum = iv.below + np.cumsum(iv.counts)
            b = int(np.searchsorted(cum, rank, side="right"))
            edges = self._edges[iv.key]
            below = iv.below + (int(cum[b - 1] - iv.below) if b else 0)
            key = (float(edges[b]), float(edges[b + 1]), iv.closed and b == self.bins - 1, below)
            child = children.get(key) or _Interval(key[0], key[1], key[2], below, int(iv.counts[b]))
            children[key] = child
            del self._where[rank]
            self._place(rank, child)
        self._start_pass()


def _merge_uniques(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    if not parts:
        return np.zeros(0), np.zeros(0, np.int64)
    vals = np.concatenate([u for u, _ in parts])
    cnts = np.concatenate([c for _, c in parts])
    uniq, inv = np.unique(vals, return_inverse=True)
    return uniq, np.bincount(inv, weights=cnts, minlength=len(uniq)).astype(np.int64)


# -- the fitter ---------------------------------------------------------------------------------


class ThresholdFitter:
    """Fits one rule to one score column over as many passes as it needs.

    Drive it as: ``while not f.done: for batch in data: f.feed(values, labels); f.end_pass()``,
    then ``f.result()``. ``values`` are the valid (finite, status "ok") scores
    of a batch, float64 (k,); ``labels`` int8 (k,): 1 known anomaly, 0 known
    normal, -1 unknown (needed by ``f1`` only).

    ``n_upper`` bounds the number of values (e.g. the row count in the Parquet
    footers): it sizes the tail kept for a quantile in the first pass.
    """

    def __init__(
        self,
        score: str,
        rule: Rule,
        direction: Direction,
        *,
        n_upper: int,
        calibration: Mapping[str, Any] | None = None,
        anomaly_label: str = "anomaly",
        max_values: int = MAX_VALUES,
    ) -> None:
        if direction not in ("high", "low"):
            raise ValueError(f"{score}: direction must be 'high' or 'low'. Received: {direction!r}.")
        self.score, self.rule, self.direction = score, rule, direction
        self.anomaly_label = anomaly_label
        self.max_values = max_values
        self.moments = Moments()
        self.passes = 0
        self._result: Threshold | None = None
        self._tail: TailBuffer | None = None
        self._search: RankSearch | None = None
        self._labelled: list[tuple[np.ndarray, np.ndarray]] = []
        if rule.kind == "calibrated":
            self._result = self._calibrated(calibration)  # refuses before any data is read
        elif rule.kind == "quantile":
            m = _tail_size(n_upper, self.level)
            if m <= max_values:
                self._tail = TailBuffer(m, direction)

    @property
    def level(self) -> float:
        """The quantile level on the anomalous side: Q ("high") or 1 − Q ("low")."""
        q = float(self.rule.param or 0.0)
        return q if self.direction == "high" else 1.0 - q

    @property
    def done(self) -> bool:
        return self._result is not None

    def feed(self, values: np.ndarray, labels: np.ndarray | None = None) -> None:
        if self.passes == 0:
            self.moments.update(values)
            if self._tail is not None:
                self._tail.feed(values)
            if self.rule.kind == "f1" and labels is not None:
                known = labels >= 0
                if known.any():
                    self._labelled.append((values[known].astype(np.float64), labels[known] == 1))
        elif self._search is not None:
            self._search.feed(values)

    def end_pass(self) -> None:
        self.passes += 1
        if self.passes == 1:
            self._after_first_pass()
        elif self._search is not None:
            self._search.end_pass()
        if self._search is not None and self._search.done:
            self._result = self._from_ranks(self._search.found)
            self._search = None

    def result(self) -> Threshold:
        if self._result is None:
            raise RuntimeError(f"{self.score}: threshold not fitted yet (feed every pass until done)")
        return self._result

    # -- per rule
    def _after_first_pass(self) -> None:
        m, kind = self.moments, self.rule.kind
        where = f"{self.score}: rule {self.rule}"
        if m.n == 0:
            raise ThresholdError(f"{where}: no valid scores in the results (all null, NaN or status=error).")
        if m.min == m.max:
            raise ThresholdError(f"{where}: all {m.n} scores are equal ({m.min:g}); no threshold separates them.")
        if kind == "quantile":
            q = float(self.rule.param or 0.0)
            if m.n * (1.0 - q) < 1.0 - 1e-9:
                need = math.ceil(1.0 / (1.0 - q) - 1e-9)
                raise ThresholdError(
                    f"{where} needs at least {need} scores (1/(1-Q)); this run has {m.n}. "
                    f"Use a lower Q (e.g. quantile:{_lower_q(m.n)}) or another rule (sigma, iqr, calibrated)."
                )
        if kind == "sigma":
            k = float(self.rule.param or 0.0)
            sign = 1.0 if self.direction == "high" else -1.0
            self._result = self._make(m.mean + sign * k * m.std, {"mean": m.mean, "std": m.std})
        elif kind == "f1":
            self._result = self._f1()
        else:
            self._ranks = self._wanted_ranks()
            if self._tail is not None:
                self._result = self._from_ranks(self._from_tail(self._ranks))
            else:
                self._search = RankSearch(
                    sorted({r for lo, hi, _ in self._ranks for r in (lo, hi)}),
                    m.min,
                    m.max,
                    m.n,
                    max_values=self.max_values,
                )

    def _wanted_ranks(self) -> list[tuple[int, int, float]]:
        n = self.moments.n
        if self.rule.kind == "iqr":
            return [quantile_ranks(n, 0.25), quantile_ranks(n, 0.75)]
        return [quantile_ranks(n, self.level)]

    def _from_tail(self, ranks: list[tuple[int, int, float]]) -> dict[int, float]:
        assert self._tail is not None
        top, n = self._tail.sorted(), self.moments.n
        offset = n - len(top) if self.direction == "high" else 0
        out = {}
        for lo, hi, _ in ranks:
            for r in (lo, hi):
                assert 0 <= r - offset < len(top), "tail buffer too small"  # sized from n_upper
                out[r] = float(top[r - offset])
        return out

    def _from_ranks(self, found: dict[int, float]) -> Threshold:
        qs = [lerp(found[lo], found[hi], t) for lo, hi, t in self._ranks]
        if self.rule.kind == "quantile":
            return self._make(qs[0], {"level": self.level})
        q1, q3 = qs
        k, iqr = float(self.rule.param or 0.0), qs[1] - qs[0]
        value = q3 + k * iqr if self.direction == "high" else q1 - k * iqr
        return self._make(value, {"q1": q1, "q3": q3, "iqr": iqr})

    def _f1(self) -> Threshold:
        from sklearn.metrics import precision_recall_curve

        where = f"{self.score}: rule f1"
        if not self._labelled:
            raise ThresholdError(f"{where} needs labelled rows; no row of this run has a label.")
        s = np.concatenate([v for v, _ in self._labelled])
        y = np.concatenate([a for _, a in self._labelled])
        if not y.any():
            raise ThresholdError(
                f"{where} needs known anomalies (rows labelled {self.anomaly_label!r}); this run has none "
                f"among {len(y)} labelled rows."
            )
        if y.all():
            raise ThresholdError(f"{where} needs labelled normal rows too; all {len(y)} labelled rows are anomalies.")
        oriented = s if self.direction == "high" else -s
        precision, recall, cuts = precision_recall_curve(y, oriented)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)[:-1]
        best = int(np.argmax(f1))
        cut = float(cuts[best])  # sklearn flags oriented >= cut; we flag strictly beyond
        lower = oriented[oriented < cut]
        if len(lower):
            below = float(lower.max())
            t = (cut + below) / 2
            t = below if t >= cut else t  # adjacent floats: the midpoint rounded up
        else:
            t = float(np.nextafter(cut, -math.inf))
        value = t if self.direction == "high" else -t
        details = {
            "f1": float(f1[best]),
            "precision": float(precision[best]),
            "recall": float(recall[best]),
            "n_labelled": len(y),
            "n_anomalies": int(y.sum()),
        }
        return self._make(value, details, n=len(y))

    def _calibrated(self, calibration: Mapping[str, Any] | None) -> Threshold:
        where = f"{self.score}: rule {self.rule}"
        cal = (calibration or {}).get(self.score)
        if not cal or not cal.get("n") or not cal.get("quantiles"):
            raise ThresholdError(
                f"{where}: the model bundle has no calibration statistics for {self.score} "
                "(train the bundle with this detector, or pass --calibration MODEL_URI)."
            )
        quantiles = {float(k): float(v) for k, v in cal["quantiles"].items()}
        match = [v for k, v in quantiles.items() if abs(k - self.level) < 1e-9]
        if not match:
            raise ThresholdError(
                f"{where}: the calibration stores quantiles {sorted(quantiles)}, not {self.level:g}; "
                "use one of those levels."
            )
        if cal.get("min") == cal.get("max"):
            raise ThresholdError(f"{where}: all {cal['n']} calibration scores are equal; no threshold.")
        details = {"level": self.level, "calibration_mean": float(cal["mean"]), "calibration_std": float(cal["std"])}
        return self._make(match[0], details, n=int(cal["n"]))

    def _make(self, value: float, details: dict[str, float], n: int | None = None) -> Threshold:
        return Threshold(
            score=self.score,
            rule=str(self.rule),
            params=self.rule.params,
            value=float(value),
            direction=self.direction,
            n=self.moments.n if n is None else n,
            details={k: float(v) for k, v in details.items()},
        )


def _tail_size(n_upper: int, level: float) -> int:
    """Values to keep so that the order statistics of quantile ``level`` of any
    n <= n_upper values are among them (the need grows with n; +2 for rounding)."""
    if n_upper <= 0:
        return 1
    lo = math.floor((n_upper - 1) * level)
    return (n_upper - lo if level >= 0.5 else lo + 2) + 2


def _lower_q(n: int) -> str:
    """A quantile level this many scores support, for the hint in a refusal."""
    for q in ("0.99", "0.95", "0.9", "0.75"):
        if n * (1 - float(q)) >= 1:
            return q
    return "0.5"


def fit_threshold(
    score: str,
    values: np.ndarray,
    rule: Rule | str,
    direction: Direction,
    *,
    labels: np.ndarray | None = None,
    calibration: Mapping[str, Any] | None = None,
    batch_size: int = 100_000,
    max_values: int = MAX_VALUES,
) -> Threshold:
    """Fit a rule to in-memory scores, streamed in batches exactly as the reducer does.

    values: float (n,), NaN = missing; labels: int8 (n,) 1/0/-1 (see ``ThresholdFitter``).
    """
    rule = Rule.parse(rule) if isinstance(rule, str) else rule
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    lab = None if labels is None else np.asarray(labels, dtype=np.int8)[ok]
    v = v[ok]
    fitter = ThresholdFitter(score, rule, direction, n_upper=len(v), calibration=calibration, max_values=max_values)
    while not fitter.done:
        for start in range(0, max(len(v), 1), batch_size):
            sl = slice(start, start + batch_size)
            fitter.feed(v[sl], None if lab is None else lab[sl])
        fitter.end_pass()
    return fitter.result()
