"""One anomaly score from every detector's meaningful columns (numpy only: no TensorFlow).

Each fitted detector declares ``anomaly_columns_``: the columns that mean
something for the model it trained (``recon_error`` always; ``ae_kl`` only for a
VAE; ``cam_anomaly`` for a CAM with an anomaly class, ``cam_prob`` for one
without). The declaration is stored in the detector's ``meta.json``, so the
scoring actors, the reducer and the report read the same list.

The rule, in three steps:

1. **Tail probability per column**, against the held-out normal scores the
   detector stored at training (``calibration_["sample"]``, up to 1,000 sorted
   values): on the anomalous side, the share of calibration scores at least as
   extreme (plotting positions ``(m - i) / (m + 1)`` between the sorted values,
   linear in between). Above the calibration's 75th percentile on the anomalous
   side (at least ``MIN_TAIL`` scores) the tail is a generalised Pareto (peaks
   over a threshold) with its shape and scale *integrated out*, not fitted: the
   posterior predictive under a uniform prior on the shape xi in [0, 1] (0 = an
   exponential tail, 1 = a tail so heavy its mean is infinite) and the Jeffreys
   prior 1/sigma on the scale, summed on a grid (``TAIL_SHAPES`` x ``TAIL_SCALES``).
   So p keeps falling past the largest calibration score (an image far beyond
   every normal one ranks above one just beyond), but only as fast as the
   exceedances support: with hundreds of them (a calibration of 1,000) it is
   close to the best-fitting tail; with 5 (a detector trained on ~120 images holds
   out ~12; ``imgscan train --calibration-replicas 2`` pools the held-out scores of two
   replicas with them, ``jobs.train.calibration_replicas``: 36) it falls polynomially. Why: the
   exponential fitted to 5 exceedances (the rule until 2026-12-03) claimed
   p = 1e-16 for normal digits whose weak column (``gmm_local_loglik``) was
   heavier-tailed than 12 scores showed: on the digits bench 5.0% of the normal
   test digits got a fused p < 0.001 (0.1% by construction), and one-vs-rest
   AUROC for digit 2 was 0.910 while its best column had 1.000. With the
   integrated tail: 0.0% below 0.001, 0.56% below 0.01, digit 2 0.982, mean
   0.9857 -> 0.9956 (``bench/fusion_rules.py`` on ``bench/accuracy.py --only
   digits --keep DIR``). The top quarter, not the top tenth: more exceedances
   pin the shape down (on simulated gamma scores with 1,000 calibration scores,
   -log10 p at 5x the sample's maximum is 7.5 with a quarter, 5.9 with a tenth;
   new normal scores below p = 0.001: 0.0000-0.0015 with a quarter over five
   distributions and 12 to 1,000 scores, 0.0000-0.0010 with a tenth:
   ``bench/fusion_rules.py --simulate [--tail-fraction 0.1]``). Shapes below 0
   are left out: a bounded tail (p = 0 beyond its end) fitted on a few scores
   would put a hard end to the tail.
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
3. **One vote per detector.** Step 2 runs twice: over each detector's columns
   (one p per detector), then over the detectors. How many columns a detector
   reports is a choice of how it reports (a VAE adds ``ae_kl``, the whitening
   detector's second tail is declared only on textures), not how much evidence it
   holds; with one vote per column, a detector with two columns weighed twice as
   much as one with a single column, and which one won depended on the task. The
   combined p stays a probability (each detector's p does, and the Cauchy
   combination of valid p-values is valid). Measured on the kept scores of
   ``bench/accuracy.py --keep DIR`` runs (2026-12-07; ``bench/fusion_rules.py DIR
   --rules current columns``), one vote per column -> per detector: texture table
   mean 0.8508 -> 0.8548; the five held-out archives 0.8373 -> 0.8500; an aligned
   archive with local defects (``--archives aligned-digit1 aligned-digit3
   aligned-digit8``) 0.9321 -> 0.9492; digits one-vs-rest 0.9939 -> 0.9916 (there the
   mixture's strong global column now shares its vote with its weak local one, and
   the CAM and the OCSVM count more).

``anomaly_score = -log10(p)``: higher is more anomalous (at least
``log10(2)``), and a value reads the same across nights and bundles: 3 means
at most one normal image in 1,000 scores as high (fewer when the calibration
is small: the tail then claims only what its scores support). Its tail is
therefore known by construction (``null_calibration``): the reducer's ``calibrated:0.999``
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

#: share of the calibration sample, on the anomalous side, that the tail is read from (at least ``MIN_TAIL``)
TAIL_FRACTION = 0.25
#: fewest exceedances the tail is fitted to (fewer calibration scores: all of them)
MIN_TAIL = 5
#: the tail's generalised Pareto shapes, integrated over with equal prior weight (0: exponential)
TAIL_SHAPES = np.linspace(0.0, 1.0, 11)
#: its scales, in units of the exceedances' mean excess, evenly spaced in log (the Jeffreys prior 1/sigma)
TAIL_SCALES = np.geomspace(0.02, 50.0, 60)
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
    above = x > u
    if above.any():
        excess = sample[m - k :] - u
        # equal exceedances (a discrete score): a scale of the data's spread, so p still falls beyond them
        unit = max(float(np.mean(excess)), 1e-9 * (abs(u) + float(np.std(sample)) + 1e-12))
        # p at u as the body reads it (with ties at u, np.interp takes the last of them), so p
        # does not rise as x passes u
        p_u = float(np.interp(u, sample, tail))
        p[above] = p_u * _predictive_survival((x[above] - u) / unit, excess / unit)
    with np.errstate(invalid="ignore"):
        out = np.clip(p, P_FLOOR, 1.0)
    out[np.isnan(x)] = np.nan
    return out


def _gpd_log_survival(t: np.ndarray, xi: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """log P(excess > t) of generalised Paretos, broadcast over t, xi (>= 0) and sigma (> 0)."""
    z = t / sigma
    safe = np.where(xi > 0, xi, 1.0)
    return np.asarray(np.where(xi > 0, -np.log1p(safe * z) / safe, -z))


def _predictive_survival(t: np.ndarray, excess: np.ndarray) -> np.ndarray:
    """float64 (n,): P(excess > t) for excesses t (n,) >= 0, under the generalised Pareto posterior
    of the observed ``excess`` (k,) (both in units of the observed mean excess), on the grid."""
    grid_xi, grid_sigma = np.meshgrid(TAIL_SHAPES, TAIL_SCALES, indexing="ij")
    xi, sigma = grid_xi.ravel(), grid_sigma.ravel()
    # the density is the survival to the power 1 + xi over sigma: log f = (1 + xi) log S - log sigma
    log_surv = _gpd_log_survival(excess[None, :], xi[:, None], sigma[:, None])
    log_pdf = (1.0 + xi[:, None]) * log_surv - np.log(sigma)[:, None]
    # the grid is uniform in log sigma, so its cells already carry the Jeffreys prior 1/sigma
    log_post = log_pdf.sum(axis=1)
    weight = np.exp(log_post - log_post.max())
    keep = weight > 1e-12 * weight.sum()  # the cells that matter (a few hundred of 660)
    weight = weight[keep] / weight[keep].sum()
    surv = np.exp(_gpd_log_survival(t[:, None], xi[keep][None, :], sigma[keep][None, :]))
    return np.asarray(surv @ weight)


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
    columns: Iterable[str] | Mapping[str, Iterable[str]],
) -> np.ndarray:
    """float64 (n,) ``anomaly_score`` = -log10(combined tail p) of the named ``columns``.

    ``scores``: column -> float (n,); ``calibration``: column -> calibration statistics;
    ``columns``: grouped by the model that made them (``{detector: [column, ...]}``: each
    model one vote, its columns first combined into one p), or flat (each column one vote).
    """
    groups = (
        {g: list(dict.fromkeys(cols)) for g, cols in columns.items()}
        if isinstance(columns, Mapping)
        else {c: [c] for c in dict.fromkeys(columns)}
    )
    groups = {g: cols for g, cols in groups.items() if cols}
    names = [c for cols in groups.values() for c in cols]
    if not names:
        raise ValueError("Expected at least one anomaly column to fuse. Received: none.")
    missing = [c for c in names if c not in scores or c not in calibration]
    if missing:
        raise ValueError(
            f"Anomaly columns {missing} have no scores or no calibration. "
            f"Received scores for {sorted(scores)}, calibration for {sorted(calibration)}."
        )
    votes = [
        combine_pvalues(
            [tail_pvalue(np.asarray(scores[c], dtype=np.float64), calibration[c], DIRECTIONS[c]) for c in cols]
        )
        for cols in groups.values()
    ]
    return -np.log10(combine_pvalues(votes))


def anomaly_columns(detectors: Iterable[BaseDetector]) -> dict[str, tuple[str, ...]]:
    """The declared anomaly columns of fitted detectors: detector name -> its columns, in order."""
    out: dict[str, tuple[str, ...]] = {}
    for det in detectors:
        declared = getattr(det, "anomaly_columns_", None)
        if declared is None:
            raise MissingDeclarationError(
                f"The {det.name} detector was trained before imgscan declared which of its scores mean "
                "something (no 'anomaly_columns' in its meta.json); retrain the bundle with 'imgscan train'."
            )
        out[det.name] = tuple(declared)
    return out


def anomaly_score(detectors: Iterable[BaseDetector], scores: Mapping[str, np.ndarray]) -> np.ndarray:
    """float64 (n,) fused score of fitted ``detectors`` from their merged ``score()`` outputs
    (each detector one vote)."""
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
        "source": "by construction: -log10 of a combined tail p-value (normal images pass Q at most 1 - Q of the time)",
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
