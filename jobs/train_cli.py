"""Flags of ``imgscan train``."""

from __future__ import annotations

import argparse
import json
from typing import Any

from detectors import DETECTOR_NAMES


def add_parser(sub: argparse._SubParsersAction) -> None:
    from jobs.cli import add_limit_flags, add_source, add_storage_options

    p = sub.add_parser(
        "train",
        help="train the detectors on a folder of images and write a model bundle",
        description="Train the detectors on SRC (class subfolders give labels) and write one "
        "model bundle under MODEL_URI.",
    )
    add_source(p)
    p.add_argument("--out", required=True, metavar="MODEL_URI", help="where to write the bundle")
    p.add_argument(
        "--detectors",
        nargs="+",
        default=list(DETECTOR_NAMES),
        choices=list(DETECTOR_NAMES),
        metavar="NAME",
        help=f"detectors to train (default: all of {', '.join(DETECTOR_NAMES)})",
    )
    p.add_argument("--image-size", type=int, default=32, metavar="N", help="model input size in pixels (default 32)")
    p.add_argument("--channels", type=int, choices=(1, 3), help="1 or 3 (default: 3 if any image has colour)")
    p.add_argument("--epochs", type=int, default=30, metavar="N", help="training epochs (default 30)")
    p.add_argument("--normal-label", metavar="X", help="train the one-class detectors on this label only")
    p.add_argument("--anomaly-label", metavar="X", help="a label that marks known anomalies (the CAM anomaly class)")
    p.add_argument("--variational", action="store_true", help="train a VAE instead of a plain autoencoder")
    p.add_argument(
        "--backbone", default="autoencoder", help="mixture features: 'autoencoder' (default) or vgg16, resnet50, ..."
    )
    p.add_argument("--cam-backbone", default="small", help="CAM classifier backbone: 'small' (default) or vgg16, ...")
    p.add_argument("--weights", metavar="URI", help="backbone weights file (.weights.h5); never downloaded")
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="DETECTOR.NAME=VALUE",
        help="override a detector hyper-parameter (repeatable; VALUE is JSON or text), "
        "e.g. --param autoencoder.latent_dim=64 --param mixture.grid=2",
    )
    p.add_argument(
        "--calibration-replicas",
        type=int,
        default=0,
        metavar="R",
        help="below 1000 normal images, also calibrate each detector on the held-out scores of R copies "
        "trained with other seeds, brought to the model's scale (default 0: none; costs R more fits)",
    )
    p.add_argument("--seed", type=int, default=0)
    add_limit_flags(p)
    add_storage_options(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from jobs.cli import limit_kwargs, parse_storage_options
    from jobs.train import TrainConfig, train

    cfg = TrainConfig(
        source=args.source,
        out=args.out,
        detectors=tuple(args.detectors),
        image_size=args.image_size,
        channels=args.channels,
        epochs=args.epochs,
        normal_label=args.normal_label,
        anomaly_label=args.anomaly_label,
        variational=args.variational,
        backbone=args.backbone,
        cam_backbone=args.cam_backbone,
        weights=args.weights,
        seed=args.seed,
        calibration_replicas=args.calibration_replicas,
        params=parse_params(args.param),
        **limit_kwargs(args),
        storage_options=parse_storage_options(args.storage_options),
    )
    bundle = train(cfg)
    print(f"trained {', '.join(bundle.detectors)} -> {args.out} (version {bundle.version})")
    return 0


def parse_params(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["autoencoder.latent_dim=64", "mixture.grid=2"]`` -> ``{"autoencoder": {"latent_dim": 64}, ...}``.

    VALUE is read as JSON (numbers, lists, true/false/null) and kept as text when it is not JSON.
    """
    from jobs.cli import UsageError

    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        det, dot, name = key.partition(".")
        if not (sep and dot and det and name):
            raise UsageError(f"--param expects DETECTOR.NAME=VALUE, e.g. autoencoder.latent_dim=64. Received: {item!r}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        out.setdefault(det, {})[name] = value
    return out
