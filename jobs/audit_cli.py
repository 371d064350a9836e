"""Flags of ``imgscan audit`` (also ``python -m jobs audit``, what ``ray job submit`` runs)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    from jobs.cli import add_limit_flags, add_source, add_storage_options

    p = sub.add_parser(
        "audit",
        help="find mislabelled and duplicated images of a labelled set (K-fold CAM + cleanlab; Ray tasks)",
        description="Train the CAM classifier K times, each on all folds but one, so that every image of SRC gets "
        "class probabilities from a model that never saw it; find label issues with cleanlab and duplicates by "
        "content hash and embedding neighbours; write label_issues.parquet, duplicates.parquet, "
        "out_of_fold.parquet, summary.json, audit.html and the fold models (folds/fold-K/) under AUDIT_URI.",
    )
    add_source(p)
    p.add_argument("--out", required=True, metavar="AUDIT_URI", help="where the audit's files go")
    p.add_argument("--folds", type=int, default=5, metavar="K", help="folds, each a model in a Ray task (default 5)")
    p.add_argument("--image-size", type=int, default=32, metavar="N", help="model input size in px (default 32)")
    p.add_argument("--epochs", type=int, default=15, metavar="N", help="training epochs per fold (default 15)")
    p.add_argument(
        "--address",
        metavar="RAY_ADDRESS",
        help="Ray cluster to run on ('auto', 'host:6379'); default: RAY_ADDRESS if set, else Ray in this process",
    )
    p.add_argument("--gpus-per-fold", type=float, default=0.0, metavar="F", help="GPUs per fold task (default 0: CPU)")
    p.add_argument("--num-cpus", type=int, metavar="N", help="CPUs of the in-process Ray (default: all cores)")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="seed of the folds and the models (default 0)")
    add_limit_flags(p)
    add_storage_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from jobs.audit import AuditConfig, audit, summary_line
    from jobs.cli import limit_kwargs, parse_storage_options

    cfg = AuditConfig(
        source=args.source,
        out=args.out,
        folds=args.folds,
        image_size=args.image_size,
        epochs=args.epochs,
        address=args.address,
        gpus_per_fold=args.gpus_per_fold,
        num_cpus=args.num_cpus,
        seed=args.seed,
        **limit_kwargs(args),
        storage_options=parse_storage_options(args.storage_options),
    )
    print(summary_line(audit(cfg)), flush=True)
    return 0
