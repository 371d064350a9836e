"""``imgscan <verb>`` / ``python -m jobs <verb>``: the command line.

Each verb lives in its own module exposing ``add_parser(subparsers)`` (flags ->
a frozen config, validated once) and ``run(args) -> int``; the modules import
TensorFlow/Ray only inside ``run`` so that help and flag errors answer at once.
Bad input ends in a one-line message and a non-zero exit, never a traceback
(``IMGSCAN_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

#: verb -> module under jobs/ that implements it
VERBS: dict[str, str] = {
    "train": "jobs.train_cli",
    "calibrate": "jobs.calibrate_cli",
    "score": "jobs.score_cli",
    "reduce": "jobs.reduce_cli",
    "scan": "jobs.scan_cli",
    "audit": "jobs.audit_cli",
    "demo": "jobs.demo",
}


class UsageError(Exception):
    """Bad flags or input: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + error
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def parse_storage_options(text: str | None) -> dict[str, Any]:
    """``--storage-options '{"key": ...}'`` -> dict passed straight to fsspec."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        # not the text: it may hold a key
        raise UsageError(f"--storage-options must be a JSON object: {e.args[0].split(':')[0]}") from e
    if not isinstance(value, dict):
        raise UsageError("--storage-options must be a JSON object.")
    from jobs.storage import remember_secrets

    remember_secrets(value)  # masked from here on in every message this process prints
    return value


def add_source(p: argparse.ArgumentParser) -> None:
    """``--source SRC``: the same kinds of source for every verb (see jobs/sources.py)."""
    p.add_argument(
        "--source", required=True, metavar="SRC", help="folder/prefix of images, tar or Parquet shards (any fsspec URI)"
    )


def add_storage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--storage-options",
        metavar="JSON",
        help="JSON object passed to fsspec for every URI (e.g. '{\"anon\": true}'); credentials and "
        "endpoints otherwise come from the environment (AWS_PROFILE, AWS_ENDPOINT_URL, ...)",
    )


def add_limit_flags(p: argparse.ArgumentParser) -> None:
    """``--max-pixels`` / ``--max-bytes``: the per-image limits of every verb that reads images
    (score, scan, train, audit); an image over either is an error row or an unreadable input."""
    p.add_argument(
        "--max-pixels",
        type=int,
        metavar="N",
        help="an image larger than this (from its header) is not decoded: an error row, or an unreadable input "
        "left out of training (default 64M)",
    )
    p.add_argument(
        "--max-bytes",
        type=int,
        metavar="N",
        help="an input file larger than this is not read: an error row, or an unreadable input (default 256 MiB)",
    )


def limit_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The limit flags given (``max_pixels`` / ``max_bytes``), for a config whose defaults rule the rest."""
    return {name: getattr(args, name) for name in ("max_pixels", "max_bytes") if getattr(args, name) is not None}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="imgscan", description="Find the images that do not belong in a large archive.")
    sub = parser.add_subparsers(dest="verb", metavar="VERB", parser_class=_Parser)
    sub.required = True
    for module in VERBS.values():
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    from jobs.errors import USER_ERRORS
    from jobs.storage import redact

    try:
        args = build_parser().parse_args(argv)
        return int(args.run(args))
    except UsageError as e:
        print(f"imgscan: error: {redact(e)}", file=sys.stderr)
        return 2
    except USER_ERRORS as e:
        if os.environ.get("IMGSCAN_DEBUG"):
            raise  # the full traceback, for bug reports
        print(f"imgscan: error: {redact(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imgscan: interrupted", file=sys.stderr)
        return 130
