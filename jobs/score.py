"""``imgscan score``: score every image of an archive with a model bundle, on Ray Data.

Pipeline (streaming; memory is bounded by the shards in flight, not by the archive)::

    shard manifest (driver)  ->  read + decode + resize (CPU tasks, one shard per call,
    ->  ScoreActor pool (loads the bundle once, scores batches; GPUs if asked)
    ->  driver: iter_batches -> ShardAssembler -> parts/<shard_id>.parquet (atomic, per shard)

Everything that can be wrong with the input (flags, source, bundle, RESULTS_URI
holding another run) is checked before Ray starts. A killed run resumes with
the same ``--run-id``: committed shards are skipped, the rest is redone, and
every image ends in exactly one row.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from jobs.bundle import ModelBundle, check_bundle, read_manifest
from jobs.images import MAX_BYTES, MAX_PIXELS, check_limits
from jobs.ledger import (
    RunPlan,
    ShardAssembler,
    check_run_id,
    commit_part,
    manifest_fingerprint,
    plan_run,
    write_run,
)
from jobs.pool import PoolPlan, nodes_from_ray, plan_pool
from jobs.ray_setup import connect, local_gpus
from jobs.scoring import DECODE_CHUNK, decode_records, finish_part, score_table
from jobs.sources import Shard, TransientReadError, list_shards, read_shard
from jobs.storage import StorageError, check_writable, redact, remember_secrets

#: seconds a Ray Data actor pool may wait for its actors to start before failing (Ray's
#: default, -1, never gives up: an actor that fits nowhere must fail the job, not hang it)
WAIT_FOR_ACTORS_S = 600
#: seconds the driver waits for the next scored batch before it stops with one line; longer
#: than WAIT_FOR_ACTORS_S, so that slow actor start-ups get their own, clearer error first
STALL_TIMEOUT_S = 900.0
#: bytes of RAM one scoring actor is expected to hold (TensorFlow + a bundle), reserved in Ray
ACTOR_MEMORY = 1 << 30
#: rows a CPU actor hands the models at once. TensorFlow's oneDNN kernels keep the memory of
#: the largest activations they have seen, so an actor's memory follows its largest call,
#: not the batch it is given: at 64 px, calls of 256 rows left one actor's process with
#: 1,848 MiB of anonymous memory, of 128 rows 1,137 MiB, of 64 rows 751 MiB, at 14.3, 13.7
#: and 14.8 CPU-ms per image (``bench/actor_memory.py`` on the bench/throughput.py bundle,
#: 2026-12-03; CPU time on busy cores moves by ~5%). 64 keeps two actors and Ray within
#: 3.5 GiB. GPU actors take the whole --batch-size: a GPU wants large calls and holds the
#: activations in its own memory.
CPU_SCORE_ROWS = 64
#: bytes of object store of the embedded Ray (Ray's default is 30% of RAM). Ray Data lets the
#: blocks in flight fill half of it, so with the default a slow scorer lets decoding run ahead
#: by gigabytes and the job's memory grows with the archive; 512 MiB still holds a dozen
#: 256-row blocks of 224 px RGB images (38 MB each), hundreds at 64 px.
EMBEDDED_OBJECT_STORE = 512 << 20


@dataclass(frozen=True)
class ScoreConfig:
    """Flags of ``imgscan score``, validated once."""

    source: str
    models: str
    out: str
    run_id: str | None = None
    address: str | None = None  # None: RAY_ADDRESS if set (inside `ray job submit`), else Ray in-process
    workers: int | None = None  # scoring actors; None: one per GPU, or one per CPU
    gpus_per_worker: float = 0.0
    batch_size: int = 256
    num_cpus: int | None = None  # in-process Ray only; None: every core
    storage_options: dict[str, Any] = field(default_factory=dict)
    decode_chunk: int = DECODE_CHUNK
    max_pixels: int = MAX_PIXELS  # per image, from its header: more is an error row
    max_bytes: int = MAX_BYTES  # per input file: a larger one is an error row, read no further
    progress_every_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("source", "models", "out"):
            if not getattr(self, name):
                raise ValueError(f"--{name} must be a non-empty URI.")
        if self.run_id is not None:
            check_run_id(self.run_id)
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be >= 1. Received: {self.workers}.")
        if not (self.gpus_per_worker >= 0 and math.isfinite(self.gpus_per_worker)):
            raise ValueError(f"--gpus-per-worker must be >= 0. Received: {self.gpus_per_worker}.")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1. Received: {self.batch_size}.")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"--num-cpus must be >= 1. Received: {self.num_cpus}.")
        if self.num_cpus is not None and self.ray_address is not None:
            raise ValueError("--num-cpus sizes the in-process Ray; a cluster (--address) has its own.")
        if self.decode_chunk < 1:
            raise ValueError(f"--decode-chunk must be >= 1. Received: {self.decode_chunk}.")
        check_limits(self.max_pixels, self.max_bytes)
        remember_secrets(self.storage_options)  # masked in every line this process prints

    @property
    def ray_address(self) -> str | None:
        """The cluster to join, or None to start Ray in this process."""
        return self.address or os.environ.get("RAY_ADDRESS") or None


def log(msg: str) -> None:
    print(f"[imgscan score] {redact(msg)}", file=sys.stderr, flush=True)


# -- Ray layer: a decode function and a scoring actor ------------------------------------------------


def decode_shards(
    batch: pa.Table,
    *,
    size: int,
    channels: int,
    storage_options: dict[str, Any],
    chunk_rows: int,
    max_pixels: int,
    max_bytes: int,
) -> Iterator[pa.Table]:
    """Ray Data UDF: manifest rows (one per call) -> decoded tables of their images."""
    for row in batch.to_pylist():
        shard = Shard.from_row(row)
        yield from decode_records(
            read_shard(shard, storage_options, max_bytes=max_bytes),
            shard.uri,
            size,
            channels,
            chunk_rows=chunk_rows,
            max_pixels=max_pixels,
            max_bytes=max_bytes,
        )


class ScoreActor:
    """Ray Data actor: loads the bundle ONCE, then scores decoded tables (error rows pass
    through), ``score_rows`` rows per call of the models (None: the whole table)."""

    def __init__(
        self,
        models: str,
        storage_options: dict[str, Any],
        run_id: str,
        threads: int | None = None,
        score_rows: int | None = None,
    ) -> None:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        if threads:  # CPU actors share the cores: one TensorFlow pool per actor, sized to its share
            tf.config.threading.set_intra_op_parallelism_threads(threads)
            tf.config.threading.set_inter_op_parallelism_threads(threads)
        # before any model is built: TensorFlow otherwise takes all GPU memory up front
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
        self.bundle = ModelBundle.load(models, storage_options)
        self.run_id = run_id
        self.score_rows = score_rows

    def __call__(self, table: pa.Table) -> pa.Table:
        step = self.score_rows or max(table.num_rows, 1)
        if table.num_rows <= step:
            return score_table(self.bundle, table, run_id=self.run_id)
        # slices are zero-copy views; each is scored, and its activations freed, before the next
        return pa.concat_tables(
            score_table(self.bundle, table.slice(start, step), run_id=self.run_id)
            for start in range(0, table.num_rows, step)
        )


# -- the job -----------------------------------------------------------------------------------------


@dataclass
class Progress:
    """Counters of the driver; prints a line every ``every_s`` seconds."""

    total_shards: int
    every_s: float
    images: int = 0
    errors: int = 0
    shards: int = 0
    t0: float = field(default_factory=time.monotonic)
    _last: float = 0.0

    def add(self, part: pa.Table) -> None:
        self.images += part.num_rows
        self.errors += int(part.num_rows - sum(1 for s in part.column("status").to_pylist() if s == "ok"))
        self.shards += 1
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = now
            log(self.line())

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.t0

    def line(self) -> str:
        rate = self.images / max(self.seconds, 1e-9)
        return (
            f"{self.images} images done ({self.shards}/{self.total_shards} shards), "
            f"{rate:.1f} images/s, {self.errors} errors"
        )


def score(cfg: ScoreConfig) -> dict[str, Any]:
    """Run the scoring job; returns a summary dict (run_id, images, errors, shards, seconds, ...).

    Raises ``SourceError`` / ``BundleError`` / ``ValueError`` with a one-line
    message, before Ray starts, for a missing or empty source, an unreadable
    bundle or a RESULTS_URI that holds another run.
    """
    preflight(cfg)
    return score_shards(cfg, list_shards(cfg.source, cfg.storage_options))


def preflight(cfg: ScoreConfig) -> tuple[int, int, str]:
    """The checks that need no source: the bundle loads, GPUs asked of a machine that has
    some. Returns (input size, channels, model version); raises with one line."""
    size, channels, version = _validate_bundle(cfg.models, cfg.storage_options)
    if cfg.gpus_per_worker > 0 and cfg.ray_address is None and not local_gpus():
        raise ValueError(
            f"--gpus-per-worker {cfg.gpus_per_worker:g} needs GPUs, but this machine has none. "
            "Drop the flag to score on CPU, or pass --address of a cluster with GPU nodes."
        )
    return size, channels, version


def score_shards(cfg: ScoreConfig, shards: list[Shard]) -> dict[str, Any]:
    """Score these shards of ``cfg.source`` into ``cfg.out`` (``score`` lists them all;
    the nightly scan passes the new and changed ones). Call ``preflight`` first."""
    so = cfg.storage_options
    manifest = read_manifest(cfg.models, so)
    size, channels, version = int(manifest["input_size"]), int(manifest["channels"]), str(manifest["version"])
    facts = {
        "model_uri": cfg.models,
        "model_version": version,
        "source": cfg.source,
        "input_size": size,
        "channels": channels,
        "detectors": sorted(manifest["detectors"]),
        "n_shards": len(shards),
        "manifest_fingerprint": manifest_fingerprint(shards),
    }
    plan = plan_run(cfg.out, cfg.run_id, facts, so)
    pending = [s for s in shards if s.shard_id not in plan.committed]
    skipped = len(shards) - len(pending)
    progress = Progress(total_shards=len(pending), every_s=cfg.progress_every_s)
    if skipped:
        log(f"resuming run {plan.run_id}: {skipped} of {len(shards)} shards already committed")
    if pending:
        import ray

        check_writable(cfg.out, so)  # before Ray starts: not after the first shard is scored
        started = _connect(cfg)
        written = False
        try:
            _check_resources(cfg)
            write_run(cfg.out, plan, so)
            written = True
            _run_pipeline(cfg, plan, pending, size, channels, progress)
        except BaseException as e:
            if written:  # a refusal before the run was written leaves nothing to resume
                log(f"stopped after committing {progress.shards} shards; resume with --run-id {plan.run_id}")
            transient = _transient_cause(e)
            if transient is not None:  # Ray wraps it in a traceback of many lines: one line is enough
                # (Ray Data appends its own retry advice to the message: the first line is ours)
                first = str(transient).splitlines()[0]
                raise StorageError(f"{first} (resume with --run-id {plan.run_id})") from e
            if written and type(e) is StorageError:  # the output filled up or refused a write midway
                raise StorageError(f"{e} (make room or restore access, then resume with --run-id {plan.run_id})") from e
            raise
        finally:
            if started:
                ray.shutdown()
    else:
        write_run(cfg.out, plan, so)
    seconds = progress.seconds
    return {
        "run_id": plan.run_id,
        "out": cfg.out,
        "model_version": version,
        "shards": len(shards),
        "shards_skipped": skipped,
        "shards_committed": progress.shards,
        "images": progress.images,
        "errors": progress.errors,
        "seconds": round(seconds, 2),
        "images_per_s": round(progress.images / seconds, 1) if seconds > 0 else 0.0,
    }


def _transient_cause(e: BaseException) -> TransientReadError | None:
    """The ``TransientReadError`` of a decode task behind the exception Ray raised, if any
    (Ray's wrapper is an instance of it too, with the remote traceback for its text)."""
    seen: set[int] = set()
    stack: list[Any] = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if type(x) is TransientReadError:
            return x
        stack += [getattr(x, "cause", None), x.__cause__, x.__context__]
    return None


def summary_line(summary: dict[str, Any]) -> str:
    """The one line the command ends with."""
    resumed = f", {summary['shards_skipped']} already committed" if summary["shards_skipped"] else ""
    return (
        f"scored {summary['images']} images ({summary['errors']} errors) in {summary['shards_committed']} shards"
        f"{resumed} in {summary['seconds']:.1f}s ({summary['images_per_s']} images/s) -> {summary['out']} "
        f"(run {summary['run_id']}, model {summary['model_version']})"
    )


def _validate_bundle(models: str, storage_options: dict[str, Any]) -> tuple[int, int, str]:
    """Check every file of the bundle on the driver: a corrupt model file must fail now, in
    one line, not later in an actor. Without building the models (``check_bundle``): the
    driver never imports TensorFlow, which would hold ~1 GiB for the whole job.
    Returns (input size, channels, version)."""
    manifest = check_bundle(models, storage_options)
    return int(manifest["input_size"]), int(manifest["channels"]), str(manifest["version"])


def _connect(cfg: ScoreConfig) -> bool:
    """Join the cluster or start Ray here; True when this call started Ray (and must stop it)."""
    return connect(cfg.ray_address, cfg.num_cpus, object_store_memory=EMBEDDED_OBJECT_STORE)


def _check_resources(cfg: ScoreConfig) -> None:
    """Size the pool on the cluster's nodes now: a pool that fits nowhere would wait forever
    (Ray queues what it cannot place), so it is refused here in one line instead."""
    _pool(cfg)


def _pool(cfg: ScoreConfig) -> PoolPlan:
    """The pool (actors, CPUs per actor, CPUs per decode task), sized node by node (jobs/pool.py).

    On the nodes' total resources: inside ``ray job submit`` the driver holds none (Ray's
    job supervisor reserves 0 CPU unless ``--entrypoint-num-cpus`` etc. are given)."""
    import ray

    nodes = nodes_from_ray(ray.nodes())
    return plan_pool(nodes, workers=cfg.workers, gpus_per_worker=cfg.gpus_per_worker, actor_memory=ACTOR_MEMORY)


def build_dataset(cfg: ScoreConfig, run_id: str, pending: list[Shard], size: int, channels: int) -> Any:
    """The Ray Data pipeline (lazy): manifest rows -> decode tasks -> ScoreActor pool.

    Needs a connected Ray (it sizes the pool from the cluster's resources).
    """
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    so = dict(cfg.storage_options)
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False  # the driver prints its own progress lines
    ctx.print_on_execution_start = False
    ctx.wait_for_min_actors_s = WAIT_FOR_ACTORS_S
    pool = _pool(cfg)
    workers, actor_cpus, decode_cpus = pool.workers, pool.actor_cpus, pool.decode_cpus
    log(
        f"run {run_id}: {len(pending)} shards to score with {workers} actor(s) "
        f"({actor_cpus:g} CPU, {cfg.gpus_per_worker:g} GPU each), decode tasks of {decode_cpus:g} CPU, "
        f"batch {cfg.batch_size}"
    )
    manifest: ray.data.Dataset = ray.data.from_items([s.to_row() for s in pending], override_num_blocks=len(pending))
    ds = manifest.map_batches(
        decode_shards,  # type: ignore[arg-type]  # a generator of tables: Ray Data's stubs miss keyword-only UDFs
        batch_size=1,  # one shard per call: the unit of work
        batch_format="pyarrow",
        fn_kwargs={
            "size": size,
            "channels": channels,
            "storage_options": so,
            "chunk_rows": cfg.decode_chunk,
            "max_pixels": cfg.max_pixels,
            "max_bytes": cfg.max_bytes,
        },
        num_cpus=decode_cpus,
    )
    return ds.map_batches(
        ScoreActor,
        batch_size=cfg.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(size=workers),
        fn_constructor_kwargs={
            "models": cfg.models,
            "storage_options": so,
            "run_id": run_id,
            "threads": None if cfg.gpus_per_worker > 0 else max(1, math.floor(actor_cpus)),
            "score_rows": None if cfg.gpus_per_worker > 0 else CPU_SCORE_ROWS,
        },
        num_cpus=actor_cpus,
        num_gpus=cfg.gpus_per_worker or None,
        # What an actor holds (TensorFlow + the bundle), for the scheduler. It also keeps Ray
        # Data from fusing the decode tasks into the actors (it fuses ops whose remote args
        # match): fused, one actor task would take a bundle of `batch_size` manifest rows
        # (up to 256 whole shards) and decoding would stop overlapping with scoring.
        memory=ACTOR_MEMORY,
        # Ray Data restarts a dead actor and retries its tasks by default
        # (max_restarts=-1, max_task_retries=-1); a retried batch's rows are
        # dropped as repeats by the ShardAssembler.
    )


def _run_pipeline(
    cfg: ScoreConfig, plan: RunPlan, pending: list[Shard], size: int, channels: int, progress: Progress
) -> None:
    ds = build_dataset(cfg, plan.run_id, pending, size, channels)
    assembler = ShardAssembler()
    for batch in _batches(ds, STALL_TIMEOUT_S):
        for shard_id, tables in assembler.add(batch):
            _commit(cfg, shard_id, tables, progress)
    if assembler.open_shards:  # every row of a started shard carries on to the driver: a bug if not
        raise RuntimeError(f"Internal error: shards left incomplete: {assembler.open_shards[:5]}")
    # A shard with no images (an empty tar) yields no rows; the finished stream proves it empty.
    seen = assembler.done
    for shard in pending:
        if shard.shard_id not in seen:
            _commit(cfg, shard.shard_id, [], progress)
    if assembler.duplicates:
        log(f"dropped {assembler.duplicates} repeated rows (retried tasks)")
    log(progress.line())


def _batches(ds: Any, stall_s: float) -> Iterator[pa.Table]:
    """``ds.iter_batches()``, read in a thread so that the driver can stop waiting: raises
    ``TimeoutError`` (one line) when no batch comes for ``stall_s`` seconds. A pipeline
    whose tasks cannot get resources otherwise waits silently, forever. After that error the
    stalled Ray Data execution stays blocked in its (daemon) thread: the job's process is
    expected to end, as the command line does."""
    items: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=4)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                items.put(item, timeout=1.0)
                return True
        return False

    def produce() -> None:
        try:
            for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                if not put(("batch", batch)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the driver thread, raised there
            put(("error", e))

    # daemon: a producer stuck in a stalled pipeline must not keep the process alive
    threading.Thread(target=produce, name="imgscan-batches", daemon=True).start()
    try:
        while True:
            try:
                kind, value = items.get(timeout=stall_s)
            except queue.Empty:
                raise TimeoutError(_stall_message(stall_s)) from None
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


def _stall_message(stall_s: float) -> str:
    import ray

    free = ray.available_resources()
    total = ray.cluster_resources()
    have = (
        ", ".join(f"{free.get(k, 0.0):g} of {total[k]:g} {k}" for k in ("CPU", "GPU") if total.get(k))
        or "no CPU or GPU"
    )
    return (
        f"no images scored for {stall_s:g}s: the pipeline is waiting for resources it cannot get "
        f"(free on the cluster: {have}); stopped instead of waiting forever"
    )


def _commit(cfg: ScoreConfig, shard_id: str, tables: list[pa.Table], progress: Progress) -> None:
    part = finish_part(tables)
    commit_part(cfg.out, shard_id, part, cfg.storage_options)
    progress.add(part)
