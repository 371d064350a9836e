"""Flags of ``imgscan scan`` (also ``python -m jobs scan``): the nightly incremental scan."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from jobs.reduce_cli import add_rule_flags
    from jobs.score_cli import add_scoring_flags

    p = sub.add_parser(
        "scan",
        help="nightly incremental scan: score what is new or changed in SRC, reduce it, add the night to a history",
        description="Score the items of SRC that no earlier night scored at their current version into "
        "ROOT_URI/scan_date=DATE/, threshold them with the bundle's calibration (comparable from night to night), "
        "and add the night's counts, flags and drift to ROOT_URI/_scan/history.html. Running a night again "
        "finishes it if it was interrupted and changes nothing once it is complete.",
    )
    p.add_argument("--out", required=True, metavar="ROOT_URI", help="root of the nightly partitions and the history")
    p.add_argument("--date", metavar="YYYY-MM-DD", help="the night (default: today, UTC)")
    add_scoring_flags(p)
    add_rule_flags(p, default="calibrated")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from jobs.scan import ScanConfig, scan, summary_line
    from jobs.score_cli import score_config

    cfg = ScanConfig(
        score=score_config(args),
        **({"date": args.date} if args.date else {}),
        rules=tuple(args.rule),
        anomaly_label=args.anomaly_label,
        top_k=args.top_k,
        report=not args.no_report,
    )
    print(summary_line(scan(cfg)), flush=True)
    return 0
