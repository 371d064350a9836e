"""Throughput and memory of ``imgscan score`` on this machine (a measurement, not a test).

    PYTHONPATH=. python bench/throughput.py [--images 20000] [--memory 10000 40000] [--workdir DIR]
                                            [--per-detector-only]

1. Generates ``--images`` real digits at 64x64 (the 1,797 of scikit-learn, shifted
   and noised so that no two are equal), as WebDataset tar shards on local disk.
2. Trains the full bundle (autoencoder, mixture, CAM, OCSVM) at 64 px for a few epochs.
3. Measures, each on the same detectors:
   * per detector: each detector's ``score`` alone on in-memory batches, one process;
   * ceiling: ``bundle.score`` on pre-decoded in-memory uint8 batches, one process;
   * sequential: a plain script that opens each shard, decodes each file, predicts per batch;
   * end-to-end: ``python -m jobs score`` (embedded Ray) on the whole archive, from the
     job's own summary (includes Ray and actor start-up) and in steady state (first to
     last committed part);
   * peak memory (PSS of the job's process tree: driver, Ray, workers) at each size of
     ``--memory``.
4. Prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
PER_SHARD = 500


def make_archive(root: Path, n: int, seed: int = 0) -> Path:
    """``root/scan-<n>/shard-*.tar``: n distinct 64x64 digits (shift + noise of the real ones)."""
    from jobs.demo_data import digits, samples, write_tar_shards

    out = root / f"scan-{n}"
    if (out / "done").exists():
        return out
    base, labels = digits(SIZE)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(base), n)
    shifts = rng.integers(-4, 5, size=(n, 2))
    imgs = np.empty((n, SIZE, SIZE), np.uint8)
    for i, (j, (dy, dx)) in enumerate(zip(idx, shifts, strict=True)):
        noisy = base[j].astype(np.int16) + rng.integers(-8, 9, (SIZE, SIZE))
        imgs[i] = np.roll(np.clip(noisy, 0, 255).astype(np.uint8), (dy, dx), axis=(0, 1))
    write_tar_shards(str(out), samples(imgs, [str(v) for v in labels[idx]]), PER_SHARD)
    (out / "done").write_text("ok")
    return out


def train_bundle(root: Path, epochs: int) -> str:
    from jobs.demo_data import digits, samples, write_folder
    from jobs.train import TrainConfig, train

    model = root / "model"
    if (model / "bundle.json").exists():
        return str(model)
    imgs, labels = digits(SIZE)
    write_folder(str(root / "train"), samples(imgs[:1000], [str(v) for v in labels[:1000]]))
    train(TrainConfig(source=str(root / "train"), out=str(model), image_size=SIZE, epochs=epochs))
    return str(model)


def _decoded(model: str, archive: Path, n: int) -> tuple[Any, np.ndarray]:
    """(bundle, the first ``n`` images of the archive decoded as the job does: uint8 (n, 64, 64, 1))."""
    from jobs.bundle import ModelBundle
    from jobs.scoring import decode_record
    from jobs.sources import list_shards, read_shard

    bundle = ModelBundle.load(model)
    pixels = []
    for shard in list_shards(str(archive)):
        for rec in read_shard(shard):
            pixels.append(decode_record(rec, bundle.input_size, bundle.channels)["pixels"])
            if len(pixels) == n:
                break
        if len(pixels) == n:
            break
    return bundle, np.stack(pixels)


def _rate(score: Any, x: np.ndarray, batch_size: int) -> float:
    score(x[:batch_size])  # warm-up: graph tracing is start-up, not throughput
    t0 = time.perf_counter()
    for start in range(0, len(x), batch_size):
        score(x[start : start + batch_size])
    return len(x) / (time.perf_counter() - t0)


def ceiling(model: str, archive: Path, n: int, batch_size: int) -> float:
    """images/s of bundle.score on pre-decoded uint8 (n, 64, 64, 1) batches in this process."""
    bundle, x = _decoded(model, archive, n)
    return _rate(bundle.score, x, batch_size)


def per_detector(model: str, archive: Path, n: int, batch_size: int) -> dict[str, float]:
    """images/s of each detector's score alone, as ``ceiling`` measures the bundle (one process)."""
    bundle, x = _decoded(model, archive, n)
    return {name: _rate(det.score, x, batch_size) for name, det in bundle.detectors.items()}


def sequential(model: str, archive: Path, n: int, batch_size: int) -> float:
    """images/s of a plain script: open each tar, decode each file, predict per batch."""
    import io

    from PIL import Image

    from jobs.bundle import ModelBundle

    bundle = ModelBundle.load(model)
    bundle.score(np.zeros((1, SIZE, SIZE, 1), np.uint8))  # warm-up, as for the ceiling
    t0 = time.perf_counter()
    done, batch = 0, []
    for path in sorted(archive.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.name.endswith(".png"):
                    continue
                f = tar.extractfile(member)
                assert f is not None
                im = Image.open(io.BytesIO(f.read())).convert("L").resize((SIZE, SIZE))
                batch.append(np.asarray(im)[:, :, None])
                if len(batch) == batch_size:
                    bundle.score(np.stack(batch))
                    done, batch = done + len(batch), []
                if done >= n:
                    return done / (time.perf_counter() - t0)
    if batch:
        bundle.score(np.stack(batch))
        done += len(batch)
    return done / (time.perf_counter() - t0)


def _psutil() -> Any:
    """psutil as shipped inside Ray (``import ray`` puts it on sys.path; not a dependency of ours)."""
    import ray  # noqa: F401

    return importlib.import_module("psutil")


def pss_of(pid: int) -> int:
    """PSS of one process in bytes, from /proc/PID/smaps_rollup (Linux >= 4.14): the kernel
    sums it, which costs far less than parsing smaps (psutil's memory_full_info) while a
    TensorFlow actor maps thousands of regions. 0 when the process is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


#: (role, pattern on the command line), first match wins; Ray names its workers by
#: process title (``ray::ScoreActor``, ``ray::IDLE``, ``ray::MapBatches(decode_shards)``)
ROLES: tuple[tuple[str, str], ...] = (
    ("gcs_server", r"gcs_server"),
    ("raylet (+ object store)", r"/raylet( |$)"),
    ("dashboard agent", r"dashboard/agent\.py|^ray::DashboardAgent"),
    ("runtime-env agent", r"runtime_env/agent/main\.py|^ray::RuntimeEnvAgent"),
    ("dashboard (head, no UI)", r"dashboard/dashboard\.py"),
    ("autoscaler monitor", r"autoscaler/_private/monitor\.py"),
    ("log monitor", r"log_monitor\.py"),
    ("scoring actor", r"^ray::ScoreActor|^ray::MapWorker"),
    ("decode task", r"^ray::(MapBatches|ReadItems|FromItems|Map)"),
    ("Ray Data stats actor", r"^ray::_StatsActor"),
    ("Ray Data autoscaling actor", r"^ray::_AutoscalingCoordinatorActor"),
    ("Ray Data actor-location actor", r"^ray::ActorLocationTracker"),
    ("idle worker", r"^ray::IDLE"),
    ("other Ray worker", r"^ray::"),
)


def role_of(cmdline: str, is_root: bool) -> str:
    if is_root:
        return "driver"
    for role, pattern in ROLES:
        if re.search(pattern, cmdline):
            return role
    return "other: " + cmdline[:60]


class PeakPss:
    """Samples the PSS (proportional set size: shared pages counted once, split among the
    processes that map them) of a process tree every ``every_s`` seconds. ``peak``: the
    largest total in bytes; ``at_peak``: [(role, pid, bytes)] of the sample that made it;
    ``role_peaks``: the largest total of each role over the run."""

    def __init__(self, pid: int, every_s: float = 0.5) -> None:
        psutil = _psutil()
        self.root = psutil.Process(pid)
        self.every_s = every_s
        self.peak = 0
        self.at_peak: list[tuple[str, int, int]] = []
        self.role_peaks: dict[str, int] = {}
        self._cpu: dict[int, float] = {}  # pid -> user + system CPU seconds, last seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _role(self, p: Any) -> str:
        # a worker's title changes (IDLE -> a task -> IDLE): read it every sample
        psutil = _psutil()
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            return "gone"
        return role_of(cmd, p.pid == self.root.pid)

    def _run(self) -> None:
        psutil = _psutil()
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                break
            sample = [(self._role(p), p.pid, pss_of(p.pid)) for p in procs]
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    self._cpu[p.pid] = t.user + t.system
            total = sum(b for _, _, b in sample)
            by_role: dict[str, int] = {}
            for role, _, b in sample:
                by_role[role] = by_role.get(role, 0) + b
            for role, b in by_role.items():
                self.role_peaks[role] = max(self.role_peaks.get(role, 0), b)
            if total > self.peak:
                self.peak, self.at_peak = total, sample
            self._stop.wait(self.every_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak

    @property
    def cpu_s(self) -> float:
        """CPU seconds of every process the tree ever had, as last sampled (a process that
        exits loses at most its last ``every_s`` seconds)."""
        return sum(self._cpu.values())

    def breakdown(self) -> str:
        """Per role at the peak: 'role xN: MiB' lines, largest first."""
        by: dict[str, list[int]] = {}
        for role, _, b in self.at_peak:
            by.setdefault(role, []).append(b)
        lines = []
        for role, sizes in sorted(by.items(), key=lambda kv: -sum(kv[1])):
            each = ", ".join(f"{b / 2**20:.0f}" for b in sorted(sizes, reverse=True))
            lines.append(
                f"    {role} x{len(sizes)}: {sum(sizes) / 2**20:.0f} MiB ({each}); "
                f"role's own peak {self.role_peaks.get(role, 0) / 2**20:.0f} MiB"
            )
        return "\n".join(lines)


def run_job(
    model: str, archive: Path, out: Path, batch_size: int, workers: int | None, per_shard: int = PER_SHARD
) -> dict[str, Any]:
    """``python -m jobs score`` in a fresh process; its summary, steady-state rate (``per_shard``:
    images of the first part, which the rate leaves out) and peak PSS."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "jobs", "score", "--source", str(archive), "--models", model, "--out", str(out)]
    cmd += ["--batch-size", str(batch_size)] + (["--workers", str(workers)] if workers else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    mem = PeakPss(proc.pid)
    deadline = t0 + 7200
    while True:
        try:  # a line a minute: on shared cores a long run may have to be stopped before its end
            stdout, stderr = proc.communicate(timeout=60)
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                proc.kill()
                raise
            parts = len(list((out / "parts").glob("*.parquet")))
            print(
                f"  ... {parts} parts committed, peak PSS so far {mem.peak / 2**20:.0f} MiB, "
                f"load average {os.getloadavg()[0]:.1f}",
                file=sys.stderr,
                flush=True,
            )
    wall = time.monotonic() - t0
    peak = mem.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"score failed ({proc.returncode}): {stderr[-2000:]}")
    line = stdout.strip().splitlines()[-1]
    m = re.search(r"scored (\d+) images \((\d+) errors\).* in ([\d.]+)s \(([\d.]+) images/s\)", line)
    assert m, line
    parts = sorted((out / "parts").glob("*.parquet"), key=lambda p: p.stat().st_mtime)
    first, last = parts[0].stat().st_mtime, parts[-1].stat().st_mtime
    n_after_first = int(m.group(1)) - per_shard
    steady = n_after_first / (last - first) if last > first else float("nan")
    return {
        "images": int(m.group(1)),
        "errors": int(m.group(2)),
        "job_s": float(m.group(3)),
        "job_rate": float(m.group(4)),
        "wall_s": wall,
        "steady_rate": steady,
        "peak_pss": peak,
        "cpu_s": mem.cpu_s,
        "breakdown": mem.breakdown(),
        "summary": line,
    }


#: run_job's entries printed on lines of their own
SHOWN_APART = ("summary", "breakdown")


def _print_memory(n: int, res: dict[str, Any]) -> None:
    print(
        f"memory at {n}: peak PSS {res['peak_pss'] / 2**20:.0f} MiB, {res['job_rate']:.1f} images/s, "
        f"{res['cpu_s'] / res['images'] * 1000:.2f} CPU-ms per image (job process tree), "
        f"load average {os.getloadavg()[0]:.1f}; at the peak:\n{res['breakdown']}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=20_000)
    p.add_argument("--memory", type=int, nargs="*", default=[10_000, 40_000], help="archive sizes for peak memory")
    p.add_argument("--workdir", default="/tmp/imgscan-bench")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--sample", type=int, default=5000, help="images timed for the ceiling and the sequential script")
    p.add_argument("--per-detector-only", action="store_true", help="stop after timing each detector alone")
    p.add_argument("--memory-only", action="store_true", help="only the jobs of --memory: peak PSS, per process")
    args = p.parse_args()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)

    t = time.monotonic()
    archive = make_archive(root, args.images)
    print(f"archive: {args.images} images in {archive} ({time.monotonic() - t:.0f}s)", flush=True)
    t = time.monotonic()
    model = train_bundle(root, args.epochs)
    print(f"bundle: {model} ({time.monotonic() - t:.0f}s)", flush=True)

    if args.memory_only:
        for n in args.memory:
            res = run_job(model, make_archive(root, n), root / f"out-{n}", args.batch_size, args.workers)
            _print_memory(n, res)
        return
    rates = per_detector(model, archive, args.sample, args.batch_size)
    print("per detector: " + ", ".join(f"{k} {v:.0f}/s" for k, v in rates.items()), flush=True)
    if args.per_detector_only:
        return
    ceil = ceiling(model, archive, args.sample, args.batch_size)
    print(f"ceiling: {ceil:.1f} images/s", flush=True)
    seq = sequential(model, archive, args.sample, args.batch_size)
    print(f"sequential: {seq:.1f} images/s", flush=True)
    e2e = run_job(model, archive, root / f"out-{args.images}", args.batch_size, args.workers)
    print(f"end-to-end: {json.dumps({k: v for k, v in e2e.items() if k not in SHOWN_APART})}", flush=True)
    print(f"  {e2e['summary']}", flush=True)
    # the cores are shared with other work: take the better of two ceilings (a conservative ratio)
    ceil = max(ceil, ceiling(model, archive, args.sample, args.batch_size))
    print(f"ceiling (best of two): {ceil:.1f} images/s", flush=True)
    mem: dict[int, dict[str, Any]] = {}
    for n in args.memory:
        res = (
            e2e
            if n == args.images
            else run_job(model, make_archive(root, n), root / f"out-{n}", args.batch_size, args.workers)
        )
        mem[n] = res
        _print_memory(n, res)

    gib = 2**20
    rows = [
        ("ceiling: detectors on in-memory batches, 1 process", f"{ceil:.1f}", ""),
        ("sequential script: open, decode, predict per batch", f"{seq:.1f}", f"{seq / ceil:.2f}"),
        (
            f"imgscan score, {e2e['images']} images, whole job",
            f"{e2e['job_rate']:.1f}",
            f"{e2e['job_rate'] / ceil:.2f}",
        ),
        (
            "imgscan score, steady state (first..last part)",
            f"{e2e['steady_rate']:.1f}",
            f"{e2e['steady_rate'] / ceil:.2f}",
        ),
    ]
    print()
    title = f"measurement (64x64, full bundle, batch {args.batch_size})"
    print(f"{title:<56} {'images/s':>10} {'x ceiling':>10}")
    for name, rate, ratio in rows:
        print(f"{name:<56} {rate:>10} {ratio:>10}")
    for n, res in mem.items():
        print(f"{'peak memory (PSS, job process tree), ' + str(n) + ' images':<56} {res['peak_pss'] / gib:>9.0f}M")
    if len(mem) >= 2:
        lo, hi = min(mem), max(mem)
        ratio = mem[hi]["peak_pss"] / mem[lo]["peak_pss"]
        print(f"{f'memory ratio {hi} / {lo} images':<56} {ratio:>10.2f}")


if __name__ == "__main__":
    main()
