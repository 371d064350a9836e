"""check_bundle: a whole bundle checked without building its models (no TensorFlow in the caller)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jobs.bundle import BundleError, ModelBundle, check_bundle

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle_uri(tmp_path_factory: Any, digits16: tuple[np.ndarray, np.ndarray]) -> str:
    """A real bundle: a variational autoencoder (imgscan's registered layers) + HOG/OCSVM (skops)."""
    from detectors import AutoencoderDetector, OcsvmDetector

    images, labels = digits16
    normal = images[labels == 0][:60]
    detectors = {
        "autoencoder": AutoencoderDetector(
            input_size=16, epochs=1, filters=(8, 16), latent_dim=4, variational=True
        ).fit(normal),
        "ocsvm": OcsvmDetector(input_size=16).fit(normal),
    }
    uri = str(tmp_path_factory.mktemp("bundle") / "model")
    ModelBundle(detectors=detectors, input_size=16, channels=1).save(uri)
    return uri


def _copy(bundle_uri: str, tmp_path: Path) -> Path:
    bad = tmp_path / "copy"
    shutil.copytree(bundle_uri, bad)
    return bad


def test_a_sound_bundle_passes_and_gives_its_manifest(bundle_uri: str) -> None:
    manifest = check_bundle(bundle_uri)
    assert manifest["version"] == ModelBundle.load(bundle_uri).version
    assert (manifest["input_size"], manifest["channels"]) == (16, 1)


def test_checking_imports_no_tensorflow(bundle_uri: str) -> None:
    code = (
        "import sys; from jobs.bundle import check_bundle; check_bundle(sys.argv[1]); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, bundle_uri], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]", out


def _rewrite_keras(path: Path, edit: Any) -> None:
    """Rewrite the config.json of a .keras file through ``edit(config) -> config``."""
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    members["config.json"] = json.dumps(edit(json.loads(members["config.json"]))).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    path.write_bytes(buf.getvalue())


def _with_lambda(config: dict[str, Any]) -> dict[str, Any]:
    layer = config["config"]["layers"][1]
    layer.update({"class_name": "Lambda", "module": "keras.layers", "registered_name": None})
    return config


def _with_foreign_class(config: dict[str, Any]) -> dict[str, Any]:
    config["config"]["layers"][1].update({"module": "os", "registered_name": "os>system"})
    return config


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (
            lambda d: (d / "autoencoder" / "model.keras").write_bytes(b"not a keras file"),
            "model.keras: File is not a zip",
        ),
        (
            lambda d: (d / "autoencoder" / "model.keras").write_bytes(
                (d / "autoencoder" / "model.keras").read_bytes()[:-300]
            ),
            "model.keras",
        ),
        (lambda d: _rewrite_keras(d / "autoencoder" / "model.keras", _with_lambda), "a Lambda layer holds code"),
        (
            lambda d: _rewrite_keras(d / "autoencoder" / "model.keras", _with_foreign_class),
            "neither Keras' nor imgscan's",
        ),
        (
            lambda d: (d / "ocsvm" / "model.skops").write_bytes(b"PK\x03\x04garbage"),
            "detector 'ocsvm' cannot be loaded",
        ),
        (lambda d: (d / "ocsvm" / "model.skops").unlink(), "detector 'ocsvm' cannot be loaded"),
        (lambda d: (d / "ocsvm" / "meta.json").write_text('{"detector": "cam"}'), "Expected an artifact of detector"),
        (
            lambda d: (d / "ocsvm" / "meta.json").write_text((d / "ocsvm" / "meta.json").read_text() + " "),
            "do not match version",
        ),
    ],
    ids=["garbage", "truncated", "lambda", "foreign-class", "skops-garbage", "missing", "meta-other", "changed"],
)
def test_a_damaged_bundle_fails_in_one_line(bundle_uri: str, tmp_path: Path, damage: Any, message: str) -> None:
    bad = _copy(bundle_uri, tmp_path)
    damage(bad)
    with pytest.raises(BundleError) as e:
        check_bundle(str(bad))
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
