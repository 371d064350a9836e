"""``imgscan audit``: which labelled images carry the wrong label, and which are duplicates.

Steps::

    source (any labelled source, any fsspec URI) -> decode + resize, a Ray task per shard
       (pixel blocks stay in the object store; the driver keeps ids, labels, hashes)
    -> K stratified folds -> K CamDetector fits as parallel Ray tasks
       (each scores the fold it never saw; embeds every image)
    -> cleanlab on the out-of-fold probabilities (label issues, noise matrix)
    -> duplicates: identical bytes + near neighbours of the fold models' embeddings
    -> AUDIT_URI: label_issues.parquet, duplicates.parquet, out_of_fold.parquet,
       summary.json, audit.html, folds/fold-K/{model.keras,meta.json}

Everything wrong with the input (flags, URIs, one class, a class smaller than
the folds, unlabelled images) is refused in one line before Ray starts.
Unreadable images are left out and listed in summary.json.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jobs.audit.result import AuditResult
from jobs.images import MAX_BYTES, MAX_PIXELS, check_limits
from jobs.ray_setup import check_gpus, connect, local_gpus
from jobs.sources import Shard, list_shards
from jobs.storage import filesystem, join, redact, write_bytes, write_json

#: columns of label_issues.parquet (one row per suspected issue, rank 1 = worst)
ISSUE_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("given_label", pa.string(), nullable=False),
        pa.field("suggested_label", pa.string(), nullable=False),
        pa.field("label_quality", pa.float64(), nullable=False),  # cleanlab self-confidence, low = suspect
        pa.field("rank", pa.int64(), nullable=False),
        pa.field("p_given", pa.float32(), nullable=False),  # out-of-fold probability of the given label
        pa.field("p_suggested", pa.float32(), nullable=False),
        pa.field("fold", pa.int64(), nullable=False),  # the fold that held the image out
    ]
)
#: columns of duplicates.parquet (one row per member of a duplicate group)
DUPLICATE_SCHEMA = pa.schema(
    [
        pa.field("group", pa.int64(), nullable=False),  # 0 = first group; conflicting groups come first
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("label", pa.string(), nullable=False),
        pa.field("similarity", pa.float64(), nullable=False),  # best cosine to another member; 1.0 = same bytes
        pa.field("kind", pa.string(), nullable=False),  # "exact" (same bytes) | "near"
        pa.field("conflicting", pa.bool_(), nullable=False),  # members carry different labels
    ]
)
#: columns of out_of_fold.parquet (one row per readable image)
OOF_SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("given_label", pa.string(), nullable=False),
        pa.field("fold", pa.int64(), nullable=False),
        pa.field("label_quality", pa.float64(), nullable=False),
        pa.field("is_issue", pa.bool_(), nullable=False),
        pa.field("probs", pa.list_(pa.float32()), nullable=False),  # in the order of summary.json "classes"
    ]
)
#: blocks of the fold models' small CNN (see AuditConfig.detector_params)
AUDIT_FILTERS = (16, 32, 64)
#: suspects and conflicting duplicate groups shown on the page
PAGE_SUSPECTS = 60
PAGE_GROUPS = 30


@dataclass(frozen=True)
class AuditConfig:
    """Flags of ``imgscan audit``, validated once."""

    source: str
    out: str
    folds: int = 5
    image_size: int = 32
    epochs: int = 15
    address: str | None = None  # None: RAY_ADDRESS if set (inside `ray job submit`), else Ray in-process
    gpus_per_fold: float = 0.0
    num_cpus: int | None = None  # in-process Ray only; None: every core
    seed: int = 0
    storage_options: dict[str, Any] = field(default_factory=dict)
    #: CamDetector keyword overrides (tests and benchmarks; the flags cover what users set)
    cam_params: dict[str, Any] = field(default_factory=dict)
    max_pixels: int = MAX_PIXELS  # per image, from its header: more is an unreadable input
    max_bytes: int = MAX_BYTES  # per input file: a larger one is unreadable, read no further

    def __post_init__(self) -> None:
        check_limits(self.max_pixels, self.max_bytes)
        for name in ("source", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{name} must be a non-empty URI.")
        if self.folds < 2:
            raise ValueError(
                f"--folds must be >= 2 (each image is scored by a model trained on the others). Received: {self.folds}."
            )
        if self.image_size < 16 or self.image_size % 4:
            raise ValueError(f"--image-size must be a multiple of 4 and >= 16. Received: {self.image_size}.")
        if self.epochs < 1:
            raise ValueError(f"--epochs must be >= 1. Received: {self.epochs}.")
        if not (self.gpus_per_fold >= 0 and math.isfinite(self.gpus_per_fold)):
            raise ValueError(f"--gpus-per-fold must be >= 0. Received: {self.gpus_per_fold}.")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"--num-cpus must be >= 1. Received: {self.num_cpus}.")
        if self.num_cpus is not None and self.ray_address is not None:
            raise ValueError("--num-cpus sizes the in-process Ray; a cluster (--address) has its own.")
        for uri in (self.source, self.out):
            filesystem(uri, self.storage_options)  # an unknown scheme fails here, in one line

    @property
    def ray_address(self) -> str | None:
        """The cluster to join, or None to start Ray in this process."""
        return self.address or os.environ.get("RAY_ADDRESS") or None

    def detector_params(self, channels: int) -> dict[str, Any]:
        """CamDetector keyword arguments of every fold."""
        return {
            "input_size": self.image_size,
            "channels": channels,
            "epochs": self.epochs,
            # K models instead of one: half the filters of `imgscan train`'s CAM (a quarter of
            # the compute) keeps five folds of 1,797 digits at 32 px under ten minutes on two
            # cores (bench/audit.py)
            "filters": AUDIT_FILTERS,
            # a model that fits noisy labels learns the mistakes this audit looks for: fresh
            # shifts of up to a tenth of the side every epoch, and a learning rate that decays
            # to zero so that the last epoch is a settled model (see bench/audit.py)
            "shift": max(1, self.image_size // 10),
            "schedule": "cosine",
            # every image is in the training set of K-1 folds already; a validation split
            # would only take images away from the models
            "validation_fraction": 0.0,
            "seed": self.seed,
            **self.cam_params,
        }


def log(msg: str) -> None:
    print(f"[imgscan audit] {redact(msg)}", file=sys.stderr, flush=True)


# -- refusals -------------------------------------------------------------------------------------


def check_labels(labels: Sequence[str | None], ids: Sequence[str], folds: int, source: str) -> None:
    """One ValueError line for labels the audit cannot use: none, one class, a class under ``folds``."""
    missing = [i for i, lbl in zip(ids, labels, strict=True) if lbl is None]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(labels)} images of {source} have no label (e.g. {missing[0]}); the audit "
            "checks labels, so every image needs one (class subfolders, .cls/.json members or a label column)."
        )
    counts = Counter(str(lbl) for lbl in labels)
    if len(counts) < 2:
        only = next(iter(counts), None)
        raise ValueError(
            f"{source} has one class ({only!r}, {counts.get(only, 0) if only else 0} images); "
            "the audit compares classes and needs at least two."
        )
    small = sorted((n, c) for c, n in counts.items() if n < folds)
    if small:
        n, c = small[0]
        more = f" (and {len(small) - 1} more class(es) under {folds})" if len(small) > 1 else ""
        raise ValueError(
            f"Class {c!r} has {n} image(s), fewer than --folds {folds}{more}: every fold must hold every class. "
            f"Add images, drop the class, or pass --folds {max(2, n)}."
            if n >= 2
            else f"Class {c!r} has {n} image(s), fewer than --folds {folds}{more}: every fold must hold every "
            "class, and a class of one image cannot be checked. Add images or drop the class."
        )


def check_manifest(shards: Sequence[Shard], folds: int, source: str) -> None:
    """For folder sources the labels are known from the listing: refuse before reading any image."""
    if shards and all(s.kind == "files" for s in shards):
        labels = [lbl for s in shards for lbl in s.labels]
        ids = [m for s in shards for m in s.members]
        check_labels(labels, ids, folds, source)


# -- the job --------------------------------------------------------------------------------------


def audit(cfg: AuditConfig) -> dict[str, Any]:
    """Run the audit; returns summary.json's content (also written under ``cfg.out``)."""
    import ray

    t0 = time.monotonic()
    shards = list_shards(cfg.source, cfg.storage_options)
    check_manifest(shards, cfg.folds, cfg.source)
    if cfg.gpus_per_fold > 0 and cfg.ray_address is None and not local_gpus():
        raise ValueError(
            f"--gpus-per-fold {cfg.gpus_per_fold:g} needs GPUs, but this machine has none. "
            "Drop the flag to train on CPU, or pass --address of a cluster with GPU nodes."
        )
    started = connect(cfg.ray_address, cfg.num_cpus)
    try:
        check_gpus("--gpus-per-fold", cfg.gpus_per_fold, cfg.ray_address)
        # the pixels stay in Ray's object store until the job ends: the fold tasks train on
        # them, and the duplicate check and the page read the few rows they need
        with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the summary line
            summary = _audit(cfg, shards, t0)
    finally:
        if started:
            ray.shutdown()
    log(f"wrote {cfg.out}")
    return summary


def _audit(cfg: AuditConfig, shards: Sequence[Shard], t0: float) -> dict[str, Any]:
    from jobs.audit.blocks import decode_blocks
    from jobs.audit.duplicates import find_duplicates
    from jobs.audit.folds import FoldPlan, assign_folds, fold_facts, joint_embeddings, out_of_fold, run_folds
    from jobs.audit.issues import find_issues, issues_per_class
    from jobs.audit.page import render_page, suspects_and_groups
    from jobs.audit.result import AuditResult

    so = cfg.storage_options
    blocks = decode_blocks(
        shards, cfg.image_size, cfg.source, so, progress=log, max_pixels=cfg.max_pixels, max_bytes=cfg.max_bytes
    )
    check_labels(blocks.labels, blocks.ids, cfg.folds, cfg.source)
    names = [str(lbl) for lbl in blocks.labels]
    classes = sorted(set(names))
    labels = np.array([classes.index(v) for v in names], np.int64)
    fold_of = assign_folds(labels, cfg.folds, cfg.seed)
    log(
        f"{len(blocks)} images in {len(classes)} classes ({len(blocks.skipped)} unreadable, left out), "
        f"{cfg.image_size}px x {blocks.channels} channel(s), {cfg.folds} folds x {cfg.epochs} epochs"
    )
    plan = FoldPlan(labels, tuple(classes), fold_of, cfg.detector_params(blocks.channels))
    results = run_folds(blocks, plan, gpus_per_fold=cfg.gpus_per_fold, progress=log)

    probs = out_of_fold(results, len(blocks))
    found = find_issues(labels, probs)
    oof_accuracy = float((probs.argmax(axis=1) == labels).mean())
    log(f"out-of-fold accuracy {oof_accuracy:.4f}; cleanlab finds {int(found.is_issue.sum())} label issues")
    groups = find_duplicates(blocks.digests, joint_embeddings(results), names, take=blocks.take)
    conflicting = sum(g.conflicting for g in groups)
    log(f"{len(groups)} duplicate groups ({conflicting} with conflicting labels)")
    result = AuditResult(blocks.ids, names, classes, labels, fold_of, probs, found, groups)

    summary = {
        "source": cfg.source,
        "out": cfg.out,
        "images": len(blocks),
        "classes": classes,
        "folds": cfg.folds,
        "image_size": cfg.image_size,
        "channels": blocks.channels,
        "epochs": cfg.epochs,
        "seed": cfg.seed,
        "oof_accuracy": round(oof_accuracy, 6),
        "label_issues": int(found.is_issue.sum()),
        "issues_per_class": issues_per_class(found, labels, classes),
        "noise_matrix": {
            "description": "P(given label = row | true label = column), cleanlab's estimate",
            "classes": classes,
            "values": np.round(found.noise_matrix, 6).tolist(),
        },
        "confident_joint": found.confident_joint.tolist(),
        "duplicates": {
            "groups": len(groups),
            "conflicting_groups": conflicting,
            "exact_groups": sum(g.kind == "exact" for g in groups),
            "near_groups": sum(g.kind == "near" for g in groups),
            "images": sum(len(g.members) for g in groups),
        },
        "unreadable": blocks.skipped,
        "n_unreadable": len(blocks.skipped),
        "fold_models": [fold_facts(r) for r in results],
    }
    _write_tables(cfg, result)
    for r in results:  # the evidence behind each held-out probability, and the page's CAMs, reproducible
        for name, data in r.model.items():
            write_bytes(join(cfg.out, "folds", f"fold-{r.fold}", name), data, so)
    suspects, dup_cards = suspects_and_groups(
        result,
        [r.model for r in results],
        blocks.take,
        storage_options=so,
        max_suspects=PAGE_SUSPECTS,
        max_groups=PAGE_GROUPS,
    )
    summary["seconds"] = round(time.monotonic() - t0, 1)
    summary["driver_cpu_seconds"] = round(time.process_time(), 1)
    write_bytes(join(cfg.out, "audit.html"), render_page(summary, suspects, dup_cards).encode("utf-8"), so)
    write_json(join(cfg.out, "summary.json"), summary, so)
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    """The one line the command ends with."""
    d = summary["duplicates"]
    return (
        f"audited {summary['images']} images ({summary['n_unreadable']} unreadable, left out) in "
        f"{len(summary['classes'])} classes: {summary['label_issues']} label issues, {d['groups']} duplicate "
        f"groups ({d['conflicting_groups']} conflicting), out-of-fold accuracy {summary['oof_accuracy']:.4f}, "
        f"in {summary['seconds']:.1f}s -> {summary['out']}"
    )


def _write_tables(cfg: AuditConfig, result: AuditResult) -> None:
    so = cfg.storage_options
    found, ids, names, probs = result.found, result.ids, result.names, result.probs
    r = found.ranked
    issues = pa.table(
        {
            "image_id": [ids[i] for i in r],
            "given_label": [names[i] for i in r],
            "suggested_label": [result.classes[found.suggested[i]] for i in r],
            "label_quality": found.quality[r],
            "rank": np.arange(1, len(r) + 1, dtype=np.int64),
            "p_given": probs[r, result.labels[r]],
            "p_suggested": probs[r, found.suggested[r]],
            "fold": result.fold_of[r],
        },
        schema=ISSUE_SCHEMA,
    )
    rows = [
        (g, i, s, grp.kind, grp.conflicting)
        for g, grp in enumerate(result.groups)
        for i, s in zip(grp.members, grp.similarity, strict=True)
    ]
    dups = pa.table(
        {
            "group": [g for g, *_ in rows],
            "image_id": [ids[i] for _, i, *_ in rows],
            "label": [names[i] for _, i, *_ in rows],
            "similarity": [s for _, _, s, *_ in rows],
            "kind": [k for *_, k, _ in rows],
            "conflicting": [c for *_, c in rows],
        },
        schema=DUPLICATE_SCHEMA,
    )
    oof = pa.table(
        {
            "image_id": list(ids),
            "given_label": list(names),
            "fold": result.fold_of,
            "label_quality": found.quality,
            "is_issue": found.is_issue,
            "probs": list(probs.astype(np.float32)),
        },
        schema=OOF_SCHEMA,
    )
    for name, table in (("label_issues", issues), ("duplicates", dups), ("out_of_fold", oof)):
        write_bytes(join(cfg.out, f"{name}.parquet"), _parquet(table), so)


def _parquet(table: pa.Table) -> bytes:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()
