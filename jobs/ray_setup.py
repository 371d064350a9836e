"""Start or join Ray, and refuse GPU work that would wait forever: shared by the Ray verbs."""

from __future__ import annotations

import logging
import os


def connect(address: str | None, num_cpus: int | None = None, object_store_memory: int | None = None) -> bool:
    """Join the cluster at ``address`` or start Ray in this process (``num_cpus``, default
    every core; ``object_store_memory`` bytes of shared memory for objects, default Ray's
    30% of RAM; both ignored when joining a cluster, which has its own). True when this
    call started Ray (and the caller must stop it)."""
    import ray

    if ray.is_initialized():  # an embedding program (tests, a notebook) owns Ray
        return False
    if address is None:
        try:
            ray.init(
                address="local",  # never attach to some other Ray found on this machine
                num_cpus=num_cpus or os.cpu_count() or 1,
                object_store_memory=object_store_memory,
                include_dashboard=False,
                logging_level=logging.WARNING,
                # workers' own logs (TensorFlow start-up chatter) stay in the Ray session logs;
                # their errors reach the driver as exceptions anyway
                log_to_driver=False,
            )
        except Exception as e:
            # Ray gives its node a fixed 30 s to register, and raises a bare Exception past
            # that: seen on cores shared by dozens of processes. One line, not a traceback.
            if "timed out during startup" not in str(e):
                raise
            raise TimeoutError(
                f"Ray did not start on this machine within its 30 s ({e}); retry when fewer processes share the cores"
            ) from e
    else:
        ray.init(address=address, logging_level=logging.WARNING)
    return True


def check_gpus(flag: str, wanted: float, address: str | None) -> None:
    """Refuse ``flag`` (GPUs per task/actor) when the connected Ray has fewer GPUs: such work waits forever."""
    import ray

    if wanted <= 0:
        return
    have = float(ray.cluster_resources().get("GPU", 0.0))
    if have < wanted:
        where = f"the cluster at {address}" if address else "this machine"
        raise ValueError(
            f"{flag} {wanted:g} needs GPUs, but {where} has {have:g}. Drop the flag to run on CPU, or start "
            "GPU nodes first (autoscaling clusters: keep min_workers >= 1 for the GPU type)."
        )


def local_gpus() -> int:
    """NVIDIA GPUs on this machine, without TensorFlow: the devices in CUDA_VISIBLE_DEVICES
    when it is set (TensorFlow and Ray honour it too; "" or "-1" hide them all), else the
    GPUs the NVIDIA kernel driver lists in /proc/driver/nvidia/gpus (Linux; containers of
    the NVIDIA runtime see it too), else 0. Only a first answer for the embedded Ray: on a
    cluster, Ray's own count decides."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and not d.strip().startswith("-")])
    try:
        return len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:  # no NVIDIA driver loaded
        return 0
