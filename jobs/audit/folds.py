"""K-fold training of the CAM classifier: out-of-fold probabilities and embeddings.

Pure core (no Ray): ``assign_folds`` (stratified, seeded) and ``train_fold``
(fit one CamDetector on every fold but one, score the held-out fold). The Ray
layer (``run_folds``) runs the K folds as parallel tasks and gathers their
results; the driver never trains.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class FoldPlan:
    """What every fold task shares (one copy in the object store).

    labels: int64 (n,) indices into ``classes``, in block order; fold_of: int64 (n,) in
    [0, K); params: CamDetector keyword arguments; tta: held-out probabilities averaged
    over shifted copies (``shifted_mean_probs``) instead of one pass.
    """

    labels: np.ndarray
    classes: tuple[str, ...]
    fold_of: np.ndarray
    params: Mapping[str, Any]
    tta: bool = True

    @property
    def folds(self) -> int:
        return int(self.fold_of.max()) + 1


@dataclass(frozen=True)
class FoldResult:
    """What one fold hands back to the driver.

    held: int64 (m,), positions of the images the fold's model never saw;
    probs: float32 (m, k), its class probabilities for them (columns in the order of ``classes``);
    embeddings: float16 (n, d), unit-length ``cam_gap`` vectors of EVERY image (for duplicates);
    model: the fitted detector's files (``CamDetector.to_files``), for the CAM maps of the page;
    seconds / cpu_seconds: wall time and CPU time (every thread of the task's process) of the fold.
    """

    fold: int
    held: np.ndarray
    probs: np.ndarray
    embeddings: np.ndarray
    model: dict[str, bytes]
    seconds: float
    cpu_seconds: float


def assign_folds(labels: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Stratified fold of each image: labels int (n,) -> int64 (n,) in [0, folds).

    Every class must have at least ``folds`` images (checked by the caller, with a
    message for people); then every fold holds every class and every training set too.
    """
    from sklearn.model_selection import StratifiedKFold

    fold_of = np.full(len(labels), -1, np.int64)
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for f, (_, held) in enumerate(split.split(np.zeros(len(labels)), labels)):
        fold_of[held] = f
    assert (fold_of >= 0).all()
    return fold_of


def train_fold(images: np.ndarray, plan: FoldPlan, fold: int) -> FoldResult:
    """Fit a CamDetector on the images whose fold is not ``fold``; score the rest.

    images: uint8 (n, s, s, c), in the order of ``plan.labels``.
    """
    from detectors.cam import CamDetector

    t0, c0 = time.monotonic(), time.process_time()
    train = np.flatnonzero(plan.fold_of != fold)
    held = np.flatnonzero(plan.fold_of == fold)
    names = [plan.classes[i] for i in plan.labels[train]]
    det = CamDetector(**plan.params).fit(images[train], names)
    if list(det.classes_) != list(plan.classes):  # every class is in every training set (stratified, >= K per class)
        raise RuntimeError(f"Internal error: fold {fold} learned {det.classes_}, expected {list(plan.classes)}.")
    probs, embeddings = det.predict_embeddings(images)
    held_probs = shifted_mean_probs(det, images[held]) if plan.tta else probs[held]
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = (embeddings / np.maximum(norms, 1e-12)).astype(np.float16)
    return FoldResult(fold, held, held_probs, unit, det.to_files(), time.monotonic() - t0, time.process_time() - c0)


def shift(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """uint8 (n, h, w, c) moved by (dy, dx) pixels, zero-filled: uint8 (n, h, w, c)."""
    _, h, w, _ = images.shape
    out = np.zeros_like(images)
    out[:, max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = images[
        :, max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def shifted_mean_probs(det: Any, images: np.ndarray) -> np.ndarray:
    """Class probabilities averaged over the image and its 8 copies moved by the model's
    training ``shift`` in every direction: float32 (n, k) for uint8 images (n, s, s, c).

    Test-time augmentation: the models learned that a label does not depend on where the
    digit sits, so every shifted copy is a fair second opinion, and their mean is a steadier
    estimate than one pass (see bench/audit_variants.py).
    """
    s = int(det.shift)
    offsets = [(0, 0)] if s == 0 else [(dy, dx) for dy in (-s, 0, s) for dx in (-s, 0, s)]
    total = np.zeros((len(images), len(det.classes_)), np.float64)
    for dy, dx in offsets:
        total += det.predict_embeddings(shift(images, dy, dx))[0]
    return (total / len(offsets)).astype(np.float32)


def fold_facts(result: FoldResult) -> dict[str, Any]:
    """What summary.json records of a fold model: the fingerprint of the data it was trained
    on (``detectors.base.fingerprint`` of its images and labels, in order), so that anyone can
    check that no image was scored by a model that saw it."""
    import json

    meta = json.loads(result.model["meta.json"])
    return {
        "fold": result.fold,
        "n_train": int(meta["n_train"]),
        "n_held_out": len(result.held),
        "train_fingerprint": meta["fingerprint"],
        "seconds": round(result.seconds, 1),
        "cpu_seconds": round(result.cpu_seconds, 1),
    }


def _fold_task(plan: FoldPlan, blocks: list[Any], channels: int, fold: int, threads: int) -> FoldResult:
    """Ray task body: size TensorFlow to the task's CPU share, read the image blocks
    (``jobs.audit.blocks``: ObjectRefs), then ``train_fold``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import ray
    import tensorflow as tf

    from jobs.audit.blocks import assemble

    # Thread pools can be set only before TensorFlow runs anything in this worker;
    # a reused worker keeps its first setting (same value: nothing lost).
    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        pass
    # same data + same seed -> the same audit on any store and any worker (a test compares
    # an S3 run with a local one); costs little on a CNN this small
    tf.config.experimental.enable_op_determinism()
    return train_fold(assemble(ray.get(blocks), channels), plan, fold)


def fold_resources(cluster_cpus: float, folds: int, gpus_per_fold: float) -> tuple[float, int]:
    """(CPUs reserved per fold task, TensorFlow threads per task).

    On GPUs a fold takes one CPU to feed its GPU. On CPUs the folds share the
    cluster's CPUs minus half a CPU, left for Ray's own work and the driver (a
    task set that reserves every CPU starves everything else), capped at 4 CPUs
    a fold: beyond that one small CNN does not go faster.
    """
    if gpus_per_fold > 0:
        return 1.0, 1
    share = max(0.1, min(4.0, (cluster_cpus - 0.5) / folds))
    return round(share, 3), max(1, math.floor(share))


def run_folds(
    blocks: Any,
    plan: FoldPlan,
    *,
    gpus_per_fold: float = 0.0,
    progress: Callable[[str], None] | None = None,
) -> list[FoldResult]:
    """Train the folds as parallel Ray tasks (needs a connected Ray); results in fold order.

    blocks: ``jobs.audit.blocks.ImageBlocks``; the pixels go from the object store to the
    tasks, never through the driver.
    """
    import ray

    folds = plan.folds
    cpus, threads = fold_resources(float(ray.cluster_resources().get("CPU", 1.0)), folds, gpus_per_fold)
    task = ray.remote(num_cpus=cpus, num_gpus=gpus_per_fold, max_retries=1)(_fold_task)
    plan_ref = ray.put(plan)
    if progress:
        progress(f"training {folds} folds as Ray tasks ({cpus:g} CPU, {gpus_per_fold:g} GPU, {threads} thread(s) each)")
    refs = list(blocks.refs)  # inside a list: passed as references, read by the task itself
    pending = {task.remote(plan_ref, refs, blocks.channels, f, threads): f for f in range(folds)}
    results: dict[int, FoldResult] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        res: FoldResult = ray.get(done[0])
        del pending[done[0]]
        results[res.fold] = res
        if progress:
            progress(
                f"fold {res.fold} done in {res.seconds:.0f}s, {res.cpu_seconds:.0f} CPU-s ({len(results)}/{folds})"
            )
    return [results[f] for f in range(folds)]


def out_of_fold(results: Sequence[FoldResult], n: int) -> np.ndarray:
    """Assemble the held-out probabilities: float32 (n, k); each row from the one fold that held it out."""
    k = results[0].probs.shape[1]
    probs = np.full((n, k), np.nan, np.float32)
    for r in results:
        probs[r.held] = r.probs
    if np.isnan(probs).any():
        raise RuntimeError("Internal error: some images got no out-of-fold probabilities.")
    return probs


def joint_embeddings(results: Sequence[FoldResult]) -> np.ndarray:
    """float32 (n, K * d): the folds' unit embeddings side by side, scaled by 1/sqrt(K).

    Unit length again, and the cosine of two rows is the MEAN of the K fold
    models' cosines: each model's space is its own, so they are not averaged as
    vectors; a pair must look alike to the models on average.
    """
    k = len(results)
    return np.concatenate([r.embeddings.astype(np.float32) for r in results], axis=1) / np.float32(math.sqrt(k))
