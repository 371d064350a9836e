"""Memory and CPU of one scoring actor's work by rows per model call (a measurement, not a test).

    PYTHONPATH=. python bench/actor_memory.py --models DIR [--rows 256 64 32] [--images 1024]

For each ``--rows`` R, a fresh process (memory that TensorFlow keeps is per process)
loads the bundle as ``jobs.score.ScoreActor`` does (one intra-op and one inter-op
thread), scores ``--images`` random uint8 images of the bundle's input size, R rows per
``bundle.score`` call, and reports CPU milliseconds per image (every thread of the
process, so other work on the cores does not count) and its anonymous memory (PSS,
from /proc/self/smaps_rollup) and peak resident set (VmHWM) afterwards. The bundle of
``bench/throughput.py`` (64 px digits, every detector) is in its workdir's ``model``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _memory() -> dict[str, int]:
    """MiB: anonymous PSS now and the peak resident set of this process."""
    out = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if parts[0] == "Pss_Anon:":
                out["anon_mib"] = int(parts[1]) // 1024
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                out["hwm_mib"] = int(line.split()[1]) // 1024
    return out


def measure(models: str, rows: int, images: int) -> dict[str, float]:
    """In this process: CPU-ms per image and memory after scoring ``images`` images ``rows`` at a time."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)  # as ScoreActor on a CPU share
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from jobs.bundle import ModelBundle

    bundle = ModelBundle.load(models)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (256, bundle.input_size, bundle.input_size, bundle.channels), dtype=np.uint8)
    for start in range(0, len(x), rows):  # warm-up: first calls build kernels
        bundle.score(x[start : start + rows])
    done, c0 = 0, time.process_time()
    while done < images:
        for start in range(0, len(x), rows):
            bundle.score(x[start : start + rows])
        done += len(x)
    return {"rows": rows, "cpu_ms_per_image": (time.process_time() - c0) / done * 1000, **_memory()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", required=True, help="a bundle, e.g. /tmp/imgscan-bench/model")
    p.add_argument("--rows", type=int, nargs="+", default=[256, 128, 64, 32])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.models, args.child, args.images)))
        return
    print(f"{'rows per call':>14} {'CPU-ms/image':>13} {'anon MiB':>9} {'peak RSS MiB':>13}", flush=True)
    for rows in args.rows:
        cmd = [sys.executable, __file__, "--models", args.models, "--images", str(args.images), "--child", str(rows)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        child = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        res = json.loads(child.stdout.splitlines()[-1])
        print(f"{rows:>14} {res['cpu_ms_per_image']:>13.2f} {res['anon_mib']:>9} {res['hwm_mib']:>13}", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
