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
class FoldResult:
    """What one fold hands back to the driver.

    held: int64 (m,), positions of the images the fold's model never saw;
    probs: float32 (m, k), its class probabilities for them (columns in the order of ``classes``);
    embeddings: float16 (n, d), unit-length ``cam_gap`` vectors of EVERY image (for duplicates);
    model: the fitted detector's files (``CamDetector.to_files``), for the CAM maps of the page.
    """

    fold: int
    held: np.ndarray
    probs: np.ndarray
    embeddings: np.ndarray
    model: dict[str, bytes]
    seconds: float


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


def train_fold(
    images: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    fold_of: np.ndarray,
    fold: int,
    params: Mapping[str, Any],
) -> FoldResult:
    """Fit a CamDetector on the images whose fold is not ``fold``; score the rest.

    images: uint8 (n, s, s, c); labels: int (n,) indices into ``classes``;
    fold_of: int (n,); params: CamDetector keyword arguments.
    """
    from detectors.cam import CamDetector

    t0 = time.monotonic()
    train = np.flatnonzero(fold_of != fold)
    held = np.flatnonzero(fold_of == fold)
    names = [classes[i] for i in labels[train]]
    det = CamDetector(**params).fit(images[train], names)
    if list(det.classes_) != list(classes):  # every class is in every training set (stratified, >= K per class)
        raise RuntimeError(f"Internal error: fold {fold} learned classes {det.classes_}, expected {list(classes)}.")
    probs, embeddings = det.predict_embeddings(images)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit = (embeddings / np.maximum(norms, 1e-12)).astype(np.float16)
    return FoldResult(fold, held, probs[held], unit, det.to_files(), time.monotonic() - t0)


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
    }


def _fold_task(
    images: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    fold_of: np.ndarray,
    fold: int,
    params: Mapping[str, Any],
    threads: int,
) -> FoldResult:
    """Ray task body: size TensorFlow to the task's CPU share, then ``train_fold``."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

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
    return train_fold(images, labels, classes, fold_of, fold, params)


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
    images: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    fold_of: np.ndarray,
    params: Mapping[str, Any],
    *,
    gpus_per_fold: float = 0.0,
    progress: Callable[[str], None] | None = None,
) -> list[FoldResult]:
    """Train the folds as parallel Ray tasks (needs a connected Ray); results in fold order.

    The images go to the object store once and every task reads the same copy.
    """
    import ray

    folds = int(fold_of.max()) + 1
    cpus, threads = fold_resources(float(ray.cluster_resources().get("CPU", 1.0)), folds, gpus_per_fold)
    task = ray.remote(num_cpus=cpus, num_gpus=gpus_per_fold, max_retries=1)(_fold_task)
    refs = [ray.put(a) for a in (images, labels, fold_of)]
    if progress:
        progress(f"training {folds} folds as Ray tasks ({cpus:g} CPU, {gpus_per_fold:g} GPU, {threads} thread(s) each)")
    pending = {task.remote(refs[0], refs[1], list(classes), refs[2], f, dict(params), threads): f for f in range(folds)}
    results: dict[int, FoldResult] = {}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        res: FoldResult = ray.get(done[0])
        del pending[done[0]]
        results[res.fold] = res
        if progress:
            progress(f"fold {res.fold} done in {res.seconds:.0f}s ({len(results)}/{folds})")
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
