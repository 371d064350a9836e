"""Flags of ``imgscan score`` (also ``python -m jobs score``, what ``ray job submit`` runs).

``add_scoring_flags`` and ``score_config`` are shared with ``imgscan scan``.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from jobs.score import ScoreConfig


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="score every image of an archive with a model bundle (Ray Data; resumable)",
        description="Score every image of SRC with the detectors of MODEL_URI and write one Parquet part per "
        "shard under RESULTS_URI/parts/. A killed run resumes with the same --run-id.",
    )
    p.add_argument("--out", required=True, metavar="RESULTS_URI", help="where _run.json and parts/ go")
    p.add_argument("--run-id", metavar="ID", help="name of this run; pass the id of a stopped run to resume it")
    add_scoring_flags(p)
    p.set_defaults(run=run)


def add_scoring_flags(p: argparse.ArgumentParser) -> None:
    """--source, --models and the Ray flags every scoring verb takes."""
    from jobs.cli import add_limit_flags, add_source, add_storage_options

    add_source(p)
    p.add_argument("--models", required=True, metavar="MODEL_URI", help="model bundle written by 'imgscan train'")
    p.add_argument(
        "--address",
        metavar="RAY_ADDRESS",
        help="Ray cluster to run on ('auto', 'host:6379'); default: RAY_ADDRESS if set, else Ray in this process",
    )
    p.add_argument("--workers", type=int, metavar="N", help="scoring actors (default: one per GPU, or one per CPU)")
    p.add_argument(
        "--gpus-per-worker", type=float, default=0.0, metavar="F", help="GPUs per scoring actor (default 0: CPU)"
    )
    p.add_argument("--batch-size", type=int, default=256, metavar="N", help="images per model call (default 256)")
    p.add_argument("--num-cpus", type=int, metavar="N", help="CPUs of the in-process Ray (default: all cores)")
    p.add_argument("--decode-chunk", type=int, metavar="N", help="images per decoded block (default 256)")
    add_limit_flags(p)
    add_storage_options(p)


def score_config(args: argparse.Namespace, run_id: str | None = None) -> ScoreConfig:
    """The ``ScoreConfig`` of parsed scoring flags (``args.out`` is the output URI)."""
    from jobs.cli import limit_kwargs, parse_storage_options
    from jobs.score import ScoreConfig

    return ScoreConfig(
        source=args.source,
        models=args.models,
        out=args.out,
        run_id=run_id,
        address=args.address,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        batch_size=args.batch_size,
        num_cpus=args.num_cpus,
        **({"decode_chunk": args.decode_chunk} if args.decode_chunk is not None else {}),
        **limit_kwargs(args),
        storage_options=parse_storage_options(args.storage_options),
    )


def run(args: argparse.Namespace) -> int:
    from jobs.score import score, summary_line

    print(summary_line(score(score_config(args, args.run_id))), flush=True)
    return 0
