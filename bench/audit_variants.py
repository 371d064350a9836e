"""Which out-of-fold probabilities and which cleanlab filter find the flipped labels best.

    PYTHONPATH=. python bench/audit.py --seed N --keep DIR      # trains, keeps every audit
    PYTHONPATH=. python bench/audit_variants.py DIR [DIR ...]   # seconds: no training

For every audit kept by ``bench/audit.py --keep`` (``DIR/noise0.05_seed0/{src,out}``):
the same fold models (``out/folds/fold-K``), each scoring the images it held out,
as

* ``plain``: one pass over each held-out image;
* ``tta``: the mean over the image and its shifted copies (``jobs.audit.folds.shifted_mean_probs``,
  what the audit writes to ``out_of_fold.parquet``; checked to agree with it),

each fed to cleanlab's ``find_label_issues`` with every ``filter_by`` in ``FILTERS``,
then scored against the flipped set as ``bench/audit.py`` scores (precision and recall
over the original images; the truth is rebuilt from the noise rate and seed). The
table is printed and written to ``bench/out/audit_variants.md``.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pyarrow.parquet as pq

from bench.audit import key_of, make_set, publish, score
from bench.audit_filters import flag
from jobs.audit.blocks import assemble, decode_shard
from jobs.sources import list_shards
from jobs.storage import join, read_bytes

FILTERS = (
    "prune_by_noise_rate",  # cleanlab's default
    "prune_by_class",
    "both",
    "confident_learning",
    "predicted_neq_given",
    "low_normalized_margin",
    "low_self_confidence",
    "calibrated_rank",  # bench/audit_filters.py: cleanlab's calibrated count cut from its ranking
    "oracle_cut",  # not a rule: as many of the lowest self-confidences as there are flips (the ranking's quality)
)


def load(run: str) -> dict[str, Any]:
    """One kept audit: its ids, labels, folds, written probabilities, model inputs and models."""
    from detectors.cam import CamDetector

    src, out = join(run, "src"), join(run, "out")
    oof = pq.read_table(io.BytesIO(read_bytes(join(out, "out_of_fold.parquet")))).to_pylist()
    decoded = [decode_shard(s, 32) for s in list_shards(src)]
    ids = [i for facts, _ in decoded for i in facts.ids]
    if [key_of(i) for i in ids] != [key_of(r["image_id"]) for r in oof]:
        raise SystemExit(f"{run}: the source's images are not the audit's")
    classes = sorted({r["given_label"] for r in oof})
    folds = sorted({r["fold"] for r in oof})
    return {
        "keys": [key_of(i) for i in ids],
        "labels": np.array([classes.index(r["given_label"]) for r in oof], np.int64),
        "fold_of": np.array([r["fold"] for r in oof], np.int64),
        "written": np.array([r["probs"] for r in oof], np.float32),
        "images": assemble([px for _, px in decoded], max(f.channels for f, _ in decoded)),
        "models": {
            f: CamDetector.from_files(
                {name: read_bytes(join(out, "folds", f"fold-{f}", name)) for name in ("model.keras", "meta.json")}
            )
            for f in folds
        },
    }


def variants(run: dict[str, Any]) -> dict[str, np.ndarray]:
    """Out-of-fold probabilities of each variant: float32 (n, k)."""
    from jobs.audit.folds import shifted_mean_probs

    out = {name: np.zeros_like(run["written"]) for name in ("plain", "tta")}
    for f, det in run["models"].items():
        held = np.flatnonzero(run["fold_of"] == f)
        out["plain"][held] = det.predict_embeddings(run["images"][held])[0]
        out["tta"][held] = shifted_mean_probs(det, run["images"][held])
    return out


def flagged(labels: np.ndarray, probs: np.ndarray, filter_by: str, originals: np.ndarray, flips: int) -> np.ndarray:
    """bool (n,): what ``filter_by`` flags; ``oracle_cut``: the ``flips`` lowest self-confidences
    among the ``originals`` (bool (n,)), the best any cut of the ranking can do."""
    p = np.asarray(probs, np.float64)
    p = p / p.sum(axis=1, keepdims=True)  # as jobs.audit.issues.find_issues does
    if filter_by != "oracle_cut":
        return flag(labels, p, filter_by)
    quality = np.where(originals, p[np.arange(len(labels)), labels], np.inf)
    out = np.zeros(len(labels), bool)
    out[np.argsort(quality, kind="stable")[:flips]] = True
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="--keep directories of bench/audit.py")
    args = ap.parse_args()
    rows = []
    for d in args.dirs:
        for name in sorted(os.listdir(d)):
            m = re.fullmatch(r"noise([0-9.]+)_seed(\d+)", name)
            if not m:
                continue
            noise, seed = float(m.group(1)), int(m.group(2))
            run = load(os.path.join(d, name))
            truth = make_set(noise, seed)
            probs = variants(run)
            copies = {c for _, c in truth["pairs"]}
            originals = np.array([k not in copies for k in run["keys"]])
            gap = float(np.abs(probs["tta"] - run["written"]).max())
            print(f"{name}: tta vs out_of_fold.parquet, largest difference {gap:.2g}", file=sys.stderr)
            for pname, p in probs.items():
                acc = float((p.argmax(1) == run["labels"]).mean())
                for fb in FILTERS:
                    mask = flagged(run["labels"], p, fb, originals, len(truth["flipped"]))
                    r = score({run["keys"][i] for i in np.flatnonzero(mask)}, truth)
                    rows.append((noise, seed, pname, acc, fb, r))
                    print(f"  {pname} {fb}: {r}", file=sys.stderr, flush=True)
    lines = [
        "| noise | seed | probabilities | oof accuracy | filter_by | flagged | precision | recall |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for noise, seed, pname, acc, fb, r in rows:
        lines.append(
            f"| {noise:.0%} | {seed} | {pname} | {acc:.4f} | {fb} | {r['flagged']} | {r['precision']:.3f} "
            f"| {r['recall']:.3f} |"
        )
    publish("\n".join(lines), "audit_variants")


if __name__ == "__main__":
    main()
