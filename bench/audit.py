"""The label audit against known mistakes, beside the baseline a user would try first.

    PYTHONPATH=. python bench/audit.py [--noise 0.05 0.10] [--seed N] [--flags '--epochs 15 ...'] [--keep DIR]

On all 1,797 digits of ``sklearn.datasets.load_digits`` upscaled to 32x32 (PNG files
in class folders), for each noise rate: flip that fraction of the labels at random
(seeded) to another digit, and plant 20 duplicates of clean images under a changed
label (10 byte-identical copies, 10 near copies: the same digit with +-3 grey levels
of noise, so other bytes). Then:

* **imgscan audit**: the whole command (``python -m jobs audit --source ... --out ... --seed N``,
  default flags, Ray in-process on every core), timed from start to exit; and its CPU time:
  user + system seconds of the command's process tree (driver, Ray's daemons, the workers
  that decode and train; ``bench/tree_cpu.py``). On a shared machine the wall time says little; the CPU time does not
  depend on the load, and ``idle 2-core estimate`` = driver CPU + (tree CPU - driver CPU) / 2
  (the driver's part is serial, the rest runs on both cores);
* **baseline**: scikit-learn ``LogisticRegression`` on the raw pixels, out-of-fold
  probabilities from ``cross_val_predict`` (5 stratified folds), fed to the same
  cleanlab call (``jobs.audit.issues.find_issues``).

Precision and recall are against the flipped set, over the 1,797 original images
(the planted copies carry wrong labels too; they are counted in the duplicates
column, and as "copies flagged"). Duplicates found: planted pairs that share a
conflicting group in ``duplicates.parquet``; conflicting groups: all that it reports (the
20 planted, and any other).

The table is printed and written to ``bench/out/audit_seedN.md``, with the load average
before and after. ``--keep DIR`` keeps each source and audit (``DIR/noise0.05_seed0/{src,out}``)
for ``bench/audit_variants.py``, which scores other cleanlab filters and probabilities on
the same fold models.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pyarrow.parquet as pq
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict

from bench import tree_cpu
from jobs.audit.issues import find_issues
from jobs.demo_data import Sample, digits, png_bytes, samples, write_folder
from jobs.storage import join, read_bytes

SIZE = 32
PLANTED = 20


def make_set(noise: float, seed: int) -> dict[str, Any]:
    """Digits with flipped labels and planted conflicting duplicates; keys are the ground truth."""
    rng = np.random.default_rng(seed)
    x, y = digits(SIZE)
    given = y.copy()
    flipped = rng.choice(len(y), round(noise * len(y)), replace=False)
    for i in flipped:
        given[i] = rng.choice([c for c in range(10) if c != y[i]])
    items = samples(x, [str(v) for v in given])
    clean = [int(i) for i in rng.permutation(len(y)) if i not in set(flipped.tolist())][:PLANTED]
    pairs, extra_x, extra_y = [], [], []
    for n, i in enumerate(clean):
        img = x[i]
        if n >= PLANTED // 2:  # a near copy: the same digit, other bytes
            img = np.clip(img.astype(int) + rng.integers(-3, 4, img.shape), 0, 255).astype(np.uint8)
        label = str(rng.choice([c for c in range(10) if c != given[i]]))
        key = f"copy{n:03d}"
        items.append(Sample(key, png_bytes(img), label))
        pairs.append((items[i].key, key))
        extra_x.append(img)
        extra_y.append(int(label))
    return {
        "items": items,
        "x": np.concatenate([x, np.stack(extra_x)]),
        "given": np.concatenate([given, extra_y]),
        "keys": [s.key for s in items],
        "flipped": {items[i].key for i in flipped},
        "pairs": pairs,
    }


def publish(text: str, name: str) -> None:
    """Print a bench's table and keep it as ``bench/out/<name>.md`` (the audit benches share this)."""
    print(text)
    os.makedirs("bench/out", exist_ok=True)
    with open(f"bench/out/{name}.md", "w") as f:
        f.write(text + "\n")


def key_of(image_id: str) -> str:
    return image_id.rsplit("/", 1)[-1].removesuffix(".png")


def score(flagged: set[str], data: dict[str, Any]) -> dict[str, Any]:
    copies = {c for _, c in data["pairs"]}
    originals = flagged - copies
    tp = len(originals & data["flipped"])
    return {
        "flagged": len(originals),
        "precision": tp / len(originals) if originals else float("nan"),
        "recall": tp / len(data["flipped"]),
        "copies": len(flagged & copies),
    }


def run_audit(data: dict[str, Any], root: str, flags: list[str]) -> dict[str, Any]:
    src, out = join(root, "src"), join(root, "out")
    write_folder(src, data["items"])
    cmd = [sys.executable, "-m", "jobs", "audit", "--source", src, "--out", out, *flags]
    with tempfile.TemporaryFile("w+") as err:
        proc, seconds, seen = tree_cpu.run(cmd, stdout=subprocess.PIPE, stderr=err)
        stdout = proc.stdout.read() if proc.stdout else ""
        err.seek(0)
        stderr = err.read()
    if proc.returncode:
        raise SystemExit(f"imgscan audit failed ({proc.returncode}):\n{stderr[-3000:]}")
    print(f"  {stdout.strip()}", file=sys.stderr)
    summary = json.loads(read_bytes(join(out, "summary.json")))
    issues = pq.read_table(io.BytesIO(read_bytes(join(out, "label_issues.parquet"))))
    dups = pq.read_table(io.BytesIO(read_bytes(join(out, "duplicates.parquet")))).to_pylist()
    group_of = {key_of(r["image_id"]): r["group"] for r in dups if r["conflicting"]}
    found = sum(1 for a, b in data["pairs"] if a in group_of and group_of[a] == group_of.get(b))
    res = score({key_of(i) for i in issues.column("image_id").to_pylist()}, data)
    conflicting = len({r["group"] for r in dups if r["conflicting"]})
    cpu, driver = sum(seen.values()), seen.get(proc.pid, 0.0)
    return res | {
        "duplicates": found,
        "groups": conflicting,
        "seconds": seconds,
        "cpu": cpu,
        "idle": driver + (cpu - driver) / 2,
        "fold_cpu": sum(f["cpu_seconds"] for f in summary["fold_models"]),
        "oof_accuracy": summary["oof_accuracy"],
    }


def run_baseline(data: dict[str, Any], seed: int) -> dict[str, Any]:
    x = data["x"].reshape(len(data["x"]), -1).astype(np.float64) / 255.0
    labels = data["given"]
    cv = StratifiedKFold(5, shuffle=True, random_state=seed)
    t0, c0 = time.monotonic(), time.process_time()
    probs = cross_val_predict(LogisticRegression(max_iter=2000), x, labels, cv=cv, method="predict_proba")
    found = find_issues(labels, probs)
    flagged = {data["keys"][i] for i in np.flatnonzero(found.is_issue)}
    cpu = time.process_time() - c0
    probs_acc = float((probs.argmax(axis=1) == labels).mean())
    return score(flagged, data) | {
        "duplicates": None,
        "groups": None,
        "seconds": time.monotonic() - t0,
        "cpu": cpu,
        "idle": None,
        "fold_cpu": None,
        "oof_accuracy": probs_acc,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--noise", type=float, nargs="+", default=[0.05, 0.10])
    ap.add_argument("--seed", type=int, default=0, help="seed of the flips, the copies, the folds and the models")
    ap.add_argument("--flags", default="", help="extra flags for imgscan audit (default: none)")
    ap.add_argument("--keep", metavar="DIR", help="keep each source and audit under DIR (default: temporary)")
    args = ap.parse_args()
    load = os.getloadavg()
    rows = []
    for noise in args.noise:
        data = make_set(noise, args.seed)
        print(f"noise {noise:.0%}: {len(data['flipped'])} flipped, {PLANTED} planted duplicates", file=sys.stderr)
        flags = ["--seed", str(args.seed), *shlex.split(args.flags)]
        name = "imgscan audit (CAM, 5 folds)"
        if args.keep:
            rows.append(
                (noise, name, run_audit(data, os.path.join(args.keep, f"noise{noise:.2f}_seed{args.seed}"), flags))
            )
        else:
            with tempfile.TemporaryDirectory() as root:
                rows.append((noise, name, run_audit(data, root, flags)))
        rows.append((noise, "baseline (LogisticRegression, pixels)", run_baseline(data, args.seed)))
        for _, name, r in rows[-2:]:  # as it goes: a run on a busy machine can take long
            print(f"  {noise:.0%} {name}: {r}", file=sys.stderr, flush=True)
    head = (
        "| noise | method | oof accuracy | flagged | precision | recall | copies flagged | duplicates found "
        "| conflicting groups | wall time | CPU-s (folds) | idle 2-core estimate |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for noise, name, r in rows:
        dup = "" if r["duplicates"] is None else f"{r['duplicates']}/{PLANTED}"
        cpu = f"{r['cpu']:.0f}" + ("" if r["fold_cpu"] is None else f" ({r['fold_cpu']:.0f})")
        idle = "" if r["idle"] is None else f"{r['idle']:.0f}s"
        lines.append(
            f"| {noise:.0%} | {name} | {r['oof_accuracy']:.4f} | {r['flagged']} | {r['precision']:.3f} | "
            f"{r['recall']:.3f} | {r['copies']}/{PLANTED} | {dup} | {'' if r['groups'] is None else r['groups']} | "
            f"{r['seconds']:.0f}s | {cpu} | {idle} |"
        )
    end = os.getloadavg()
    lines.append("")
    lines.append(
        f"seed {args.seed}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average (1/5/15 min) "
        f"{load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} at the start, {end[0]:.1f}/{end[1]:.1f}/{end[2]:.1f} at the end"
    )
    publish("\n".join(lines), f"audit_seed{args.seed}")


if __name__ == "__main__":
    main()
