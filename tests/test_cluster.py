"""Jobs submitted to a real multi-node Ray cluster through the Ray Jobs API, as users submit them.

A module fixture starts two Ray nodes of 1 CPU each on 127.0.0.1 (``ray start --head``
plus ``ray start --address``, each with its own ports and temp dir): the layout on
which the scoring job used to start both actors and then wait forever for a decode
slot. The jobs go through ``JobSubmissionClient`` with ``working_dir`` = this
checkout, exactly what ``ray job submit --working-dir .`` does; the nodes are
stopped by killing the processes this module started, never with ``ray stop``
(it stops every Ray on the machine, other test sessions' too).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detectors import AutoencoderDetector
from jobs.bundle import ModelBundle
from jobs.cli import main
from jobs.demo_data import samples, write_tar_shards
from jobs.ledger import read_results
from jobs.storage import read_json

ROOT = Path(__file__).resolve().parents[1]
#: what `working_dir` must not upload (beside .gitignore's and Ray's own defaults): the venv alone is
#: gigabytes, and Ray refuses packages over 512 MiB
EXCLUDES = [".venv", ".git", "bench/out", "*.egg-info", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"]
#: bound on one job, start-up of TensorFlow in the driver and each actor included (2 busy cores)
JOB_TIMEOUT_S = 600
N_IMAGES = 160


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_port_range(n: int = 64) -> tuple[int, int]:
    """n consecutive free ports below Linux's ephemeral range, for one node's worker processes."""
    rng = np.random.default_rng()
    for _ in range(200):
        low = int(rng.integers(20_000, 30_000 - n))
        try:
            with contextlib.ExitStack() as stack:
                for port in range(low, low + n):
                    s = stack.enter_context(socket.socket())
                    s.bind(("", port))
            return low, low + n - 1
        except OSError:
            continue
    raise RuntimeError("no free range of ports for Ray workers")


def _node_ports() -> list[str]:
    """The ports every Ray node opens, each picked free (the defaults clash with other Rays here)."""
    low, high = _free_port_range()
    flags = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port"]
    flags += ["--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]
    args = [a for flag in flags for a in (flag, str(_free_port()))]
    return [*args, "--min-worker-port", str(low), "--max-worker-port", str(high)]


def _psutil() -> Any:
    import ray  # noqa: F401  (Ray ships psutil and puts it on sys.path)

    return importlib.import_module("psutil")


def _kill_sessions(sids: Sequence[int]) -> None:
    """SIGKILL the processes of the sessions `ray start` made for this module, and their
    descendants (Ray runs each job's entrypoint in a session of its own)."""
    psutil = _psutil()
    for _ in range(3):
        procs = set()
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                if os.getsid(p.pid) in sids:
                    procs.add(p)
                    procs.update(p.children(recursive=True))
        if not procs:
            return
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signal.SIGKILL)
        psutil.wait_procs(list(procs), timeout=10)


@dataclass
class Cluster:
    dashboard: str  # http://127.0.0.1:PORT, for the Jobs API and the state API
    node_ids: list[str]


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    from ray.util.state import list_nodes

    ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or "ray"
    # The jobs' `python` must be this interpreter (the nodes run the entrypoint through a
    # shell with their own PATH). Token auth off explicitly: with ~/.ray/auth_token present
    # (other Ray users of this machine create it) `ray start --head` turns it on but
    # `ray start --address` does not send the token, and the second node cannot join.
    env = {
        **os.environ,
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    # short: Ray's unix sockets live below it (107 characters at most)
    temp = Path(tempfile.mkdtemp(prefix="imgscan-ray-", dir="/tmp"))
    port, dashboard_port = _free_port(), _free_port()
    common = ["--num-cpus", "1", "--num-gpus", "0", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    head = [ray_cli, "start", "--head", "--port", str(port), "--dashboard-port", str(dashboard_port)]
    head += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1"]
    head += ["--ray-client-server-port", str(_free_port()), "--temp-dir", str(temp / "head"), *common, *_node_ports()]
    worker = [ray_cli, "start", "--address", f"127.0.0.1:{port}", "--temp-dir", str(temp / "worker"), *common]
    worker += _node_ports()
    sids: list[int] = []
    try:
        for argv in (head, worker):
            # its own session: what it leaves running is found again by session id
            proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.PIPE, text=True)
            sids.append(proc.pid)
            out, _ = proc.communicate(timeout=180)
            assert proc.returncode == 0, out
        url = f"http://127.0.0.1:{dashboard_port}"
        alive: list[Any] = []
        deadline = time.monotonic() + 120
        while len(alive) < 2 and time.monotonic() < deadline:  # the dashboard up, both nodes registered
            with contextlib.suppress(Exception):
                alive = [n for n in list_nodes(address=url) if n.state == "ALIVE"]
            time.sleep(1)
        assert len(alive) == 2, f"the two Ray nodes did not come up: {alive}"
        yield Cluster(url, [n.node_id for n in alive])
    finally:
        _kill_sessions(sids)
        shutil.rmtree(temp, ignore_errors=True)


def submit_and_wait(
    cluster: Cluster, argv: Sequence[str], timeout_s: float = JOB_TIMEOUT_S, submission_id: str | None = None
) -> tuple[str, str, str]:
    """Submit ``python -m jobs ARGV`` with this checkout as working_dir; wait until it ends.

    Returns (status, logs, Ray job id). A job still running after ``timeout_s`` is
    stopped and the test fails with its logs.
    """
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(cluster.dashboard)
    sub_id = client.submit_job(
        entrypoint=f"python -m jobs {shlex.join(argv)}",
        submission_id=submission_id or f"imgscan-test-{uuid.uuid4().hex[:8]}",
        runtime_env={"working_dir": str(ROOT), "excludes": EXCLUDES},
    )
    deadline = time.monotonic() + timeout_s
    while (status := client.get_job_status(sub_id)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        if time.monotonic() > deadline:
            client.stop_job(sub_id)
            pytest.fail(f"job {argv} still {status} after {timeout_s}s:\n{client.get_job_logs(sub_id)[-5000:]}")
        time.sleep(1)
    return str(status), client.get_job_logs(sub_id), str(client.get_job_info(sub_id).job_id)


@pytest.fixture(scope="module")
def archive(tmp_path_factory: Any, digits16: tuple[np.ndarray, np.ndarray]) -> dict[str, str]:
    """A tiny real bundle (autoencoder at 16 px) and 160 digits in 8 tar shards, on local disk
    (both nodes run on this machine, so every path is reachable from every node)."""
    images, labels = digits16
    root = tmp_path_factory.mktemp("cluster-data")
    detector = AutoencoderDetector(input_size=16, epochs=1, filters=(8, 16), latent_dim=8)
    ModelBundle(detectors={"autoencoder": detector.fit(images[labels == 0][:100])}, input_size=16, channels=1).save(
        str(root / "model")
    )
    write_tar_shards(str(root / "src"), samples(images[:N_IMAGES], [str(v) for v in labels[:N_IMAGES]]), 20)
    return {"source": str(root / "src"), "models": str(root / "model"), "root": str(root)}


def test_the_uploaded_working_dir_stays_small(tmp_path: Path) -> None:
    """What `working_dir` ships to the cluster, zipped the way Ray zips it (its limit: 512 MiB)."""
    from ray._private.ray_constants import get_runtime_env_default_excludes
    from ray._private.runtime_env.packaging import create_package

    package = tmp_path / "package.zip"
    excludes = EXCLUDES + get_runtime_env_default_excludes()
    create_package(str(ROOT), package, include_parent_dir=False, excludes=excludes, include_gitignore=True)
    assert package.stat().st_size < 5 << 20, package.stat().st_size


def _error_lines(logs: str) -> list[str]:
    return [line for line in logs.splitlines() if line.startswith("imgscan: error:")]


@pytest.mark.heavy
@pytest.mark.cluster
def test_score_runs_on_both_nodes_of_one_cpu_each(cluster: Cluster, archive: dict[str, str]) -> None:
    from ray.util.state import list_actors, list_tasks

    out = f"{archive['root']}/out"
    # small batches: several actor calls, so that both actors (one per node) get some
    argv = ["score", "--source", archive["source"], "--models", archive["models"], "--out", out, "--batch-size", "16"]
    status, logs, job_id = submit_and_wait(cluster, argv)
    assert status == "SUCCEEDED", logs[-5000:]
    assert f"scored {N_IMAGES} images (0 errors) in 8 shards" in logs

    results = read_results(out)
    assert results.num_rows == N_IMAGES  # one row per input
    ids = results.column("image_id").to_pylist()
    assert len(set(ids)) == N_IMAGES
    assert set(results.column("status").to_pylist()) == {"ok"}
    assert results.column("recon_error").null_count == 0

    # Ray's state API keeps the job's finished actors and tasks: a scoring actor on each
    # node, and each node ran some of the job's work (decode tasks or scoring calls).
    actors = list_actors(address=cluster.dashboard, filters=[("job_id", "=", job_id)], detail=True, limit=1000)
    score_nodes = {a.node_id for a in actors if "ScoreActor" in a.class_name}
    assert score_nodes == set(cluster.node_ids), actors
    tasks = list_tasks(address=cluster.dashboard, filters=[("job_id", "=", job_id)], detail=True, limit=10_000)
    work = {t.node_id for t in tasks if t.node_id and ("decode_shards" in t.name or "ScoreActor" in t.name)}
    assert work == set(cluster.node_ids), sorted((t.name, t.node_id) for t in tasks)


@pytest.mark.heavy
@pytest.mark.cluster
def test_wrong_arguments_fail_with_the_laptops_one_line_error(
    cluster: Cluster, archive: dict[str, str], tmp_path: Path, capsys: Any
) -> None:
    argv = ["score", "--source", archive["source"], "--models", archive["models"], "--out", str(tmp_path / "o")]
    argv += ["--batch-size", "0"]
    assert main(argv) == 1  # on this machine: exit 1 and one line on stderr
    laptop = capsys.readouterr().err.strip()
    status, logs, _ = submit_and_wait(cluster, argv)
    assert status == "FAILED"
    assert _error_lines(logs) == [laptop], logs[-3000:]
    assert "Traceback" not in logs


@pytest.mark.heavy
@pytest.mark.cluster
def test_a_pool_that_cannot_fit_is_refused_in_one_line(cluster: Cluster, archive: dict[str, str]) -> None:
    """--workers beyond what two 1-CPU nodes hold: one line saying what is missing, not a hang."""
    out = f"{archive['root']}/too-many"
    argv = ["score", "--source", archive["source"], "--models", archive["models"], "--out", out, "--workers", "50"]
    status, logs, _ = submit_and_wait(cluster, argv)
    assert status == "FAILED"
    errors = _error_lines(logs)
    assert len(errors) == 1, logs[-3000:]
    assert "--workers 50 needs 50 actors" in errors[0] and "1 CPU/" in errors[0], errors
    assert not Path(out, "parts").exists()


@pytest.mark.heavy
@pytest.mark.cluster
def test_nightly_scan_submitted_once_per_night(cluster: Cluster, archive: dict[str, str]) -> None:
    """`scan` through the Jobs API as the README schedules it: one submission id per night,
    so a retried submission of the same night is refused by Ray instead of running twice."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    from jobs.scan import night_uri

    root, night = f"{archive['root']}/nightly", "2026-11-25"
    argv = ["scan", "--source", archive["source"], "--models", archive["models"], "--out", root, "--date", night]
    sub_id = f"imgscan-scan-{night}-{uuid.uuid4().hex[:6]}"
    status, logs, job_id = submit_and_wait(cluster, argv, submission_id=sub_id)
    assert status == "SUCCEEDED", logs[-5000:]
    assert f"scan {night}: 8 new or changed item(s) (0 replaced), {N_IMAGES} images scored (0 errors)" in logs
    results = read_results(night_uri(root, night))
    assert results.num_rows == len(set(results.column("image_id").to_pylist())) == N_IMAGES
    assert [h["date"] for h in read_json(f"{root}/_scan/history.json")] == [night]
    actors = list_actors(address=cluster.dashboard, filters=[("job_id", "=", job_id)], detail=True, limit=1000)
    assert {a.node_id for a in actors if "ScoreActor" in a.class_name} == set(cluster.node_ids)
    with pytest.raises(RuntimeError, match=sub_id):  # the same night submitted again
        JobSubmissionClient(cluster.dashboard).submit_job(entrypoint="python -m jobs --help", submission_id=sub_id)


@pytest.mark.heavy
@pytest.mark.cluster
def test_audit_trains_its_folds_on_both_nodes(cluster: Cluster, archive: dict[str, str]) -> None:
    """`audit` through the Jobs API: each fold is a Ray task, and on two nodes of one CPU the two
    folds (0.75 CPU each) can only run one per node; every image gets its out-of-fold row."""
    import pyarrow.parquet as pq
    from ray.util.state import list_tasks

    out = f"{archive['root']}/audit"
    argv = ["audit", "--source", archive["source"], "--out", out, "--folds", "2", "--image-size", "16"]
    status, logs, job_id = submit_and_wait(cluster, [*argv, "--epochs", "2"])
    assert status == "SUCCEEDED", logs[-5000:]
    assert f"audited {N_IMAGES} images (0 unreadable, left out) in 10 classes" in logs
    oof = pq.read_table(f"{out}/out_of_fold.parquet")
    assert oof.num_rows == len(set(oof.column("image_id").to_pylist())) == N_IMAGES
    tasks = list_tasks(address=cluster.dashboard, filters=[("job_id", "=", job_id)], detail=True, limit=10_000)
    fold_nodes = {t.node_id for t in tasks if "_fold_task" in t.name}
    assert fold_nodes == set(cluster.node_ids), sorted((t.name, t.node_id) for t in tasks)
