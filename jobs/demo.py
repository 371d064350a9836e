"""``imgscan demo``: the whole pipeline on the embedded default, for a newcomer.

Builds a small archive on local disk from the digits scikit-learn ships (a
training folder, and tar shards to scan with known anomalies and corrupt
files), then trains the detectors on it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a demo archive from the shipped digits and run the pipeline on it")
    p.add_argument(
        "--workdir", default="imgscan-demo", help="where the archive and outputs go (default ./imgscan-demo)"
    )
    p.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from jobs.demo_data import build_demo_archive
    from jobs.train import TrainConfig, train

    t0 = time.monotonic()
    root = os.path.abspath(args.workdir)
    archive = build_demo_archive(os.path.join(root, "archive"))
    print(
        f"archive: {archive.train_uri} (training folder), {archive.scan_uri} "
        f"({archive.n_scan} images to scan: {archive.n_anomalies} known anomalies, {archive.n_corrupt} corrupt)",
        file=sys.stderr,
    )
    model = os.path.join(root, "model")
    bundle = train(TrainConfig(source=archive.train_uri, out=model, epochs=args.epochs))
    print(f"model bundle {bundle.version}: {model} (training curves in {model}/training/)")
    print(f"demo done in {time.monotonic() - t0:.0f}s")
    return 0
