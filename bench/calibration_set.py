"""What ``imgscan calibrate`` gives: the fused score read against a separate set of normal images.

    PYTHONPATH=. python bench/calibration_set.py DIR [DIR ...] [--draws 5] [--sizes 12 25 50]

Re-fuses the scores ``bench/accuracy.py --keep DIR`` wrote, without refitting. Per kept run
and draw, a random half of the normal test images is set aside; ``--sizes`` of them (or
all of them) become the calibration set (``detectors.base.calibration_stats`` of their
scores: what ``imgscan calibrate`` stores), and the other half, with the defect or
other-digit images, is scored twice: against the detectors' own held-out tenth (as
trained) and against that calibration set. Per DIR and calibration: the mean AUROC over
its cells (each digit against the others, each archive and defect kind) and the share of
its normal images whose fused p is below 0.1 / 0.01 / 0.001 (a p that reads as a
probability keeps each share at most its level). ``--held-out-for DETECTOR ...``: those
detectors keep their held-out calibration (which detector's calibration moves the AUROC).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.fusion_rules import cells, load, normal_rows
from detectors.base import calibration_stats
from detectors.fusion import fuse

LEVELS = (0.1, 0.01, 0.001)


def compare(directory: str, sizes: Sequence[int | None], draws: int, held_out: Sequence[str] = ()) -> list[str]:
    """Table rows for one DIR: held-out calibration, then each calibration-set size (None: half);
    the detectors in ``held_out`` keep their held-out calibration throughout."""
    runs = load(directory)
    keys = ["held-out tenth", *[f"set of {s}" if s else "set of half" for s in sizes]]
    auc: dict[str, list[float]] = {k: [] for k in keys}
    normal_p: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    m: dict[str, list[int]] = {k: [] for k in keys}
    for run in runs:
        normal = np.flatnonzero(normal_rows(run))
        for draw in range(draws):
            rng = np.random.default_rng(draw)
            aside = rng.permutation(normal)[: len(normal) // 2]
            rest = np.ones(len(run.labels), bool)
            rest[aside] = False
            for key, size in zip(keys, [0, *sizes], strict=True):
                if key == "held-out tenth":
                    calibration = run.calibration
                else:
                    chosen = aside[: size or len(aside)]
                    kept = {c for d in held_out for c in run.groups.get(d, [])}
                    calibration = {
                        c: run.calibration[c] if c in kept else calibration_stats(run.scores[c][chosen])
                        for c in run.columns
                    }
                m[key].append(int(calibration[run.columns[0]]["n"]))
                score = fuse(run.scores, calibration, run.groups)
                auc[key].extend(roc_auc_score(y[keep & rest], score[keep & rest]) for _, keep, y in cells(run))
                normal_p[key].append(10 ** -score[rest & normal_rows(run)])
    rows = []
    for key in keys:
        p = np.concatenate(normal_p[key])
        shares = " | ".join(f"{np.mean(p < a):.3f}" for a in LEVELS)
        rows.append(
            f"| {os.path.basename(directory.rstrip('/'))} | {key} | {np.median(m[key]):.0f} | "
            f"{np.mean(auc[key]):.4f} | {shares} |"
        )
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="directories written by bench/accuracy.py --keep")
    p.add_argument("--draws", type=int, default=5, help="random halves per kept run (default 5)")
    p.add_argument(
        "--sizes", type=int, nargs="*", default=[], metavar="N", help="calibration sets of N images (and of the half)"
    )
    p.add_argument(
        "--held-out-for",
        nargs="+",
        default=[],
        metavar="DETECTOR",
        help="these detectors keep their held-out calibration (which one's calibration moves the AUROC)",
    )
    args = p.parse_args(argv)
    if args.draws < 1 or any(s < 2 for s in args.sizes):
        p.error("--draws must be >= 1 and every --sizes >= 2")
    print("| kept runs | calibration | median m | mean AUROC | " + " | ".join(f"p < {a:g}" for a in LEVELS) + " |")
    print("|---|---|---|---|" + "---|" * len(LEVELS))
    for d in args.dirs:
        if not load(d):
            p.error(f"no kept runs (*.json + *.npz) in {d}")
        for row in compare(d, [*args.sizes, None], args.draws, args.held_out_for):
            print(row, flush=True)


if __name__ == "__main__":
    main()
