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
(``RankSearch``, on order-preserving integer keys of the floats).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detectors.base import Direction

RULE_KINDS = ("quantile", "sigma", "iqr", "calibrated", "f1")
DEFAULT_PARAMS: dict[str, float | None] = {
    "quantile": 0.999,
    "sigma": 3.0,
    "iqr": 1.5,
    "calibrated": 0.999,
    "f1": None,
}
#: a quantile's tail is kept in one pass when it holds at most this many float64
#: values (16 MiB); a larger tail is found by histogram refinement instead
MAX_VALUES = 2**21
#: exact quantiles in the middle (``RankSearch``): the first pass counts 2**20
#: buckets (8 MiB), later passes 2**16 within the bucket holding a rank; a bucket
#: of at most 2**18 values (2 MiB) is collected and the rank read off it
ROOT_BITS = 20
HISTOGRAM_BITS = 16
COLLECT_VALUES = 2**18


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


def order_keys(values: np.ndarray) -> np.ndarray:
    """float64 (k,) -> uint64 (k,) keys with the same order (IEEE 754 bits, sign
    folded), so buckets are integer ranges: no rounding at bucket edges."""
    u = np.ascontiguousarray(values, dtype=np.float64).view(np.uint64)
    flip = np.where(u >> np.uint64(63), np.uint64(0xFFFFFFFFFFFFFFFF), np.uint64(1 << 63))
    return u ^ flip


def key_value(key: int) -> float:
    """The float64 of an order key (inverse of ``order_keys``)."""
    u = key ^ (1 << 63) if key >= 1 << 63 else key ^ 0xFFFFFFFFFFFFFFFF
    return float(np.array([u], dtype=np.uint64).view(np.float64)[0])


@dataclass
class _Bucket:
    """Keys in [lo, lo + width); ``below`` values have smaller keys."""

    lo: int
    width: int
    below: int
    count: int
    shift: int = 0  # histogram: key -> (key - lo) >> shift
    counts: np.ndarray | None = None  # histogram pass
    keys: list[np.ndarray] = field(default_factory=list)  # collect pass

    def select(self, keys: np.ndarray) -> np.ndarray:
        off = keys - np.uint64(self.lo)  # wraps below lo: then >= width
        return off[off < np.uint64(self.width)] if self.width < 1 << 64 else off


class RankSearch:
    """Exact order statistics (0-based ranks of the ascending order) of a stream
    of values, found pass by pass in memory that does not grow with the stream.

    Values become order-preserving integer keys (``order_keys``). The first pass
    histograms the top ``root_bits`` bits of every key, before the ranks are
    known (so it rides along the pass that counts n). Then each pass looks only
    inside the bucket holding a rank: it collects that bucket's keys when they
    are at most ``max_values`` (the rank is read off the sorted bucket), else
    histograms it into ``2**bits`` finer buckets. A bucket one key wide is a
    value: at most 4 refinements, whatever the data (ties included).

    Memory: ``2**root_bits`` counters, then per rank ``2**bits`` counters or
    ``max_values`` keys. Every pass must see the same values.
    """

    def __init__(self, *, root_bits: int = ROOT_BITS, bits: int = HISTOGRAM_BITS, max_values: int = COLLECT_VALUES):
        self.bits, self.max_values = bits, max_values
        self._root = _Bucket(0, 1 << 64, 0, 0, shift=64 - root_bits, counts=np.zeros(1 << root_bits, np.int64))
        self.found: dict[int, float] = {}
        self._where: dict[int, _Bucket] = {}
        self.passes = 0

    @property
    def done(self) -> bool:
        return self.passes > 0 and not self._where

    def feed(self, values: np.ndarray) -> None:
        """values: float64 (k,), every valid value of the stream once per pass."""
        if not len(values):
            return
        keys = order_keys(values)
        buckets = [self._root] if self.passes == 0 else list({id(b): b for b in self._where.values()}.values())
        for b in buckets:
            off = b.select(keys)
            if not len(off):
                continue
            if b.counts is None:
                b.keys.append(off)
                continue
            idx = (off >> np.uint64(b.shift)).astype(np.int64)
            first = int(idx.min())  # add the batch's span only: a batch covers few buckets
            span = np.bincount(idx - first)
            b.counts[first : first + len(span)] += span

    def end_first_pass(self, ranks: Sequence[int]) -> None:
        """After pass 1 (``n`` = the values fed): place each wanted rank."""
        assert self._root.counts is not None, "end_first_pass called twice"
        self._root.count = int(self._root.counts.sum())
        for r in ranks:
            if not 0 <= r < self._root.count:
                raise ValueError(f"rank {r} out of range for {self._root.count} values")
        self._where = dict.fromkeys(ranks, self._root)
        self._descend()

    def end_pass(self) -> None:
        self._descend()

    def _descend(self) -> None:
        self.passes += 1
        children: dict[tuple[int, int], _Bucket] = {}
        for rank, b in list(self._where.items()):
            if b.counts is None:  # collected: read the rank off the sorted keys
                keys = np.sort(np.concatenate(b.keys)) if b.keys else np.zeros(0, np.uint64)
                if not 0 <= rank - b.below < len(keys):
                    raise AssertionError("values changed between passes")  # internal invariant
                self.found[rank] = key_value(int(keys[rank - b.below]) + b.lo)
                del self._where[rank]
                continue
            cum = np.cumsum(b.counts)
            i = int(np.searchsorted(cum, rank - b.below, side="right"))
            lo = b.lo + (i << b.shift)
            width = min(1 << b.shift, b.lo + b.width - lo)
            below = b.below + (int(cum[i - 1]) if i else 0)
            if width == 1:  # one key: the value itself
                self.found[rank] = key_value(lo)
                del self._where[rank]
                continue
            child = children.get((lo, width))
            if child is None:
                child = _Bucket(lo, width, below, int(b.counts[i]))
                if child.count > self.max_values:
                    child.shift = max(0, (width - 1).bit_length() - self.bits)
                    child.counts = np.zeros(((width - 1) >> child.shift) + 1, np.int64)
                children[(lo, width)] = child
            self._where[rank] = child
        self._root.counts = None  # the first pass's histogram is done with


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
        elif rule.kind == "quantile" and _tail_size(n_upper, self.level) <= max_values:
            # the side of the level, not of the score: quantile:0.01 of a "high" score is in its low tail
            self._tail = TailBuffer(_tail_size(n_upper, self.level), self._tail_side)
        if rule.kind == "iqr" or (rule.kind == "quantile" and self._tail is None):
            self._search = RankSearch(max_values=min(max_values, COLLECT_VALUES))

    @property
    def level(self) -> float:
        """The quantile level on the anomalous side: Q ("high") or 1 − Q ("low")."""
        q = float(self.rule.param or 0.0)
        return q if self.direction == "high" else 1.0 - q

    @property
    def _tail_side(self) -> Direction:
        """Where the order statistics of ``level`` lie: among the largest or the smallest values."""
        return "high" if self.level >= 0.5 else "low"

    @property
    def done(self) -> bool:
        return self._result is not None

    def feed(self, values: np.ndarray, labels: np.ndarray | None = None) -> None:
        if self.passes == 0:
            self.moments.update(values)
            if self._tail is not None:
                self._tail.feed(values)
            if self._search is not None:
                self._search.feed(values)
            if self.rule.kind == "f1" and labels is not None:
                known = labels >= 0
                if known.any():
                    self._labelled.append((values[known].astype(np.float64), labels[known] == 1))
        elif self._search is not None:
            self._search.feed(values)

    def end_pass(self) -> None:
        self.passes += 1
        if self.rule.kind == "calibrated":
            return  # fitted from the bundle when constructed; this run's scores are only counted
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
                assert self._search is not None
                self._search.end_first_pass(sorted({r for lo, hi, _ in self._ranks for r in (lo, hi)}))

    def _wanted_ranks(self) -> list[tuple[int, int, float]]:
        n = self.moments.n
        if self.rule.kind == "iqr":
            return [quantile_ranks(n, 0.25), quantile_ranks(n, 0.75)]
        return [quantile_ranks(n, self.level)]

    def _from_tail(self, ranks: list[tuple[int, int, float]]) -> dict[int, float]:
        assert self._tail is not None
        top, n = self._tail.sorted(), self.moments.n
        offset = n - len(top) if self._tail_side == "high" else 0
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
        details = {"level": self.level}
        if "mean" in cal and "std" in cal:  # anomaly_score's calibration is its tail alone
            details.update(calibration_mean=float(cal["mean"]), calibration_std=float(cal["std"]))
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
