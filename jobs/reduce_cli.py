"""Flags of ``imgscan reduce``."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from jobs.cli import add_storage_options

    p = sub.add_parser(
        "reduce",
        help="global thresholds over a run's results (anomaly_score by default); flags, summary, HTML report",
        description="Read every Parquet part of a run, fit a global threshold on anomaly_score and on every score "
        "a --rule names (exactly, in bounded memory), flag the images beyond it and write thresholds.json, "
        "flagged.parquet, summary.json and report.html under REPORT_URI.",
    )
    p.add_argument("--results", required=True, metavar="RESULTS_URI", help="the run: _run.json and parts/*.parquet")
    p.add_argument("--out", required=True, metavar="REPORT_URI", help="where the outputs go")
    add_rule_flags(p)
    p.add_argument(
        "--calibration", metavar="MODEL_URI", help="model bundle whose calibration to use (default: the run's model)"
    )
    add_storage_options(p)
    p.set_defaults(run=run)


def add_rule_flags(p: argparse.ArgumentParser, default: str = "quantile") -> None:
    """--rule, --anomaly-label, --top-k, --no-report: shared with ``imgscan scan``."""
    p.add_argument(
        "--rule",
        action="append",
        default=[],
        metavar="SCORE=RULE",
        help="threshold rule of a score: quantile[:Q] (Q=0.999), sigma[:K] (3), iqr[:K] (1.5), "
        "calibrated[:Q] (0.999, from the bundle's normal training scores; 3.0 for anomaly_score), f1 (best F1 "
        f"against known anomalies) or off. By default only anomaly_score is thresholded, with {default}; a bare "
        "RULE replaces that default; each=RULE thresholds every score the detectors declare meaningful too; "
        "cam_mismatch=off turns the label audit off. Repeatable.",
    )
    p.add_argument(
        "--anomaly-label", default="anomaly", metavar="X", help="label of known anomalies (default 'anomaly')"
    )
    p.add_argument("--top-k", type=int, default=24, metavar="N", help="images in the report's gallery (default 24)")
    p.add_argument("--no-report", action="store_true", help="skip report.html")


def run(args: argparse.Namespace) -> int:
    from jobs.cli import parse_storage_options
    from jobs.reduce import ReduceConfig, reduce

    cfg = ReduceConfig(
        results=args.results,
        out=args.out,
        rules=tuple(args.rule),
        calibration=args.calibration,
        anomaly_label=args.anomaly_label,
        top_k=args.top_k,
        report=not args.no_report,
        storage_options=parse_storage_options(args.storage_options),
    )
    summary = reduce(cfg)
    per = ", ".join(f"{k} {v}" for k, v in summary["flagged"]["per_score"].items())
    print(
        f"{summary['rows']} rows: {summary['scored']} scored, {summary['errors']} errors, "
        f"{summary['flagged']['overall']} flagged ({per}) -> {args.out}"
    )
    for score, m in summary["scores"].items():
        if "roc_auc" in m:
            f1 = f", F1 {m['f1']:.3f}" if "f1" in m else " (not thresholded)"
            print(f"  {score}: ROC AUC {m['roc_auc']:.3f}, PR AUC {m['pr_auc']:.3f}{f1}")
    if summary.get("report"):
        print(f"report: {summary['report']}")
    return 0
