"""One anomaly score from every detector's meaningful columns (numpy only: no TensorFlow).

Each fitted detector declares ``anomaly_columns_``: the columns that mean
something for the model it trained (``recon_error`` always; ``ae_kl`` only for a
VAE; ``cam_anomaly`` for a CAM with an anomaly class, ``cam_prob`` for one
without). The declaration is stored in the detector's ``meta.json``, so the
scoring actors, the reducer and the report read the same list.

The rule, in two steps:

1. **Tail probability per column**, against the held-out normal scores the
   detector stored at training (``calibration_["sample"]``, up to 1,000 sorted
   values): on the anomalous side, the share of calibration scores at least as
   extreme (plotting positions ``(m - i) / (m + 1)`` between the sorted values,
   linear in between). Above the calibration's 90th percentile on the anomalous
   side the tail is an exponential fitted to the exceedances (peaks over a
   threshold, the maximum-likelihood scale = their mean excess), so p keeps
   falling past the largest calibration score instead of flooring at
   ``1/(m + 1)``: an image far beyond every normal one ranks above one just
   beyond. An exponential, not a generalised Pareto: a shape fitted on
   ~50-100 exceedances is noise, and a negative one would put a hard end to the
   tail (p = 0).
2. **Cauchy combination** (Liu & Xie 2020, "Cauchy combination test", JASA
   115:393): ``T = mean_i tan((0.5 - p_i) pi)``, ``p = 0.5 - arctan(T) / pi``,
   each p_i first capped at ``P_CAP = 0.5``. When the p_i are uniform (normal
   images), the tail of T is that of a standard Cauchy both when the columns are
   independent and when they are one and the same, and close to it in between,
   so a small p reads as a probability without modelling how the detectors
   correlate; and p is led by the smallest p_i (about ``m * min p`` for one
   extreme column among m), so an image anomalous in one column only still
   scores high. The cap: a score on its normal side is no evidence that an
   image is normal, and uncapped, a p_i near 1 contributes ``cot(pi p_i) -> -inf``
   and cancels any other column: uniform noise scored by an autoencoder and an
   OCSVM got p ~ 1e-20 from the first, p = 1 from the second (noise has more HOG
   energy than any digit) and a fused score of 0. Capping moves the body of the
   null distribution (p <= 0.5 always), not its tail: on simulated normal rows
   (6 columns, independent, equicorrelated 0.6 or identical) the share with
   p < 0.001 stays 0.0010-0.0011 and with p < 0.01 0.0106-0.0112. Fisher's
   method would let several mildly high columns outvote one extreme one and
   assumes independence, which columns of one autoencoder do not have.

``anomaly_score = -log10(p)``: higher is more anomalous (at least
``log10(2)``), and a value reads the same across nights and bundles: 3 means
one normal image in 1,000 scores as high. Its tail is therefore known by
construction (``null_calibration``): the reducer's ``calibrated:0.999``
threshold on it is 3.0.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from detectors.base import CALIBRATION_QUANTILES, CALIBRATION_SAMPLE, Direction
from detectors.columns import ANOMALY_SCORE, COLUMNS

if TYPE_CHECKING:
    from detectors.base import BaseDetector

#: share of the calibration sample, on the anomalous side, that the exponential tail is fitted to
TAIL_FRACTION = 0.1
#: fewest exceedances an exponential tail is fitted to (fewer calibration scores: all of them)
MIN_TAIL = 5
#: p-values are kept in [P_FLOOR, 1]: -log10 stays finite (300 at most)
P_FLOOR = 1e-300
#: each column's p is capped here before combining: its normal side is no evidence (see above)
P_CAP = 0.5
#: the levels of anomaly_score's distribution on normal images that hold by construction (the tail)
NULL_LEVELS = tuple(q for q in CALIBRATION_QUANTILES if q >= 0.95)

#: score column -> its anomalous side, for every detector's columns
DIRECTIONS: dict[str, Direction] = {
    c.name: c.direction for cols in COLUMNS.values() for c in cols if c.direction is not None
}


class MissingDeclarationError(ValueError):
    """A detector (or bundle) was trained before detectors declared their anomaly columns."""


def tail_pvalue(values: np.ndarray, calibration: Mapping[str, Any], direction: Direction) -> np.ndarray:
    """float64 (n,) tail probabilities of ``values`` (any float (n,)) on the ``direction`` side
    of the calibration sample; NaN stays NaN.

    ``calibration`` is ``detectors.base.calibration_stats`` output (``sample`` sorted ascending).
    """
    sample = np.asarray(calibration.get("sample") or [], dtype=np.float64)
    if sample.size < 2:
        raise ValueError(
            f"Expected a calibration sample of at least 2 scores to read tail probabilities from. "
            f"Received: {sample.size} (a bundle trained before imgscan stored calibration samples)."
        )
    x = np.asarray(values, dtype=np.float64)
    if direction == "low":  # the low side of x is the high side of -x
        x, sample = -x, -sample[::-1]
    elif direction != "high":
        raise ValueError(f"Expected direction 'high' or 'low'. Received: {direction!r}.")
    m = sample.size
    tail = np.arange(m, 0, -1, dtype=np.float64) / (m + 1)  # (m - i) / (m + 1) at sample[i]
    p = np.interp(x, sample, tail, left=1.0, right=tail[-1])
    k = min(m, max(MIN_TAIL, math.ceil(TAIL_FRACTION * m)))
    u = sample[m - k]  # the threshold: k calibration scores lie at or above it
    scale = float(np.mean(sample[m - k :] - u))
    # equal exceedances (a discrete score): a scale of the data's spread, so p still falls beyond them
    scale = max(scale, 1e-9 * (abs(u) + float(np.std(sample)) + 1e-12))
    above = x > u
    p[above] = tail[m - k] * np.exp(-(x[above] - u) / scale)
    with np.errstate(invalid="ignore"):
        out = np.clip(p, P_FLOOR, 1.0)
    out[np.isnan(x)] = np.nan
    return out


def combine_pvalues(pvalues: Sequence[np.ndarray]) -> np.ndarray:
    """Cauchy combination of k arrays of float (n,) p-values, each capped at ``P_CAP``,
    -> float64 (n,) in (0, ``P_CAP``].

    Per row, NaN p-values are left out; a row with none is NaN. Computed with
    ``cot(pi p)`` and ``arctan(1/T)`` so that p-values down to ``P_FLOOR`` keep their
    precision (``tan((0.5 - p) pi)`` loses it below ~1e-16 in float64).
    """
    if not pvalues:
        raise ValueError("Expected at least one array of p-values. Received: none.")
    p = np.clip(np.stack([np.asarray(a, dtype=np.float64) for a in pvalues]), P_FLOOR, P_CAP)
    finite = np.isfinite(p)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(finite, 1.0 / np.tan(np.pi * p), 0.0).sum(axis=0) / finite.sum(axis=0)
        combined = np.where(t > 0, np.arctan(1.0 / t) / np.pi, 0.5 - np.arctan(t) / np.pi)
    combined = np.clip(combined, P_FLOOR, 1.0)
    combined[~finite.any(axis=0)] = np.nan
    return np.asarray(combined, dtype=np.float64)


def fuse(
    scores: Mapping[str, np.ndarray],
    calibration: Mapping[str, Mapping[str, Any]],
    columns: Iterable[str],
) -> np.ndarray:
    """float64 (n,) ``anomaly_score`` = -log10(combined tail p) of the named ``columns``.

    ``scores``: column -> float (n,); ``calibration``: column -> calibration statistics.
    """
    names = list(dict.fromkeys(columns))
    if not names:
        raise ValueError("Expected at least one anomaly column to fuse. Received: none.")
    missing = [c for c in names if c not in scores or c not in calibration]
    if missing:
        raise ValueError(
            f"Anomaly columns {missing} have no scores or no calibration. "
            f"Received scores for {sorted(scores)}, calibration for {sorted(calibration)}."
        )
    p = [tail_pvalue(np.asarray(scores[c], dtype=np.float64), calibration[c], DIRECTIONS[c]) for c in names]
    return -np.log10(combine_pvalues(p))


def anomaly_columns(detectors: Iterable[BaseDetector]) -> list[str]:
    """The declared anomaly columns of fitted detectors, in their order."""
    out: list[str] = []
    for det in detectors:
        declared = getattr(det, "anomaly_columns_", None)
        if declared is None:
            raise MissingDeclarationError(
                f"The {det.name} detector was trained before imgscan declared which of its scores mean "
                "something (no 'anomaly_columns' in its meta.json); retrain the bundle with 'imgscan train'."
            )
        out.extend(declared)
    return out


def anomaly_score(detectors: Iterable[BaseDetector], scores: Mapping[str, np.ndarray]) -> np.ndarray:
    """float64 (n,) fused score of fitted ``detectors`` from their merged ``score()`` outputs."""
    dets = list(detectors)
    calibration: dict[str, Any] = {}
    for det in dets:
        calibration.update(det.calibration_)
    return fuse(scores, calibration, anomaly_columns(dets))


def null_calibration() -> dict[str, Any]:
    """What is known of ``anomaly_score`` on normal images by construction: its upper
    quantiles (``NULL_LEVELS``: Q -> -log10(1 - Q)), in the layout of ``calibration_stats``.

    No sample, mean or standard deviation: the cap puts the body of the distribution
    where the detectors' dependence decides, so a KS statistic or a mean shift
    against a fixed null would report drift on normal nights.
    """
    return {
        "n": CALIBRATION_SAMPLE,
        # rounded so that 0.999 gives 3.0, not 2.9999999999999996
        "quantiles": {str(q): round(float(-np.log10(1.0 - q)), 12) for q in NULL_LEVELS},
        "min": float(-np.log10(P_CAP)),
        "max": float(-np.log10(P_FLOOR)),
        "source": "by construction: -log10 of a combined tail p-value, exact in the tail",
        "no_ks": "anomaly_score's body depends on how the detectors correlate: drift is read from each score",
    }


__all__ = [
    "ANOMALY_SCORE",
    "DIRECTIONS",
    "MissingDeclarationError",
    "anomaly_columns",
    "anomaly_score",
    "combine_pvalues",
    "fuse",
    "null_calibration",
    "tail_pvalue",
]
