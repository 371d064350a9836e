"""Exact streaming thresholds vs the plain way, on 20 million scores in 100 Parquet files.

    PYTHONPATH=. python bench/reduce.py [--rows 20000000] [--files 100] [--data DIR]

Generates (once; reused while the parameters match) a run of ``--files`` result
parts in the schema ``jobs.schema.RESULT_SCHEMA``: recon_error (float32,
log-normal), 0.1% rows with status="error" carrying a huge score (so a method
that used them would be visibly off), every other score column null. Then it
runs each method in its OWN subprocess (so one method's peak does not mask
another's), twice: once for time, once for memory with tracemalloc on.

Methods:
  plain-quantile  pq.read_table(status, recon_error) of all parts, filter ok,
                  numpy.quantile(0.999)              -- the plain way
  stream-quantile the reducer's code path (jobs.reduce.first_pass +
                  finish_thresholds) with rule quantile:0.999
  plain-iqr       as plain, numpy.quantile([0.25, 0.75]) -> Q3 + 1.5 IQR
  stream-iqr      the reducer with rule iqr:1.5 (Q1/Q3 in the middle: histogram
                  refinement, 3 passes over the column)
  reduce          the whole reducer, no report (every pass incl. flagging)

Peak memory of a method = tracemalloc peak (Python and numpy allocations)
+ pyarrow's memory-pool maximum (Arrow buffers), both counted from the start of
the method; "rss" is the rise of the process's peak RSS (VmHWM) over its RSS
just before the method (after imports), from the timing run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SCORE = "recon_error"
Q = 0.999


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


# -- data ------------------------------------------------------------------------------------


def generate(data: str, rows: int, files: int) -> None:
    from jobs.schema import RESULT_SCHEMA

    marker = os.path.join(data, "_bench.json")
    want = {"rows": rows, "files": files, "version": 2}
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f) == want:
                return
    parts = os.path.join(data, "parts")
    os.makedirs(parts, exist_ok=True)
    for name in os.listdir(parts):
        os.remove(os.path.join(parts, name))
    t0 = time.monotonic()
    per = rows // files
    ts = pa.scalar(0, pa.timestamp("us", tz="UTC"))
    for k in range(files):
        n = per if k < files - 1 else rows - per * (files - 1)
        rng = np.random.default_rng(k)
        err = rng.random(n) < 0.001
        score = rng.lognormal(-3.0, 0.5, size=n).astype(np.float32)
        score[err] = 1e9
        start = k * per
        shard = f"file:///bench/archive/shard-{k:06d}.tar"
        cols: dict[str, pa.Array] = {
            "image_id": pa.array([f"{shard}#img{start + i:09d}.png" for i in range(n)]),
            "shard": pa.array([shard] * n),
            "shard_id": pa.array([f"{k:016x}"] * n),
            "member": pa.array([f"img{start + i:09d}.png" for i in range(n)]),
            "status": pa.array(np.where(err, "error", "ok")),
            "error": pa.array(np.where(err, "corrupt image: bench", None)),
            SCORE: pa.array(score),
            "model_version": pa.array(["bench-model"] * n),
            "run_id": pa.array(["bench-run"] * n),
            "scored_at": pa.array([ts.value] * n, pa.timestamp("us", tz="UTC")),
        }
        arrays = [cols[f.name] if f.name in cols else pa.nulls(n, f.type) for f in RESULT_SCHEMA]
        pq.write_table(pa.Table.from_arrays(arrays, schema=RESULT_SCHEMA), os.path.join(parts, f"part-{k:05d}.parquet"))
    with open(os.path.join(data, "_run.json"), "w") as f:
        json.dump({"run_id": "bench-run", "model_uri": None, "model_version": "bench-model"}, f)
    with open(marker, "w") as f:
        json.dump(want, f)
    print(f"generated {rows} rows in {files} files under {data} in {time.monotonic() - t0:.0f}s", file=sys.stderr)


# -- methods (each runs in its own subprocess) -------------------------------------------------


def _plain_column(data: str) -> np.ndarray:
    parts = sorted(os.path.join(data, "parts", p) for p in os.listdir(os.path.join(data, "parts")))
    table = pq.read_table(parts, columns=["status", SCORE])
    import pyarrow.compute as pc

    ok = table.filter(pc.equal(table["status"], "ok"))
    return ok[SCORE].to_numpy()


def plain_quantile(data: str) -> float:
    return float(np.quantile(_plain_column(data), Q))


def plain_iqr(data: str) -> float:
    q1, q3 = np.quantile(_plain_column(data), [0.25, 0.75])
    return float(q3 + 1.5 * (q3 - q1))


def _stream(data: str, rule: str) -> float:
    from jobs.reduce import RunResults, finish_thresholds, first_pass
    from jobs.schema import SCORE_DIRECTIONS
    from jobs.thresholds import Rule, ThresholdFitter

    run = RunResults(data)
    fitter = ThresholdFitter(SCORE, Rule.parse(rule), SCORE_DIRECTIONS[SCORE], n_upper=run.num_rows)
    first_pass(run, {SCORE: fitter})
    return finish_thresholds(run, {SCORE: fitter})[SCORE].value


def stream_quantile(data: str) -> float:
    return _stream(data, f"quantile:{Q}")


def stream_iqr(data: str) -> float:
    return _stream(data, "iqr:1.5")


def whole_reduce(data: str) -> float:
    import tempfile

    from jobs.reduce import ReduceConfig, reduce

    with tempfile.TemporaryDirectory() as out:
        reduce(ReduceConfig(data, out, rules=(f"quantile:{Q}",), report=False))
        with open(os.path.join(out, "thresholds.json")) as f:
            return float(json.load(f)["thresholds"][SCORE]["value"])


METHODS = {
    "plain-quantile": plain_quantile,
    "stream-quantile": stream_quantile,
    "plain-iqr": plain_iqr,
    "stream-iqr": stream_iqr,
    "reduce": whole_reduce,
}


def run_method(name: str, data: str, memory: bool) -> dict[str, Any]:
    fn = METHODS[name]
    if name != "plain-quantile" and name != "plain-iqr":
        import jobs.reduce  # noqa: F401  (imports TensorFlow via jobs.schema: before the baseline)
    pool = pa.default_memory_pool()
    rss0 = _status_kb("VmRSS")
    arrow0 = pool.max_memory()
    if memory:
        tracemalloc.start()
    t0 = time.perf_counter()
    value = fn(data)
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"method": name, "value": value, "seconds": seconds}
    if memory:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        out["python_peak"] = peak
        out["arrow_peak"] = pool.max_memory() - arrow0
        out["pool"] = pool.backend_name
    out["rss"] = (_status_kb("VmHWM") - rss0) * 1024
    return out


def _subprocess(name: str, data: str, memory: bool) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--data", data, "--method", name, *(["--memory"] if memory else [])]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600, check=False)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20_000_000)
    p.add_argument("--files", type=int, default=100)
    p.add_argument("--data", default="/tmp/imgscan-bench-reduce")
    p.add_argument("--repeats", type=int, default=3, help="timing runs per method (the fastest counts)")
    p.add_argument("--method", choices=list(METHODS))
    p.add_argument("--memory", action="store_true")
    args = p.parse_args()
    if args.method:  # child process
        print(json.dumps(run_method(args.method, args.data, args.memory)))
        return
    generate(args.data, args.rows, args.files)
    for root, _, names in os.walk(args.data):  # warm the page cache: no method pays the cold read
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                while f.read(1 << 24):
                    pass
    # time: the fastest of --repeats runs, methods interleaved (other work shares these CPUs)
    timings: dict[str, list[dict[str, Any]]] = {name: [] for name in METHODS}
    for i in range(args.repeats):
        for name in METHODS:
            timings[name].append(_subprocess(name, args.data, memory=False))
            print(f"  run {i + 1}: {name} {timings[name][-1]['seconds']:.2f}s", file=sys.stderr)
    rows = []
    for name in METHODS:
        timed = min(timings[name], key=lambda r: r["seconds"])
        mem = _subprocess(name, args.data, memory=True)
        rows.append({**timed, "python_peak": mem["python_peak"], "arrow_peak": mem["arrow_peak"]})
    mib = 2**20
    print(f"\n{args.rows:,} scores in {args.files} Parquet files ({os.cpu_count()} CPUs)\n")
    print("| method | threshold | rel. diff | seconds | peak MiB (python+numpy / arrow = total) | rss rise MiB |")
    print("|---|---|---|---|---|---|")
    ref = {"quantile": rows[0]["value"], "iqr": rows[2]["value"]}
    for r in rows:
        kind = "iqr" if "iqr" in r["method"] else "quantile"
        rel = abs(r["value"] - ref[kind]) / abs(ref[kind])
        total = r["python_peak"] + r["arrow_peak"]
        print(
            f"| {r['method']} | {r['value']:.9g} | {rel:.1e} | {r['seconds']:.2f} | "
            f"{r['python_peak'] / mib:.1f} / {r['arrow_peak'] / mib:.1f} = {total / mib:.1f} | {r['rss'] / mib:.0f} |"
        )
    by = {r["method"]: r for r in rows}
    for a, b in (("stream-quantile", "plain-quantile"), ("stream-iqr", "plain-iqr")):
        ta = by[a]["python_peak"] + by[a]["arrow_peak"]
        tb = by[b]["python_peak"] + by[b]["arrow_peak"]
        print(
            f"\n{a} vs {b}: memory {ta / tb:.3f}x (goal <= 0.2), "
            f"time {by[a]['seconds'] / by[b]['seconds']:.2f}x (goal <= 1), "
            f"same threshold: {abs(by[a]['value'] - by[b]['value']) / abs(by[b]['value']) < 1e-6}"
        )


if __name__ == "__main__":
    main()
