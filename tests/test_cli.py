"""``imgscan <verb>`` and ``python -m jobs <verb>`` are the same command line."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


def test_python_dash_m_jobs_lists_the_verbs() -> None:
    res = _run(sys.executable, "-m", "jobs", "--help")
    assert res.returncode == 0, res.stderr
    for verb in ("train", "demo"):
        assert verb in res.stdout


def test_console_script_is_the_same_entry_point() -> None:
    exe = shutil.which("imgscan") or str(Path(sys.executable).with_name("imgscan"))
    if not Path(exe).exists():
        pytest.skip("imgscan console script not installed (pip install -e . creates it)")
    a, b = _run(exe, "train", "--help"), _run(sys.executable, "-m", "jobs", "train", "--help")
    assert a.returncode == b.returncode == 0
    assert a.stdout.replace("imgscan", "X") == b.stdout.replace("imgscan", "X")


def test_bad_verb_and_bad_flag_are_one_line_errors() -> None:
    for argv in (["nope"], ["train", "--source", "x", "--out", "y", "--epochs", "many"]):
        res = _run(sys.executable, "-m", "jobs", *argv)
        assert res.returncode == 2
        lines = [ln for ln in res.stderr.splitlines() if ln.startswith("imgscan")]
        assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in res.stderr, res.stderr


def test_detector_names_match_the_registry() -> None:
    from detectors import DETECTOR_NAMES, DETECTORS

    assert tuple(DETECTORS) == DETECTOR_NAMES
    assert all(cls.name == name for name, cls in DETECTORS.items())


def test_decode_side_of_the_scoring_job_does_not_import_tensorflow() -> None:
    """Ray's decode tasks import jobs.score/jobs.scoring: TensorFlow there would cost
    every decode worker ~700 MB and seconds of start-up."""
    code = (
        "import sys, jobs.score, jobs.scoring, jobs.schema, jobs.ledger, jobs.bundle; "
        "sys.exit(1 if 'tensorflow' in sys.modules or 'keras' in sys.modules else 0)"
    )
    res = _run(sys.executable, "-c", code)
    assert res.returncode == 0, res.stderr
