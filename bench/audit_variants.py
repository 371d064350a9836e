"""Which out-of-fold probabilities and which cleanlab filter find the flipped labels best.

    PYTHONPATH=. python bench/audit_variants.py [--noise 0.05 0.10] [--seeds 0 1]

For each noise rate and seed: the data of ``bench/audit.py`` (1,797 digits at 32 px,
labels flipped at random, 20 planted conflicting copies), read as ``imgscan audit``
reads it, the K folds trained once exactly as the audit trains them (Ray tasks,
the audit's detector parameters and seed), cached under ``bench/out/audit_folds/``.
Then, on those same fold models, every combination of

* probabilities: ``plain`` (one pass over the held-out image) or ``tta`` (the mean over
  the shifted copies of ``jobs.audit.folds.TTA_SHIFTS``, the shifts the models trained with);
* cleanlab's ``filter_by`` (``jobs.audit.issues.FILTERS``),

is scored against the flipped set (precision, recall, over the original images, as
``bench/audit.py`` does). Training dominates; the evaluation takes seconds, so a new
variant costs no retraining. The table is printed and written to
``bench/out/audit_variants.md``.
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
import tempfile
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from bench.audit import key_of, make_set, score
from jobs.audit.blocks import decode_blocks
from jobs.audit.folds import FoldPlan, assign_folds, out_of_fold, run_folds
from jobs.audit.job import AuditConfig, log
from jobs.demo_data import write_folder
from jobs.sources import list_shards

CACHE = "bench/out/audit_folds"
FILTERS = (
    "prune_by_noise_rate",
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
    "low_normalized_margin",
    "low_self_confidence",
)


def train(noise: float, seed: int) -> dict[str, Any]:
    """Fold results and data for one (noise, seed), from the cache when present."""
    path = os.path.join(CACHE, f"noise{noise:.2f}_seed{seed}.pkl")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return pickle.load(f)  # our own cache
    data = make_set(noise, seed)
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as root:
            src = os.path.join(root, "src")
            write_folder(src, data["items"])
            cfg = AuditConfig(source=src, out=os.path.join(root, "out"), seed=seed)
            blocks = decode_blocks(list_shards(src), cfg.image_size, src, progress=log)
            names = [str(v) for v in blocks.labels]
            classes = sorted(set(names))
            labels = np.array([classes.index(v) for v in names], np.int64)
            fold_of = assign_folds(labels, cfg.folds, cfg.seed)
            # plain held-out probabilities from the tasks; every other variant is computed here
            plan = FoldPlan(labels, tuple(classes), fold_of, cfg.detector_params(blocks.channels), tta=False)
            results = run_folds(blocks, plan, progress=log)
            images = blocks.take(np.arange(len(blocks)))
            ids = blocks.ids
    finally:
        ray.shutdown()
    out = {
        "keys": [key_of(i) for i in ids],
        "labels": labels,
        "classes": classes,
        "images": images,
        "fold_of": fold_of,
        "results": results,
        "data": {k: data[k] for k in ("flipped", "pairs")},
    }
    os.makedirs(CACHE, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(out, f)
    return out


def tta_probs(run: dict[str, Any]) -> np.ndarray:
    """Out-of-fold probabilities averaged over the shifted copies: float32 (n, k)."""
    from detectors.cam import CamDetector
    from jobs.audit.folds import shifted_mean_probs

    n, k = len(run["labels"]), len(run["classes"])
    probs = np.zeros((n, k), np.float32)
    for r in run["results"]:
        det = CamDetector.from_files(r.model)
        probs[r.held] = shifted_mean_probs(det, run["images"][r.held])
    return probs


def flagged(labels: np.ndarray, probs: np.ndarray, filter_by: str) -> np.ndarray:
    from cleanlab.filter import find_label_issues

    p = np.asarray(probs, np.float64)
    p = p / p.sum(axis=1, keepdims=True)
    return np.asarray(find_label_issues(labels, p, filter_by=filter_by), bool)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.10])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    rows = []
    for seed in args.seeds:
        for noise in args.noise:
            run = train(noise, seed)
            plain = out_of_fold(run["results"], len(run["labels"]))
            variants = {"plain": plain, "tta": tta_probs(run)}
            truth = {"flipped": run["data"]["flipped"], "pairs": run["data"]["pairs"]}
            for pname, probs in variants.items():
                acc = float((probs.argmax(1) == run["labels"]).mean())
                for fb in FILTERS:
                    mask = flagged(run["labels"], probs, fb)
                    r = score({run["keys"][i] for i in np.flatnonzero(mask)}, truth)
                    rows.append((noise, seed, pname, acc, fb, r))
                    print(f"{noise:.0%} seed {seed} {pname} {fb}: {r}", file=sys.stderr, flush=True)
    lines = [
        "| noise | seed | probabilities | oof accuracy | filter_by | flagged | precision | recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for noise, seed, pname, acc, fb, r in rows:
        lines.append(
            f"| {noise:.0%} | {seed} | {pname} | {acc:.4f} | {fb} | {r['flagged']} | {r['precision']:.3f} "
            f"| {r['recall']:.3f} |"
        )
    table = "\n".join(lines)
    print(table)
    os.makedirs("bench/out", exist_ok=True)
    with open("bench/out/audit_variants.md", "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
