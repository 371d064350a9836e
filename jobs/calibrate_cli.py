"""Flags of ``imgscan calibrate`` (the job: ``jobs.calibrate``)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from jobs.cli import add_limit_flags, add_source, add_storage_options

    p = sub.add_parser(
        "calibrate",
        help="re-calibrate a model bundle on normal images it did not train on",
        description="Score the normal images of SRC with every detector of MODEL_URI and write the bundle, "
        "with those scores as its calibration (the p-values behind anomaly_score) in place of the "
        "held-out tenth of its training images, under NEW_MODEL_URI. The models are not retrained.",
    )
    add_source(p)
    p.add_argument("--models", required=True, metavar="MODEL_URI", help="model bundle written by 'imgscan train'")
    p.add_argument("--out", required=True, metavar="NEW_MODEL_URI", help="where to write the re-calibrated bundle")
    p.add_argument(
        "--normal-label",
        metavar="X",
        help="calibrate on the images of this label only (default: the bundle's normal label when SRC has "
        "it, else every image but the bundle's anomaly label)",
    )
    add_limit_flags(p)
    add_storage_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import contextlib
    import sys

    from jobs.calibrate import CalibrateConfig, calibrate, summary_line
    from jobs.cli import limit_kwargs, parse_storage_options

    cfg = CalibrateConfig(
        source=args.source,
        models=args.models,
        out=args.out,
        normal_label=args.normal_label,
        **limit_kwargs(args),
        storage_options=parse_storage_options(args.storage_options),
    )
    with contextlib.redirect_stdout(sys.stderr):  # stdout is for the summary line
        result = calibrate(cfg)
    print(summary_line(cfg, result), flush=True)
    return 0
