"""``imgscan demo``: the whole pipeline on the embedded default, for a newcomer.

1. builds a small archive on local disk from the digits scikit-learn ships: a
   training folder (class subfolders) and WebDataset tar shards to scan, with
   known anomalies (labelled ``anomaly``) and a few corrupt files;
2. trains the detectors on the training folder;
3. scores the tar shards on Ray started in this process;
4. reduces: thresholds, flags, summary and ``report.html``;
and prints the counts, each score's ROC AUC against the known anomalies and the
path of the report.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

#: thresholds from the statistics of held-out normal training images (the way a
#: nightly scan keeps them comparable); the default quantile:0.999 needs >= 1,000
#: scores and the demo scans ~580
DEMO_RULE = "calibrated"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="build a demo archive from the shipped digits and run the whole pipeline on it")
    p.add_argument(
        "--workdir", default="imgscan-demo", help="where the archive and outputs go (default ./imgscan-demo)"
    )
    p.add_argument("--epochs", type=int, default=10, help="training epochs (default 10)")
    p.set_defaults(run=run)


def _say(msg: str) -> None:
    print(f"[imgscan demo] {msg}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    summary = run_demo(os.path.abspath(args.workdir), epochs=args.epochs)
    print(format_summary(summary))
    return 0


def run_demo(root: str, *, epochs: int = 10, num_cpus: int | None = None) -> dict[str, Any]:
    """The whole pipeline under ``root``; returns the reducer's summary plus timings."""
    from jobs.demo_data import build_demo_archive
    from jobs.reduce import ReduceConfig, reduce
    from jobs.score import ScoreConfig, score
    from jobs.train import TrainConfig, train

    t0 = time.monotonic()
    archive = build_demo_archive(os.path.join(root, "archive"))
    _say(
        f"1/4 archive: {archive.train_uri} (training folder); {archive.scan_uri} ({archive.n_scan} images to "
        f"scan: {archive.n_anomalies} known anomalies, {archive.n_corrupt} corrupt files)"
    )
    model, results, report = (os.path.join(root, d) for d in ("model", "results", "report"))
    _say("2/4 training the detectors")
    bundle = train(TrainConfig(source=archive.train_uri, out=model, epochs=epochs))
    t_train = time.monotonic()
    _say("3/4 scoring the archive on an in-process Ray")
    scored = score(ScoreConfig(source=archive.scan_uri, models=model, out=results, num_cpus=num_cpus))
    t_score = time.monotonic()
    _say(f"4/4 reducing with {DEMO_RULE}")
    summary = reduce(ReduceConfig(results=results, out=report, rules=(DEMO_RULE,)))
    summary["demo"] = {
        "inputs": archive.n_scan,
        "rows": scored["images"],
        "model_version": bundle.version,
        "seconds": {
            "total": round(time.monotonic() - t0, 1),
            "train": round(t_train - t0, 1),
            "score": round(t_score - t_train, 1),
            "reduce": round(time.monotonic() - t_score, 1),
        },
    }
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    demo = summary["demo"]
    lines = [
        f"inputs {demo['inputs']}, rows {summary['rows']}, scored {summary['scored']}, errors {summary['errors']}, "
        f"flagged {summary['flagged']['overall']} "
        f"(known anomalies: {summary['labels']['anomalies']} of {summary['labels']['labelled']} labelled)",
        "ROC AUC against the known anomalies:",
    ]
    # the reducer's order: anomaly_score (the one to read) first, then the scores it combines
    for name, entry in summary["scores"].items():
        if "roc_auc" in entry:
            flagged = "not thresholded" if entry.get("flagged") is None else f"flagged {entry['flagged']}"
            lines.append(
                f"  {name:<18} ROC AUC {entry['roc_auc']:.3f}   PR AUC {entry.get('pr_auc', float('nan')):.3f}   "
                f"{flagged}"
            )
    secs = demo["seconds"]
    lines.append(
        f"report: {summary.get('report', '(none)')}\n"
        f"done in {secs['total']:.0f}s (train {secs['train']:.0f}s, score {secs['score']:.0f}s, "
        f"reduce {secs['reduce']:.0f}s)"
    )
    return "\n".join(lines)
