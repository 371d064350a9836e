"""How far a CAM can get on the bench's hard cells when it is trained on the bench's own defects.

    PYTHONPATH=. python bench/ceiling.py [--cells grass:stain ...] [--epochs N] [--params JSON]

A measurement, never a detector: the one-class CAM (``detectors.cam.CamDetector``, the same
network, focal map loss and score) is trained *supervised* on defects made by
``bench.accuracy.paste`` (the generator the bench tests with) pasted into the archive's own
training crops, with another data seed than the test set's, and tested on the bench's test
set of each cell (``bench.accuracy.texture_set``, every kind drawn as the full bench draws
them, so the test crops are the bench's own). The detector never sees the bench's defects;
this script does, to know which cells are feasible at all at this contrast and resolution: if
a network that was shown the very kind of defect cannot reach 0.95 AUROC on a cell, no
one-class detector of that size will.

The masks the map is trained on are the change each pasted defect made, |defect - crop|
scaled to [0, 1] by its largest value inside the defect's box (a stain's soft edge, a
scratch's anti-aliased line).

Prints a table (cell, AUROC of ``cam_anomaly``, share of map peaks inside the defect's box)
and writes it to ``bench/out/ceiling.md``.

Measured 2026-12-03 (load 2-9, 300 training crops, the bench's 100 + 100 test crops per cell;
AUROC / peaks inside):

* ``--params '{"decoder": false}'`` (the default two-block CAM), 15 epochs: grass stain
  0.623 / 44%, grass scratch 0.628 / 37%, gravel stain 0.633 / 34%, gravel scratch 0.570 /
  24%, ihc stain 0.634 / 42%, page scratch 0.658 / 38%; 92-99 CPU-s per archive;
* the same with ``--cells grass:stain grass:scratch --epochs 60``: 0.669 / 43%, 0.688 / 50%
  (388 CPU-s);
* ``--params '{"decoder": true}'`` (U-shaped, ``detectors.cam.build_cam_classifier``),
  ``--cells grass:stain grass:scratch --epochs 60``: 0.619 / 30%, 0.510 / 15% (908 CPU-s).

* a check that the script measures what it should, ``--cells brick:stain brick:scratch
  --params '{"decoder": false}'`` (15 epochs): 0.962 / 94%, 0.774 / 72%, against the
  one-class CAM's 0.964 / 0.914 at 30 epochs (``bench/accuracy.py --quick``).

So even shown the very defects it is tested on, a CAM of this size and training budget
(up to 60 epochs of 300 crops) stays at 0.51-0.69 on these six cells: better self-made
defects alone will not bring the one-class CAM to the issue's 0.95 there. It is a ceiling
of this budget, not a proof that the cells are infeasible: the brick scratch shows 15
supervised epochs below 30 one-class ones, and 60 epochs lifted grass by 0.05.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
from sklearn.metrics import roc_auc_score

from bench.accuracy import ARCHIVES, CROP, DEFECTS, SEED, paste, peaks_inside, photo_images, texture_set
from detectors.cam import CamDetector

HARD = ("grass:stain", "gravel:stain", "ihc:stain", "grass:scratch", "gravel:scratch", "page:scratch")


def log(msg: str) -> None:
    print(f"[ceiling] {msg}", file=sys.stderr, flush=True)


class BenchDefectCam(CamDetector):
    """The one-class CAM, trained on ``bench.accuracy.paste`` defects of ``bench_kinds`` instead
    of its own self-made ones (everything else as ``CamDetector``)."""

    def __init__(self, *, bench_kinds: Sequence[str], **params: Any) -> None:
        super().__init__(**params)
        self.bench_kinds = tuple(bench_kinds)
        self._ctx = {"photos": photo_images()}

    def _make_defects(
        self, images: np.ndarray, rng: np.random.Generator, kinds: Sequence[str]
    ) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (n, s, s, 1) -> (uint8 (n, s, s, 1) with one bench defect each, float32 (n, s, s) masks)."""
        out, masks = images.copy(), np.zeros(images.shape[:3], np.float32)
        for i, img in enumerate(images[..., 0]):
            kind = self.bench_kinds[int(rng.integers(len(self.bench_kinds)))]
            new, (y0, x0, y1, x1) = paste(img, kind, rng, self._ctx)
            change = np.zeros(img.shape, np.float32)
            box = np.abs(new[y0 : y1 + 1, x0 : x1 + 1].astype(np.float32) - img[y0 : y1 + 1, x0 : x1 + 1])
            change[y0 : y1 + 1, x0 : x1 + 1] = box / max(float(box.max()), 1.0)
            out[i, ..., 0], masks[i] = new, change
        return out, masks


def parse_cells(cells: Sequence[str]) -> dict[str, list[str]]:
    """["grass:stain", ...] -> {archive: [kinds]}, checked against the bench's archives and kinds."""
    by_archive: dict[str, list[str]] = {}
    for c in cells:
        archive, _, kind = c.partition(":")
        if archive not in ARCHIVES or kind not in DEFECTS:
            raise ValueError(f"Expected cells ARCHIVE:KIND among {list(ARCHIVES)} x {list(DEFECTS)}. Received: {c!r}.")
        by_archive.setdefault(archive, []).append(kind)
    return by_archive


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", nargs="+", default=list(HARD), help="ARCHIVE:KIND cells (default: the hard six)")
    p.add_argument("--train", type=int, default=300, help="training crops per archive (the full bench's 300)")
    p.add_argument("--test", type=int, default=100, help="normal test crops and crops per kind (the full bench's)")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--params", default="{}", help='JSON overrides of CamDetector, e.g. {"decoder": false}')
    p.add_argument("--seed", type=int, default=SEED, help="seed of the network")
    p.add_argument("--train-seed", type=int, default=1, help="seed of the training defects (the test set's is 0)")
    p.add_argument("--out", default="bench/out/ceiling.md")
    args = p.parse_args(argv)
    try:
        by_archive = parse_cells(args.cells)
        params = json.loads(args.params)
    except (ValueError, json.JSONDecodeError) as e:
        p.error(str(e))
    lines = [
        f"Command: `PYTHONPATH=. python bench/ceiling.py {shlex.join(sys.argv[1:] if argv is None else argv)}`",
        "",
        "| archive | defect | cam_anomaly AUROC | peaks inside | fit CPU-s |",
        "|---|---|---|---|---|",
    ]
    t0, cpu0 = time.monotonic(), time.process_time()
    for archive, kinds in by_archive.items():
        c0 = time.process_time()
        ts = texture_set(archive, DEFECTS, args.train, args.test, SEED)  # the full bench's own test crops
        det = BenchDefectCam(
            bench_kinds=kinds,
            input_size=CROP,
            channels=1,
            epochs=args.epochs,
            seed=args.train_seed * 1000 + args.seed,
            **params,
        ).fit(ts.train[..., None])
        fit_cpu = time.process_time() - c0
        scores = det.score(ts.test[..., None])
        for k in kinds:
            cell = (ts.kind == "") | (ts.kind == k)
            auc = roc_auc_score(ts.kind[cell] == k, scores["cam_anomaly"][cell])
            inside = peaks_inside({"cam": scores}, ts, ts.kind == k)["cam"]
            lines.append(f"| {archive} | {k} | {auc:.3f} | {100 * inside:.1f}% | {fit_cpu:.0f} |")
            log(f"{archive}/{k}: AUROC {auc:.3f}, peaks inside {100 * inside:.1f}%, fit {fit_cpu:.0f} CPU-s")
    load = os.getloadavg()
    lines += [
        "",
        f"Total: {time.monotonic() - t0:.0f} s wall, {time.process_time() - cpu0:.0f} CPU-s; "
        f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}",
    ]
    print("\n".join(lines), flush=True)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
