"""``imgscan score`` / ``python -m jobs score`` from the command line: bad input is one line and a
non-zero exit before any Ray work; a job killed midway resumes with the same run id, exactly once."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from detectors import AutoencoderDetector, OcsvmDetector
from jobs.bundle import ModelBundle
from jobs.cli import main
from jobs.demo_data import corrupt_samples, digits, samples, write_tar_shards
from jobs.ledger import committed_shards, read_results
from jobs.storage import read_json

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle_uri(tmp_path_factory: Any, digits16: tuple[np.ndarray, np.ndarray]) -> str:
    """A small real bundle (autoencoder + HOG/OCSVM at 16 px), quick to train and to score."""
    images, labels = digits16
    normal = images[labels == 0][:100]
    detectors = {
        "autoencoder": AutoencoderDetector(input_size=16, epochs=1, filters=(8, 16), latent_dim=8).fit(normal),
        "ocsvm": OcsvmDetector(input_size=16).fit(normal),
    }
    uri = str(tmp_path_factory.mktemp("bundle") / "model")
    ModelBundle(detectors=detectors, input_size=16, channels=1).save(uri)
    return uri


@pytest.fixture
def src(tmp_path: Path) -> Path:
    imgs, labels = digits(16)
    write_tar_shards(str(tmp_path / "src"), samples(imgs[:40], [str(v) for v in labels[:40]]), 20)
    return tmp_path / "src"


def _bad_bundle(tmp_path: Path, bundle_uri: str) -> str:
    """A copy of the bundle whose autoencoder model file is garbage."""
    import shutil

    bad = tmp_path / "bad-model"
    shutil.copytree(bundle_uri, bad)
    (bad / "autoencoder" / "model.keras").write_bytes(b"not a keras file")
    return str(bad)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--source", "{tmp}/missing"], "Source not found"),
        (["--source", "{tmp}/empty"], "Source is empty"),
        (["--models", "{tmp}/no-model"], "No model bundle at"),
        (["--models", "{bad_bundle}"], "detector 'autoencoder' cannot be loaded"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--workers", "0"], "--workers must be >= 1"),
        (["--gpus-per-worker", "-1"], "--gpus-per-worker must be >= 0"),
        (["--gpus-per-worker", "1"], "needs GPUs, but this machine has none"),
        (["--run-id", "a/b"], "--run-id must be"),
        (["--storage-options", "[1]"], "--storage-options must be a JSON object"),
        (["--batch-size", "many"], "invalid int value"),
        (["--out", "{held}"], "holds run other-run; pass --run-id other-run to resume"),
    ],
)
def test_bad_input_is_one_line_before_any_ray_work(
    args: list[str], message: str, bundle_uri: str, src: Path, tmp_path: Path, capsys: Any
) -> None:
    import ray

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    held = tmp_path / "held"
    held.mkdir()
    (held / "_run.json").write_text(json.dumps({"run_id": "other-run"}))
    base = {"--source": str(src), "--models": bundle_uri, "--out": str(tmp_path / "out")}
    fmt = {"tmp": tmp_path, "held": held, "bad_bundle": _bad_bundle(tmp_path, bundle_uri) if "bad" in str(args) else ""}
    given = [a.format(**fmt) for a in args]
    argv = ["score"]
    for flag, value in base.items():
        if flag not in given:
            argv += [flag, value]
    rc = main([*argv, *given])
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert message in err and "Traceback" not in err, err
    assert len(err.splitlines()) == 1, err
    assert not ray.is_initialized()
    assert not (tmp_path / "out").exists()  # nothing written either


@pytest.mark.heavy
@pytest.mark.cluster
def test_killed_job_resumes_with_same_run_id_exactly_once(bundle_uri: str, tmp_path: Path, capsys: Any) -> None:
    imgs, labels = digits(16)
    items = samples(imgs[:600], [str(v) for v in labels[:600]]) + corrupt_samples(imgs[0], "0")
    write_tar_shards(str(tmp_path / "src"), items, 15)  # 41 shards
    n_shards = 41
    out = tmp_path / "out"
    base = [sys.executable, "-m", "jobs", "score", "--source", str(tmp_path / "src"), "--models", bundle_uri]
    base += ["--out", str(out), "--num-cpus", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # small batches: the job commits shard by shard, slowly enough to be killed midway
    job = subprocess.Popen(
        [*base, "--run-id", "night-1", "--batch-size", "2"],
        cwd=ROOT,
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while len(committed_shards(str(out))) < 2 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    # SIGKILL the job and the local Ray it started: its own session, all started by this test
    _kill_session(job.pid)
    job.wait(timeout=60)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "parts").glob("*.parquet")}
    assert 2 <= len(before) < n_shards, f"not killed midway: {len(before)} of {n_shards} parts"
    assert read_json(str(out / "_run.json"))["run_id"] == "night-1"

    # without the run id the results are refused; with it the run resumes (in this process:
    # the same code path, without paying for another TensorFlow start-up)
    assert main(base[3:]) != 0
    assert "holds run night-1; pass --run-id night-1" in capsys.readouterr().err
    assert main([*base[3:], "--run-id", "night-1", "--batch-size", "64"]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"{len(before)} already committed" in summary and "(run night-1," in summary, summary

    results = read_results(str(out))
    ids = results.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(items)  # each image exactly once
    assert set(results.column("run_id").to_pylist()) == {"night-1"}
    assert results.column("status").to_pylist().count("error") == 3
    after = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (out / "parts").glob("*.parquet")}
    assert len(after) == n_shards
    assert all(after[name] == stamp for name, stamp in before.items())  # committed parts were not redone


def _kill_session(sid: int) -> None:
    """SIGKILL every process of session ``sid`` (the job, its Ray, its workers), by pid."""
    import importlib

    import ray  # noqa: F401  (Ray ships psutil and puts it on sys.path)

    psutil = importlib.import_module("psutil")

    for _ in range(3):
        procs = []
        for p in psutil.process_iter():
            try:
                if os.getsid(p.pid) == sid:
                    procs.append(p)
            except (ProcessLookupError, PermissionError):
                continue
        if not procs:
            return
        for p in procs:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.kill(p.pid, signal.SIGKILL)
        psutil.wait_procs(procs, timeout=10)


@pytest.mark.heavy
@pytest.mark.cluster
def test_the_driver_never_imports_tensorflow(bundle_uri: str, src: Path, tmp_path: Path) -> None:
    """The bundle is checked without building its models: TensorFlow lives in the actors only
    (in the driver it held about 1 GiB for the whole job)."""
    code = (
        "import sys; from jobs.cli import main; rc = main(sys.argv[1:]); "
        "print(rc, sorted({m.split('.')[0] for m in sys.modules} & {'tensorflow', 'keras'}))"
    )
    args = ["score", "--source", str(src), "--models", bundle_uri, "--out", str(tmp_path / "out"), "--num-cpus", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stdout
    assert read_results(str(tmp_path / "out")).num_rows == 40  # it did score, in the actors
