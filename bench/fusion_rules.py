"""Re-fuse the scores ``bench/accuracy.py --keep DIR`` wrote, under other fusion rules, without refitting.

    PYTHONPATH=. python bench/fusion_rules.py DIR [DIR ...] [--rules ...] [--why N] [--without DETECTOR ...]
        [--calibration-from OTHER --for DETECTOR ...]
    PYTHONPATH=. python bench/fusion_rules.py --simulate

``detectors.fusion`` turns each declared column into a tail p-value against the
detector's held-out calibration sample and combines them (Cauchy). Its choices
are (1) how p extrapolates beyond the calibration sample's upper decile and (2)
how the p-values combine. Calibration samples are small on small archives (a
tenth of the training images: ~12 for one digit, 30 for a 300-crop texture; three
times that with ``--calibration-replicas 2``, off by default), so (1) decides how far
one column's fitted tail can be trusted. The rules compared:

* ``current``: what ``detectors.fusion`` does now (a generalised Pareto tail with
  its shape and scale integrated out, each detector one vote; see its docstring);
* ``columns``: the same tails, each column one vote (the rule until 2026-12-07);
* ``exponential``: the imgscan rule before 2026-12-03 (an exponential fitted to
  the top decile, at least ``MIN_TAIL`` scores, its scale their mean excess);
* ``predictive``: that exponential with only its rate integrated out (Jeffreys
  prior): ``p = p_u (1 + t/S)^-k`` for an excess t over the threshold u, S the
  k exceedances' summed excess (a Lomax tail);
* ``empirical``: no extrapolation (p floors at ``1/(m+1)`` beyond the sample);
* and, over ``predictive`` tails, two other combinations: ``fisher``
  (independence assumed) and ``bonferroni`` (min p times the number of columns).

Each kept run (``digitN`` or an archive) gives AUROCs: one per digit (the
digit against the others), one per archive and defect kind (its normal crops
against that kind's), and the share of normal test images whose fused p falls
below 0.1 / 0.01 / 0.001 (a p that reads as a probability keeps each share at
most its level; the body, above ~0.1, is not claimed: see ``P_CAP``).
``--simulate`` checks the tail rules where the truth is known: calibration
samples of 12-1,000 scores from light- and heavy-tailed distributions, and the
share of new scores of the same distribution whose p falls below 0.01 / 0.001.
``--why N`` prints, for the N normal images that score highest under the
current rule in each digit, which column's p led. ``--without D`` fuses as if
detector D had not been trained (its columns leave the fusion and the table): one
run with a new detector gives the fused score with and without it.
``--calibration-from OTHER --for D ...`` fuses with the calibration of detectors D
taken from OTHER, a kept run of the same seeds and splits whose scores are the
same (checked) but whose calibration was made otherwise (``--calibration-replicas
2``): what pooling replicas for those detectors only would give, without a refit.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats
from sklearn.metrics import roc_auc_score

from detectors import fusion
from detectors.fusion import DIRECTIONS, MIN_TAIL, P_CAP, P_FLOOR, combine_pvalues, fuse, tail_pvalue

TailRule = Callable[[np.ndarray, Mapping[str, Any], str], np.ndarray]


@dataclass
class Run:
    name: str  # digitN or an archive
    labels: np.ndarray  # str (n,): the digit, or "" (normal crop) / the defect kind
    scores: dict[str, np.ndarray]  # column -> float64 (n,)
    calibration: dict[str, dict[str, Any]]  # column -> calibration statistics
    groups: dict[str, list[str]]  # detector -> its declared columns (one vote each in the fusion)

    @property
    def columns(self) -> list[str]:
        """The declared anomaly columns, in the detectors' order."""
        return [c for g in self.groups.values() for c in g]


def load(directory: str, without: Sequence[str] = ()) -> list[Run]:
    """The kept runs of ``directory``; the detectors in ``without`` left out."""
    runs = []
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        stem = path[: -len(".json")]
        with open(path) as f:
            meta = {name: m for name, m in json.load(f).items() if name not in without}
        z = np.load(f"{stem}.npz")
        groups = {name: list(d["anomaly_columns"]) for name, d in meta.items()}
        calib = {c: s for d in meta.values() for c, s in d["calibration"].items()}
        scores = {k: z[k] for k in z.files if k in calib}
        runs.append(Run(os.path.basename(stem), z["labels"], scores, calib, groups))
    return runs


def borrow_calibration(runs: Sequence[Run], other: str, detectors: Sequence[str]) -> list[Run]:
    """``runs`` with the calibration of ``detectors``' columns read from the kept run ``other`` of
    the same name; its scores must be the same (the same fits), else this is an error."""
    donors = {r.name: r for r in load(other)}
    out = []
    for run in runs:
        donor = donors.get(run.name)
        if donor is None:
            raise SystemExit(f"--calibration-from {other}: no kept run {run.name!r} there")
        with open(os.path.join(other, f"{run.name}.json")) as f:
            meta = json.load(f)
        unknown = sorted(set(detectors) - set(meta))
        if unknown:
            raise SystemExit(f"--for {unknown[0]}: {other}/{run.name}.json has no such detector; it has {sorted(meta)}")
        calibration = dict(run.calibration)
        for name in detectors:
            for c in meta[name]["calibration"]:
                if c in run.scores and not np.allclose(run.scores[c], donor.scores[c], rtol=1e-4, atol=1e-6):
                    raise SystemExit(f"--calibration-from {other}: {run.name}'s {c} scores differ (not the same fits)")
                calibration[c] = donor.calibration[c]
        out.append(Run(run.name, run.labels, run.scores, calibration, run.groups))
    return out


def one_vs_rest(run: Run) -> bool:
    """A digits one-vs-rest run (labels are digits), not an archive with defects (normal rows
    labelled "", as ``bench/accuracy.py --archives aligned-digit1 ...`` keeps)."""
    return run.name.startswith("digit") and not np.any(run.labels == "")


def cells(run: Run) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(cell name, rows in the cell bool (n,), anomalous bool (n,)) of a run."""
    if one_vs_rest(run):
        d = run.name[len("digit") :]
        return [(run.name, np.ones(len(run.labels), bool), run.labels != d)]
    kinds = sorted(set(run.labels) - {""})
    return [(f"{run.name}/{k}", (run.labels == "") | (run.labels == k), run.labels == k) for k in kinds]


def _oriented(values: np.ndarray, calibration: Mapping[str, Any], direction: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(values, dtype=np.float64)
    sample = np.asarray(calibration["sample"], dtype=np.float64)
    return (-x, -sample[::-1]) if direction == "low" else (x, sample)


def empirical_tail(values: np.ndarray, calibration: Mapping[str, Any], direction: str) -> np.ndarray:
    x, sample = _oriented(values, calibration, direction)
    m = sample.size
    tail = np.arange(m, 0, -1, dtype=np.float64) / (m + 1)
    return np.asarray(np.interp(x, sample, tail, left=1.0, right=tail[-1]))


#: the share of the calibration the exponential tail was fitted to until 2026-12-03
OLD_TAIL_FRACTION = 0.1


def _tail_start(sample: np.ndarray, fraction: float | None = None) -> tuple[np.ndarray, int, float]:
    """(plotting positions (m,), k exceedances, threshold u) as detectors.fusion has them
    (or with another share of the sample in the tail)."""
    m = sample.size
    share = fusion.TAIL_FRACTION if fraction is None else fraction
    k = min(m, max(MIN_TAIL, math.ceil(share * m)))
    return np.arange(m, 0, -1, dtype=np.float64) / (m + 1), k, float(sample[m - k])


def exponential_tail(values: np.ndarray, calibration: Mapping[str, Any], direction: str) -> np.ndarray:
    x, sample = _oriented(values, calibration, direction)
    tail, k, u = _tail_start(sample, OLD_TAIL_FRACTION)
    p = np.interp(x, sample, tail, left=1.0, right=tail[-1])
    scale = max(float(np.mean(sample[-k:] - u)), 1e-9 * (abs(u) + float(np.std(sample)) + 1e-12))
    above = x > u
    p[above] = tail[-k] * np.exp(-(x[above] - u) / scale)
    return np.asarray(p)


def predictive_tail(values: np.ndarray, calibration: Mapping[str, Any], direction: str) -> np.ndarray:
    x, sample = _oriented(values, calibration, direction)
    tail, k, u = _tail_start(sample)
    p = np.interp(x, sample, tail, left=1.0, right=tail[-1])
    total = max(float(np.sum(sample[-k:] - u)), k * 1e-9 * (abs(u) + float(np.std(sample)) + 1e-12))
    above = x > u
    p[above] = tail[-k] * (1.0 + (x[above] - u) / total) ** (-k)
    return np.asarray(p)


def fisher(pvalues: Sequence[np.ndarray]) -> np.ndarray:
    p = np.clip(np.stack(pvalues), P_FLOOR, P_CAP)
    return np.asarray(stats.chi2.sf(-2 * np.log(p).sum(axis=0), 2 * len(pvalues)))


def bonferroni(pvalues: Sequence[np.ndarray]) -> np.ndarray:
    p = np.clip(np.stack(pvalues), P_FLOOR, P_CAP)
    return np.asarray(np.minimum(1.0, p.min(axis=0) * len(pvalues)))


RULES: dict[str, tuple[TailRule, Callable[[Sequence[np.ndarray]], np.ndarray]]] = {
    "current": (tail_pvalue, combine_pvalues),  # whatever detectors.fusion does now
    "columns": (tail_pvalue, combine_pvalues),  # the current tails, each column one vote (until 2026-12-07)
    "exponential": (exponential_tail, combine_pvalues),
    "predictive": (predictive_tail, combine_pvalues),
    "empirical": (empirical_tail, combine_pvalues),
    "fisher": (predictive_tail, fisher),
    "bonferroni": (predictive_tail, bonferroni),
}


def column_pvalues(run: Run, tail: TailRule) -> dict[str, np.ndarray]:
    return {c: tail(run.scores[c], run.calibration[c], DIRECTIONS[c]) for c in run.columns}


def fused(run: Run, rule: str) -> np.ndarray:
    """float64 (n,) -log10 of the combined p under ``rule``; "current" is ``detectors.fusion.fuse`` itself."""
    if rule == "current":
        return fuse(run.scores, run.calibration, run.groups)
    tail, combine = RULES[rule]
    p = column_pvalues(run, tail)
    return -np.log10(np.clip(combine(list(p.values())), P_FLOOR, 1.0))


def normal_rows(run: Run) -> np.ndarray:
    """bool (n,): the run's normal test images (its digit, or the archive's crops without a defect)."""
    return np.asarray(run.labels == (run.name[len("digit") :] if one_vs_rest(run) else ""))


def table(runs: Sequence[Run], rules: Sequence[str]) -> str:
    single = sorted({c for r in runs for c in r.columns}, key=lambda c: list(DIRECTIONS).index(c))
    best = "best single"  # the best declared column of each cell, as if one knew which in advance
    head = "| cell | " + " | ".join(rules) + " | " + " | ".join(single) + f" | {best} |"
    lines = [head, "|---|" + "---|" * (len(rules) + len(single) + 1)]
    sums: dict[str, list[float]] = {}
    for run in runs:
        scores = {rule: fused(run, rule) for rule in rules}  # once per run, not per cell
        for name, keep, y in cells(run):
            vals = {rule: roc_auc_score(y[keep], scores[rule][keep]) for rule in rules}
            for c in single:
                if c in run.columns:
                    s = run.scores[c][keep]
                    vals[c] = roc_auc_score(y[keep], -s if DIRECTIONS[c] == "low" else s)
                else:
                    vals[c] = float("nan")
            vals[best] = float(np.nanmax([vals[c] for c in single]))
            for k, v in vals.items():
                sums.setdefault(k, []).append(v)
            lines.append(f"| {name} | " + " | ".join(f"{vals[k]:.3f}" for k in [*rules, *single, best]) + " |")
    means = [float(np.nanmean(sums[k])) for k in [*rules, *single, best]]
    lines.append("| **mean** | " + " | ".join(f"**{v:.4f}**" for v in means) + " |")
    return "\n".join(lines)


def validity(runs: Sequence[Run], rules: Sequence[str], levels: Sequence[float] = (0.1, 0.01, 0.001)) -> str:
    """Share of the normal test images whose fused p is below each level (a valid p: at most the level),
    pooled over the runs, and per column (the current and the exponential tails)."""
    normal_p: dict[str, list[np.ndarray]] = {}
    for run in runs:
        normal = normal_rows(run)
        for rule in rules:
            normal_p.setdefault(rule, []).append(10 ** -fused(run, rule)[normal])
        for tail_name in ("current", "exponential"):
            for c, pv in column_pvalues(run, RULES[tail_name][0]).items():
                normal_p.setdefault(f"{tail_name}:{c}", []).append(pv[normal])
    lines = [
        "| normal images' p | n | " + " | ".join(f"< {a:g}" for a in levels) + " |",
        "|---|---|" + "---|" * len(levels),
    ]
    for key, parts in normal_p.items():
        p = np.concatenate(parts)
        lines.append(f"| {key} | {p.size} | " + " | ".join(f"{np.mean(p < a):.4f}" for a in levels) + " |")
    return "\n".join(lines)


SIMULATED: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "normal": lambda rng, n: rng.normal(size=n),
    "gamma(2)": lambda rng, n: rng.gamma(2.0, size=n),
    "chi2(1)": lambda rng, n: rng.chisquare(1, size=n),
    "lognormal": lambda rng, n: rng.lognormal(0.0, 1.0, size=n),
    "student t(3)": lambda rng, n: rng.standard_t(3, size=n),
}


def simulate(sizes: Sequence[int] = (12, 30, 100, 1000), repeats: int = 100, draws: int = 2000) -> str:
    """Validity of each tail rule where the truth is known: ``repeats`` calibration samples of m
    scores from a distribution, each followed by ``draws`` new scores of the same distribution;
    the share of new scores with p below 0.01 and 0.001 (a valid p: at most the level)."""
    from detectors.base import calibration_stats

    rules = ("current", "exponential", "predictive")
    head = "| m | scores | " + " | ".join(f"{r} < 0.01 | {r} < 0.001" for r in rules)
    head += " | current: -log10 p at 2x / 5x the sample's max (median) |"
    lines = [head, "|---|---|" + "---|" * (2 * len(rules) + 1)]
    rng = np.random.default_rng(0)
    for m in sizes:
        for name, draw in SIMULATED.items():
            p: dict[str, list[np.ndarray]] = {r: [] for r in rules}
            far = []
            for _ in range(repeats if m < 1000 else max(1, repeats // 10)):
                scores = draw(rng, m)
                cal = json.loads(json.dumps(calibration_stats(scores)))  # as stored in meta.json
                x = draw(rng, draws)
                for r in rules:
                    p[r].append(RULES[r][0](x, cal, "high"))
                top = float(scores.max())
                far.append(-np.log10(tail_pvalue(np.array([2 * top, 5 * top]), cal, "high")))
            cells = [f"{np.mean(np.concatenate(p[r]) < a):.4f}" for r in rules for a in (0.01, 0.001)]
            two, five = np.median(far, axis=0)
            lines.append(f"| {m} | {name} | " + " | ".join(cells) + f" | {two:.1f} / {five:.1f} |")
    return "\n".join(lines)


def why(runs: Sequence[Run], n: int, rule: str = "current") -> str:
    """For the ``n`` normal images of each digit run that the rule scores highest: the leading column and its p."""
    out = []
    tail, _ = RULES[rule]
    for run in runs:
        p = column_pvalues(run, tail)
        score = fused(run, rule)
        for name, keep, y in cells(run):
            normal = np.flatnonzero(keep & ~y)
            top = normal[np.argsort(-score[normal])[:n]]
            anomalous = keep & y
            for i in top:
                lead = min(p, key=lambda c: p[c][i])
                beats = float(np.mean(score[anomalous] < score[i]))
                out.append(
                    f"{name}: normal row {i} fused {score[i]:.2f} (above {100 * beats:.1f}% of anomalies), "
                    f"led by {lead} p={p[lead][i]:.2e} (m={run.calibration[lead]['n']})"
                )
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="*", help="directories written by bench/accuracy.py --keep")
    p.add_argument("--simulate", action="store_true", help="the tails' validity on simulated scores (no DIR needed)")
    p.add_argument("--rules", nargs="+", choices=list(RULES), default=list(RULES))
    p.add_argument("--tail-fraction", type=float, help=f"the share in the fitted tail (now {fusion.TAIL_FRACTION})")
    p.add_argument("--why", type=int, default=0, metavar="N", help="explain the N highest-scoring normal images")
    p.add_argument("--without", nargs="+", default=[], metavar="DETECTOR", help="fuse as if these were not trained")
    p.add_argument("--calibration-from", metavar="OTHER", help="a kept run of the same fits to take calibration from")
    p.add_argument("--for", dest="borrow", nargs="+", default=[], metavar="DETECTOR", help="whose calibration")
    args = p.parse_args(argv)
    if args.tail_fraction is not None:
        fusion.TAIL_FRACTION = args.tail_fraction
    if args.simulate:
        print(simulate())
    if not args.dirs:
        if not args.simulate:
            p.error("give DIR (from bench/accuracy.py --keep) or --simulate")
        return
    runs = [r for d in args.dirs for r in load(d, args.without)]
    if not runs:
        p.error(f"no kept runs (*.json + *.npz) in {args.dirs}")
    if bool(args.calibration_from) != bool(args.borrow):
        p.error("--calibration-from and --for go together")
    if args.calibration_from:
        runs = borrow_calibration(runs, args.calibration_from, args.borrow)
    print(table(runs, args.rules))
    print()
    print(validity(runs, args.rules))
    if args.why:
        print(why(runs, args.why), file=sys.stderr)


if __name__ == "__main__":
    main()
