"""Shared fixtures: real digits, a real S3 API (moto server on 127.0.0.1), memory://."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def digits16() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 real digits (sklearn.datasets.load_digits) at 16x16, uint8, with labels."""
    from jobs.demo_data import digits

    return digits(16)


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory: Any, digits16: tuple[np.ndarray, np.ndarray]) -> str:
    """The smallest real bundle (once per session): an autoencoder at 16 px, one epoch on 60
    digits. For tests of what happens around the models, not of their scores."""
    from detectors import AutoencoderDetector
    from jobs.bundle import ModelBundle

    images, labels = digits16
    det = AutoencoderDetector(input_size=16, epochs=1, filters=(8, 16), latent_dim=4).fit(images[labels == 0][:60])
    uri = str(tmp_path_factory.mktemp("tiny-bundle") / "model")
    ModelBundle(detectors={"autoencoder": det}, input_size=16, channels=1).save(uri)
    return uri


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """One moto S3 server for the session (as s3fs's own tests do): its endpoint URL."""
    from moto.server import ThreadedMotoServer

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3(s3_server: str) -> dict[str, Any]:
    """A fresh bucket on the moto server: {"root": "s3://bucket", "storage_options": {...}}."""
    import boto3
    import s3fs

    bucket = f"imgscan-test-{uuid.uuid4().hex[:12]}"
    boto3.client(
        "s3",
        endpoint_url=s3_server,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket=bucket)
    s3fs.S3FileSystem.clear_instance_cache()
    options = {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": s3_server}}
    return {"root": f"s3://{bucket}", "storage_options": options}


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A unique memory:// prefix, emptied afterwards."""
    import fsspec

    root = f"memory://imgscan-{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root):
        fs.rm(root, recursive=True)


CHROMIUM_INSTALL = "apt-get update && apt-get install -y chromium"


def _browser() -> str:
    """The headless browser's path. Skips without Chromium, except under ``CI=true`` (where
    .ci/run installs it): there it fails."""
    browser = next((p for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))), None)
    if browser is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"chromium is not installed; CI must install it: {CHROMIUM_INSTALL}")
        pytest.skip(f"chromium is not installed ({CHROMIUM_INSTALL}); with CI=true this fails instead")
    return browser


#: flags of every headless Chromium run: no network of its own, a profile of its own
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)


@pytest.fixture
def dump_dom(tmp_path: Path) -> Callable[[str], str]:
    """``dump_dom(url)``: the page's DOM after its scripts ran (``chromium --dump-dom``), as HTML text."""
    browser = _browser()

    def dump(url: str) -> str:
        profile = tmp_path / f"profile-{uuid.uuid4().hex[:6]}"
        profile.mkdir()
        # a virtual-time budget lets timers and image onerror handlers fire before the dump
        cmd = [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--virtual-time-budget=3000", "--dump-dom", url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
        assert "<html" in proc.stdout, proc.stderr[-2000:]
        return proc.stdout

    return dump


@pytest.fixture
def screenshot(tmp_path: Path) -> Callable[..., Path]:
    """``screenshot(url, height=...)``: the page rendered by headless Chromium, as a PNG path.

    Skips without Chromium, except under ``CI=true`` (where .ci/run installs it): there it fails.
    """
    browser = _browser()

    def take(url: str, *, width: int = 1400, height: int = 2000) -> Path:
        shot = tmp_path / f"shot-{uuid.uuid4().hex[:6]}.png"
        profile = tmp_path / f"profile-{uuid.uuid4().hex[:6]}"
        profile.mkdir()
        cmd = [
            browser,
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--hide-scrollbars",
            f"--window-size={width},{height}",
            f"--screenshot={shot}",
            url,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=False)
        assert shot.exists(), proc.stderr[-2000:]
        return shot

    return take
