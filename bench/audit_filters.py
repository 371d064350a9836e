"""Which cleanlab filter, checked on label-noise tasks the image bench does not have.

    PYTHONPATH=. python bench/audit_filters.py [--seeds 0 1 2] [--noise 0.05 0.1 0.2]

``bench/audit.py`` measures the audit on digits with labels flipped uniformly at
random; ``bench/audit_variants.py`` compares cleanlab's filters on its fold models.
A filter chosen there could win on that task alone. This checks the choice, in
seconds and without TensorFlow, on tasks it did not see:

* datasets: the tabular sets scikit-learn ships (wine, breast_cancer, iris) and
  the digits' raw pixels;
* noise: ``uniform`` (a flipped label goes to any other class) and ``pairwise``
  (class c always goes to one other class, c+1 mod k: the confusable-pair noise of
  real annotators), at each rate;
* probabilities: out-of-fold (5 stratified folds) from two model families,
  LogisticRegression and RandomForest.

For every cell, each filter of ``FILTERS`` gets precision, recall and F1 against the
flipped set; the table gives the mean over the seeds and the number of cells where
each filter reaches precision >= 0.9 and recall >= 0.9. Printed and written to
``bench/out/audit_filters.md``.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
from cleanlab.count import num_label_issues
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

#: cleanlab's filter_by values, and ``calibrated_rank``: the lowest self-confidence scores,
#: as many as cleanlab's ``num_label_issues(estimation_method="off_diagonal_calibrated")``
#: (the cut-off cleanlab's docs give for its ranking functions)
FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "calibrated_rank")
DATASETS: dict[str, Callable[[], tuple[np.ndarray, np.ndarray]]] = {
    "wine": lambda: load_wine(return_X_y=True),
    "breast_cancer": lambda: load_breast_cancer(return_X_y=True),
    "iris": lambda: load_iris(return_X_y=True),
    "digits": lambda: load_digits(return_X_y=True),
}


def flip(y: np.ndarray, rate: float, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(given labels, bool mask of the flipped): ``rate`` of the labels moved to another class."""
    k = int(y.max()) + 1
    given = y.copy()
    idx = rng.choice(len(y), round(rate * len(y)), replace=False)
    for i in idx:
        given[i] = (y[i] + 1) % k if kind == "pairwise" else rng.choice([c for c in range(k) if c != y[i]])
    mask = np.zeros(len(y), bool)
    mask[idx] = True
    return given, mask


def flag(given: np.ndarray, probs: np.ndarray, rule: str) -> np.ndarray:
    """bool (n,): the examples ``rule`` (one of ``FILTERS``) flags."""
    if rule != "calibrated_rank":
        return np.asarray(find_label_issues(given, probs, filter_by=rule), bool)
    n = num_label_issues(given, probs, estimation_method="off_diagonal_calibrated")
    out = np.zeros(len(given), bool)
    out[np.argsort(get_label_quality_scores(given, probs, method="self_confidence"), kind="stable")[:n]] = True
    return out


def models(seed: int) -> dict[str, object]:
    return {
        "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        "forest": RandomForestClassifier(n_estimators=100, random_state=seed, n_jobs=-1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    args = ap.parse_args()
    t0 = time.monotonic()
    # (dataset, noise kind, rate, model) -> filter -> list of (precision, recall) over seeds
    cells: dict[tuple[str, str, float, str], dict[str, list[tuple[float, float]]]] = {}
    for name, load in DATASETS.items():
        x, y = load()
        for kind in ("uniform", "pairwise"):
            for rate in args.noise:
                for seed in args.seeds:
                    given, truth = flip(y, rate, kind, np.random.default_rng(seed))
                    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
                    for mname, model in models(seed).items():
                        probs = cross_val_predict(model, x, given, cv=folds, method="predict_proba")
                        for f in FILTERS:
                            found = flag(given, probs, f)
                            tp = int((found & truth).sum())
                            p = tp / max(int(found.sum()), 1)
                            r = tp / max(int(truth.sum()), 1)
                            cells.setdefault((name, kind, rate, mname), {}).setdefault(f, []).append((p, r))
        print(f"{name}: done ({time.monotonic() - t0:.0f}s)", flush=True)

    lines = [
        "| dataset | noise | rate | model | " + " | ".join(f"{f} P / R" for f in FILTERS) + " |",
        "|---|---|---|---|" + "---|" * len(FILTERS),
    ]
    wins = {f: 0 for f in FILTERS}
    f1 = {f: [] for f in FILTERS}  # type: dict[str, list[float]]
    for (name, kind, rate, mname), per in cells.items():
        row = []
        for f in FILTERS:
            p, r = np.mean(per[f], axis=0)
            row.append(f"{p:.3f} / {r:.3f}")
            wins[f] += int(p >= 0.9 and r >= 0.9)
            f1[f].append(2 * p * r / (p + r) if p + r else 0.0)
        lines.append(f"| {name} | {kind} | {rate:.0%} | {mname} | " + " | ".join(row) + " |")
    lines.append("")
    lines.append(f"cells (mean over seeds {args.seeds}): {len(cells)}")
    for f in FILTERS:
        lines.append(f"{f}: precision and recall >= 0.9 in {wins[f]} cells; mean F1 {np.mean(f1[f]):.3f}")
    lines.append(f"({time.monotonic() - t0:.0f}s, load average {os.getloadavg()[0]:.1f})")
    from bench.audit import publish  # here: importing it loads jobs/, which flag()'s users need not

    publish("\n".join(lines), "audit_filters")


if __name__ == "__main__":
    main()
