"""The scoring pool's per-node arithmetic (jobs/pool.py) on the layouts people run."""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import pytest

from jobs.pool import MIN_ACTOR_CPUS, NodeResources, PoolError, PoolPlan, nodes_from_ray, plan_pool

GIB = float(1 << 30)
MEM = 1 << 30  # ACTOR_MEMORY of jobs/score.py


def plan(nodes: list[NodeResources], workers: int | None = None, gpus: float = 0.0) -> PoolPlan:
    return plan_pool(nodes, workers=workers, gpus_per_worker=gpus, actor_memory=MEM)


def fits_everywhere(nodes: list[NodeResources], p: PoolPlan, per_node: list[int]) -> bool:
    """Each node's actors plus its decode reserve fit in its CPUs, and their memory in its memory."""
    return all(
        k * p.actor_cpus + p.decode_reserve <= n.cpus + 1e-9 and k * MEM <= n.memory
        for n, k in zip(nodes, per_node, strict=True)
    )


def a_decode_slot_is_always_free(nodes: list[NodeResources], p: PoolPlan) -> bool:
    """However Ray places the actors, their CPUs leave one decode task's worth free on some node:
    they reserve at most sum(CPUs) - nodes * decode reserve (pigeonhole)."""
    return p.workers * p.actor_cpus <= sum(n.cpus for n in nodes) - len(nodes) * p.decode_reserve + 1e-9


def spread(nodes: list[NodeResources], p: PoolPlan, gpus: float = 0.0) -> list[int]:
    """Actors placed round-robin over the nodes that can take one more (Ray Data's SPREAD)."""
    per_node = [0] * len(nodes)
    for _ in range(p.workers):
        for i in sorted(range(len(nodes)), key=lambda j: per_node[j]):
            n = nodes[i]
            k = per_node[i] + 1
            if k * p.actor_cpus <= n.cpus + 1e-9 and k * gpus <= n.gpus + 1e-9 and k * MEM <= n.memory:
                per_node[i] = k
                break
        else:
            raise AssertionError(f"an actor fits on no node: {p}, {per_node}")
    return per_node


def test_laptop_with_two_cpus_keeps_two_actors_and_a_whole_cpu_for_two_decode_tasks() -> None:
    nodes = [NodeResources(cpus=2, memory=16 * GIB)]
    p = plan(nodes)
    assert p == PoolPlan(workers=2, actor_cpus=0.5, decode_cpus=0.5, decode_slots=2)
    assert p.decode_reserve == 1.0
    assert fits_everywhere(nodes, p, spread(nodes, p))
    assert a_decode_slot_is_always_free(nodes, p)


def test_two_nodes_of_one_cpu_leave_each_node_a_decode_slot() -> None:
    """The issue's hang: 2 actors of 0.5 CPU and 1-CPU decode tasks fit on no node."""
    nodes = [NodeResources(cpus=1, memory=16 * GIB), NodeResources(cpus=1, memory=16 * GIB)]
    p = plan(nodes)
    assert p.workers == 2
    assert p.decode_reserve <= 0.5 and p.decode_cpus == 0.25 and p.actor_cpus > 0
    assert spread(nodes, p) == [1, 1]
    assert fits_everywhere(nodes, p, [1, 1])
    assert a_decode_slot_is_always_free(nodes, p)


def test_cpu_head_and_two_gpu_workers_with_eight_cpus() -> None:
    head = NodeResources(cpus=1, memory=8 * GIB)
    gpu = NodeResources(cpus=8, gpus=1, memory=30 * GIB)
    nodes = [head, gpu, gpu]
    p = plan(nodes, gpus=1)
    assert p == PoolPlan(workers=2, actor_cpus=1.0, decode_cpus=1.0)
    placed = spread(nodes, p, gpus=1)
    assert placed == [0, 1, 1]  # the head has no GPU: it decodes only
    assert fits_everywhere(nodes, p, placed)
    # on CPU (no --gpus-per-worker) the same cluster runs CPU actors everywhere, the head included
    q = plan(nodes)
    assert q.workers == 1 + 8 + 8
    assert a_decode_slot_is_always_free(nodes, q)


def test_fractional_gpus_per_worker() -> None:
    nodes = [NodeResources(cpus=4, gpus=1, memory=30 * GIB), NodeResources(cpus=4, gpus=1, memory=30 * GIB)]
    p = plan(nodes, gpus=0.25)
    assert p.workers == 8 and p.decode_cpus == 1.0
    assert p.actor_cpus == pytest.approx(0.75)  # (4 CPUs - 1 decode) / 4 actors
    placed = spread(nodes, p, gpus=0.25)
    assert placed == [4, 4] and fits_everywhere(nodes, p, placed)
    assert plan(nodes, workers=3, gpus=0.5).workers == 3


def test_gpu_nodes_without_cpus_of_their_own_decode_on_the_head() -> None:
    nodes = [NodeResources(cpus=4, memory=8 * GIB), NodeResources(cpus=0, gpus=2, memory=30 * GIB)]
    p = plan(nodes, gpus=1)
    assert p == PoolPlan(workers=2, actor_cpus=0.0, decode_cpus=1.0)


def test_workers_above_what_fits_are_refused_in_one_line() -> None:
    nodes = [NodeResources(cpus=1, memory=16 * GIB), NodeResources(cpus=1, memory=16 * GIB)]
    most = 2 * math.floor(0.5 / MIN_ACTOR_CPUS + 1e-9)
    assert plan(nodes, workers=most).workers == most
    with pytest.raises(PoolError) as e:
        plan(nodes, workers=most + 1)
    msg = str(e.value)
    assert f"--workers {most + 1} needs {most + 1} actors" in msg and f"hold {most}" in msg
    assert "1 CPU/16.0 GiB; 1 CPU/16.0 GiB" in msg and "\n" not in msg
    # memory bounds it too: 1 GiB per actor
    small = [NodeResources(cpus=8, memory=2.5 * GIB)]
    assert plan(small).workers == 2
    with pytest.raises(PoolError, match="hold 2"):
        plan(small, workers=3)
    gpus = [NodeResources(cpus=8, gpus=1, memory=30 * GIB)] * 2
    with pytest.raises(PoolError, match=r"--workers 4 with --gpus-per-worker 1 needs 4 actors .* hold 2\."):
        plan(gpus, workers=4, gpus=1)


def test_gpus_asked_of_a_cluster_without_them_are_refused() -> None:
    with pytest.raises(PoolError, match="needs a node with 1 GPU, but the cluster's nodes have at most 0"):
        plan([NodeResources(cpus=2, memory=8 * GIB)], gpus=1)
    with pytest.raises(PoolError, match="needs a node with 2 GPU, but the cluster's nodes have at most 1"):
        plan([NodeResources(cpus=8, gpus=1, memory=30 * GIB)], gpus=2)


def test_nodes_from_ray_keeps_alive_nodes_only() -> None:
    rows = [
        {"Alive": True, "Resources": {"CPU": 2.0, "memory": 4.0 * GIB, "node:10.0.0.1": 1.0}},
        {"Alive": False, "Resources": {"CPU": 8.0, "GPU": 1.0}},
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0, "memory": 30.0 * GIB}},
    ]
    assert nodes_from_ray(rows) == [
        NodeResources(cpus=2, gpus=0, memory=4 * GIB),
        NodeResources(cpus=8, gpus=1, memory=30 * GIB),
    ]


#: a driver whose pipeline stalls, as ``score()`` would meet it: local Ray, stall, shutdown, exit 1
STALL_SCRIPT = """
import sys, ray
from jobs.score import _batches
ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
try:
    ds = ray.data.range(4).map_batches(lambda b: b, batch_format="pyarrow", num_cpus=2)
    for _ in _batches(ds, stall_s=5):
        pass
except TimeoutError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
finally:
    ray.shutdown()
"""


@pytest.mark.heavy
@pytest.mark.cluster
def test_a_pipeline_that_cannot_get_resources_ends_in_one_line_not_a_hang() -> None:
    """The driver's watchdog (jobs/score.py ``_batches``) on a real stall: a stage asking for more
    CPUs than the local Ray has is never scheduled, and Ray Data waits for it silently.

    In a process of its own: the stalled Ray Data executor thread stays behind after the
    error (a job's process ends there), and it must not outlive a test process's Ray."""
    import importlib
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import ray  # noqa: F401  (Ray ships psutil and puts it on sys.path)

    psutil = importlib.import_module("psutil")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", STALL_SCRIPT],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = proc.communicate(timeout=600)
    finally:
        # Ray's own processes (log monitor, dashboard agent) exit shortly after the driver: on a
        # busy machine that took seconds in CI, so give them up to 30 s before calling them left over
        deadline = time.monotonic() + 30
        while True:
            left = [p for p in psutil.process_iter() if _session_of(p.pid) == proc.pid and _running(p)]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for p in left:  # processes this test started (its own session), none expected
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and len(errors) == 1, err[-3000:]
    assert errors[0].startswith("error: no images scored for 5s") and "of 1 CPU" in errors[0], errors
    assert not left, left  # the job's Ray is gone with it


def _running(p: Any) -> bool:
    """Not a zombie: an exited process that no one reaped yet (PID 1 of a container may never)."""
    try:
        return bool(p.status() != "zombie")
    except Exception:  # gone meanwhile
        return False


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except (ProcessLookupError, PermissionError):
        return None
