"""How many scoring actors a Ray cluster can hold, and with which CPUs: pure arithmetic, per node.

Ray places each actor and each task on ONE node, so the cluster's total CPUs say
nothing about what fits: two nodes of 1 CPU each hold two actors of 0.5 CPU, but
then neither has a whole CPU left for a decode task, and a job that asks for
1-CPU decode tasks waits forever. The plan here sizes the pool node by node:

* CPU actors (``gpus_per_worker == 0``): node i holds at most
  ``floor((CPUs_i - reserve) / actor_cpus)`` actors, so that the actors it is
  planned for leave it a decode reserve of one CPU (at most half the smallest
  node, so that even a 1-CPU node holds an actor and decoding). The reserve is
  split into ``DECODE_SLOTS`` decode tasks of ``decode_cpus`` each: Ray's CPUs are
  a scheduling count, and an actor waiting for images uses no core, so two decode
  tasks in one CPU's reserve let decoding take both cores of a 2-core machine
  when decoding is the work (camera JPEGs), while the actors take them when the
  models are (64 px PNGs). One actor per whole CPU by default, with the largest
  share (<= 1 CPU) that fits.
* GPU actors: each node holds ``floor(GPUs / gpus_per_worker)`` actors; they
  take a small share of that node's CPUs and leave it room for a decode task.
  Nodes without GPUs (the head of ``cluster.yaml``) decode only.
* Every actor reserves ``actor_memory`` bytes of the node's Ray memory.

Ray Data spreads the actors over the nodes; whatever node Ray puts an actor on,
the actors together reserve at most ``sum(CPUs) - nodes * decode_cpus``, so one
decode slot stays free somewhere and the pipeline always progresses. What does
not fit is refused in one line.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: the smallest CPU share of a CPU scoring actor (below it an actor is mostly waiting its turn)
MIN_ACTOR_CPUS = 0.1
#: CPUs each node keeps from the actors for decoding, when every node has room for a whole one
DECODE_RESERVE = 1.0
#: decode tasks that run at once in one node's reserve. Two: on 2 idle cores, camera JPEGs
#: (bench/photos.py) went from one decode task at a time (one core decoding, the actors
#: mostly waiting) to both cores busy; see the README's photo table for the figures.
DECODE_SLOTS = 2
#: slack for float resources (Ray rounds them to 1e-4)
_EPS = 1e-6


class PoolError(ValueError):
    """The scoring pool asked for does not fit on the cluster's nodes (one line: what is missing)."""


@dataclass(frozen=True)
class NodeResources:
    """What one alive Ray node offers: CPUs, GPUs and Ray's ``memory`` resource (bytes)."""

    cpus: float
    gpus: float = 0.0
    memory: float = float("inf")

    def describe(self) -> str:
        gpus = f"/{self.gpus:g} GPU" if self.gpus else ""
        memory = f"/{self.memory / (1 << 30):.1f} GiB" if math.isfinite(self.memory) else ""
        return f"{self.cpus:g} CPU{gpus}{memory}"


@dataclass(frozen=True)
class PoolPlan:
    """The pool: ``workers`` actors of ``actor_cpus`` CPUs each; decode tasks of ``decode_cpus``,
    ``decode_slots`` of which fit in the CPUs each node keeps from the actors."""

    workers: int
    actor_cpus: float
    decode_cpus: float
    decode_slots: int = 1

    @property
    def decode_reserve(self) -> float:
        """CPUs each node keeps free of actors for decode tasks."""
        return self.decode_cpus * self.decode_slots


def nodes_from_ray(nodes: Iterable[Mapping[str, Any]]) -> list[NodeResources]:
    """``ray.nodes()`` -> the alive nodes' resources (dead nodes stay listed in Ray's table)."""
    out = []
    for node in nodes:
        if not node.get("Alive"):
            continue
        res = node.get("Resources") or {}
        out.append(
            NodeResources(
                cpus=float(res.get("CPU", 0.0)), gpus=float(res.get("GPU", 0.0)), memory=float(res.get("memory", 0.0))
            )
        )
    return out


def describe_nodes(nodes: Sequence[NodeResources]) -> str:
    if not nodes:
        return "no alive nodes"
    return "; ".join(f"{n.describe()}" for n in nodes)


def plan_pool(
    nodes: Sequence[NodeResources], *, workers: int | None, gpus_per_worker: float, actor_memory: float
) -> PoolPlan:
    """Size the scoring pool node by node; raises ``PoolError`` when it cannot fit.

    ``workers=None``: one actor per ``gpus_per_worker`` of each node's GPUs, or with
    CPU actors one per whole CPU of each node.
    """
    if gpus_per_worker > 0:
        return _plan_gpu(nodes, workers, gpus_per_worker, actor_memory)
    return _plan_cpu(nodes, workers, actor_memory)


def _by_memory(node: NodeResources, actor_memory: float) -> int:
    return int(node.memory // actor_memory) if actor_memory > 0 else 1 << 30


def _plan_cpu(nodes: Sequence[NodeResources], workers: int | None, actor_memory: float) -> PoolPlan:
    hosts = [n for n in nodes if n.cpus > _EPS]
    if not hosts:
        raise PoolError(f"Scoring needs CPUs, but the cluster's nodes have none ({describe_nodes(nodes)}).")
    # Half the smallest node at most: a 1-CPU node then holds an actor AND decoding.
    reserve = min(DECODE_RESERVE, min(n.cpus for n in hosts) / 2)
    decode = _round_down(reserve / DECODE_SLOTS)
    free = [n.cpus - decode * DECODE_SLOTS for n in hosts]
    mem_cap = [_by_memory(n, actor_memory) for n in hosts]

    def capacity(actor_cpus: float) -> int:
        return sum(min(math.floor(f / actor_cpus + _EPS), m) for f, m in zip(free, mem_cap, strict=True))

    # One actor per whole CPU by default: the scikit-learn detectors run single-threaded,
    # so actors, not threads, use the cores.
    wanted = workers or sum(max(1, min(math.floor(n.cpus + _EPS), m)) for n, m in zip(hosts, mem_cap, strict=True))
    # The largest share (<= 1 CPU) at which the nodes hold `wanted` actors: the candidates
    # are each node's free CPUs split k ways.
    candidates = sorted({min(1.0, f / k) for f in free for k in range(1, wanted + 1)}, reverse=True)
    for actor_cpus in candidates:
        if actor_cpus < MIN_ACTOR_CPUS - _EPS:
            break
        if capacity(actor_cpus) >= wanted:
            return PoolPlan(wanted, _round_down(actor_cpus), decode, DECODE_SLOTS)
    most = capacity(MIN_ACTOR_CPUS)
    raise PoolError(
        f"--workers {wanted} needs {wanted} actors of at least {MIN_ACTOR_CPUS:g} CPU and "
        f"{actor_memory / (1 << 30):g} GiB memory each, plus {decode * DECODE_SLOTS:g} CPU for decoding per node; "
        f"the cluster's nodes ({describe_nodes(nodes)}) hold {most}. "
        f"Pass --workers {max(most, 1)} or fewer, or add nodes."
    )


def _plan_gpu(nodes: Sequence[NodeResources], workers: int | None, per: float, actor_memory: float) -> PoolPlan:
    hosts = [n for n in nodes if n.gpus + _EPS >= per]
    if not hosts:
        have = max((n.gpus for n in nodes), default=0.0)
        raise PoolError(
            f"--gpus-per-worker {per:g} needs a node with {per:g} GPU, but the cluster's nodes have at most "
            f"{have:g} ({describe_nodes(nodes)}). Drop the flag to score on CPU, or start GPU nodes first "
            "(autoscaling clusters: keep min_workers >= 1 for the GPU type)."
        )
    slots = [min(math.floor(n.gpus / per + _EPS), _by_memory(n, actor_memory)) for n in hosts]
    most = sum(slots)
    wanted = workers or most
    if wanted > most or most == 0:
        raise PoolError(
            f"--workers {wanted} with --gpus-per-worker {per:g} needs {wanted} actors of {per:g} GPU and "
            f"{actor_memory / (1 << 30):g} GiB memory each; the cluster's nodes ({describe_nodes(nodes)}) "
            f"hold {most}. Pass --workers {most} or fewer, or add GPU nodes."
        )
    cpu_nodes = [n for n in nodes if n.cpus > _EPS]
    if not cpu_nodes:
        raise PoolError(f"Decoding images needs CPUs, but the cluster's nodes have none ({describe_nodes(nodes)}).")
    # Decode slots of a whole CPU where the GPU nodes have 2 CPUs or more; GPU nodes
    # without CPUs of their own leave decoding to the other nodes.
    with_cpus = [n.cpus for n, k in zip(hosts, slots, strict=True) if k and n.cpus > _EPS]
    most_cpus = max(n.cpus for n in cpu_nodes)
    decode = min(DECODE_RESERVE, min(with_cpus) / 2) if with_cpus else min(DECODE_RESERVE, most_cpus)
    # The actors' CPUs feed the GPU (batching, the CPU-only detectors): what each GPU node
    # has beside its decode slot, split among its actors, 1 CPU at most.
    shares = [(n.cpus - decode) / k for n, k in zip(hosts, slots, strict=True) if k]
    actor_cpus = max(0.0, min(1.0, *shares))
    return PoolPlan(wanted, _round_down(actor_cpus), _round_down(decode))


def _round_down(x: float) -> float:
    """To Ray's resource precision (1e-4), never up: a rounded-up share could stop fitting."""
    return math.floor(x * 10_000 + _EPS) / 10_000
