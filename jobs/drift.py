"""How far a batch of scores has moved from a bundle's calibration (no Ray, no storage).

Per score column, against the calibration statistics a detector stored when it
was trained (``detectors.base.calibration_stats``: held-out normal scores):

* ``beyond`` / ``expected``: the share of tonight's scores beyond the calibrated
  threshold (the calibration's Q quantile on the anomalous side) against the
  share a normal night has there (1 - Q); ``ratio`` is the one over the other;
* ``ks``: the two-sample Kolmogorov-Smirnov statistic between tonight's scores
  and the calibration sample, with its asymptotic p-value (scipy's ``kstwo``,
  as ``scipy.stats.ks_2samp(method="asymp")`` computes it);
* ``shift``: the mean's move in calibration standard deviations, positive
  towards the anomalous side.

``DriftMeter`` streams: a night of millions of scores is fed batch by batch and
held as counts at the calibration sample's points (at most 1,000), which is
enough for the exact KS statistic -- both empirical CDFs are step functions, so
their largest gap is at a calibration point or just before one. That is why this
is written here instead of calling ``ks_2samp``, which needs both samples whole.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from detectors.base import Direction

#: the calibrated threshold's level (the reducer's ``calibrated`` rule default)
LEVEL = 0.999
#: a score has drifted when its KS statistic is at least this ...
DRIFT_KS = 0.1
#: ... and the KS test rejects "same distribution" at this p-value
DRIFT_P = 1e-3


@dataclass
class DriftMeter:
    """One score's drift from its calibration; ``feed`` batches, then ``result``."""

    score: str
    direction: Direction
    calibration: Mapping[str, Any]
    level: float = LEVEL
    n: int = 0
    beyond: int = 0
    total: float = 0.0
    _le: np.ndarray = field(init=False, repr=False)  # tonight's scores <= each calibration point
    _lt: np.ndarray = field(init=False, repr=False)  # ... < each calibration point
    _points: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        cal = self.calibration
        q = self.level if self.direction == "high" else 1.0 - self.level
        quantiles = cal.get("quantiles") or {}
        self.threshold = float(quantiles[str(round(q, 6))]) if str(round(q, 6)) in quantiles else math.nan
        self._points = np.sort(np.asarray(cal.get("sample") or [], dtype=np.float64))
        self._le = np.zeros(len(self._points), np.int64)
        self._lt = np.zeros(len(self._points), np.int64)

    def feed(self, values: np.ndarray) -> None:
        """values: float (k,) of tonight's scores; NaN/inf are left out."""
        v = np.sort(np.asarray(values, dtype=np.float64)[np.isfinite(values)])
        if not v.size:
            return
        self.n += int(v.size)
        self.total += float(v.sum())
        if math.isfinite(self.threshold):
            side = v > self.threshold if self.direction == "high" else v < self.threshold
            self.beyond += int(side.sum())
        self._le += np.searchsorted(v, self._points, side="right")
        self._lt += np.searchsorted(v, self._points, side="left")

    def ks(self) -> tuple[float, float] | None:
        """(statistic, p-value) of tonight against the calibration sample, or None."""
        m = len(self._points)
        if self.n == 0 or m == 0:
            return None
        g_le = np.searchsorted(self._points, self._points, side="right") / m
        g_lt = np.searchsorted(self._points, self._points, side="left") / m
        d = float(max(np.max(np.abs(self._le / self.n - g_le)), np.max(np.abs(self._lt / self.n - g_lt))))
        from scipy.stats import kstwo

        m_real = int(self.calibration.get("n") or m)
        en = self.n * m_real / (self.n + m_real)
        return d, float(kstwo.sf(d, max(1, round(en))))

    def result(self) -> dict[str, Any]:
        """JSON-ready figures (None where they cannot be computed)."""
        out: dict[str, Any] = {"n": self.n, "direction": self.direction, "threshold": _num(self.threshold)}
        expected = 1.0 - self.level
        share = self.beyond / self.n if self.n and math.isfinite(self.threshold) else None
        out.update(beyond=self.beyond, share=share, expected=expected)
        out["ratio"] = None if share is None else share / expected
        mean, std = self.calibration.get("mean"), self.calibration.get("std")
        if self.n and mean is not None and std:
            shift = (self.total / self.n - float(mean)) / float(std)
            out["shift"] = shift if self.direction == "high" else -shift
        else:
            out["shift"] = None
        ks = self.ks()
        out["ks"], out["ks_p"] = (None, None) if ks is None else ks
        out["drifted"] = bool(ks is not None and ks[0] >= DRIFT_KS and ks[1] < DRIFT_P)
        if ks is None and self.n:
            out["note"] = self.calibration.get("no_ks") or (
                "no calibration sample in the bundle (trained before imgscan stored one): no KS statistic"
            )
        return out


def _num(x: float) -> float | None:
    return x if math.isfinite(x) else None
