"""``imgscan calibrate``: a real bundle trained on real digits, re-calibrated on other digits,
through local disk and a real S3 API."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from detectors.fusion import DIRECTIONS
from jobs.bundle import ModelBundle
from jobs.cli import main
from jobs.demo_data import corrupt_samples, digits, samples, write_folder
from jobs.storage import exists, read_bytes

pytestmark = pytest.mark.heavy


@pytest.fixture(scope="module")
def zeros() -> np.ndarray:
    """The 178 zeros of load_digits at 16 px."""
    return digits(16, classes=[0])[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: Any, zeros: np.ndarray) -> str:
    """A bundle of every detector trained on the first 100 zeros (2 epochs): its URI."""
    root = tmp_path_factory.mktemp("calibrate")
    write_folder(str(root / "train"), samples(zeros[:100], [None] * 100))
    out = str(root / "model")
    argv = ["train", "--source", str(root / "train"), "--out", out, "--image-size", "16", "--epochs", "2"]
    assert main(argv) == 0
    return out


def test_calibrate_keeps_the_scores_of_the_given_normal_images(
    tmp_path: Any, capsys: Any, trained: str, zeros: np.ndarray
) -> None:
    calib = zeros[100:170]  # never trained on
    write_folder(str(tmp_path / "calib"), samples(calib, [None] * len(calib), prefix="c") + corrupt_samples(calib[0]))
    out = str(tmp_path / "recalibrated")
    capsys.readouterr()
    rc = main(["calibrate", "--source", str(tmp_path / "calib"), "--models", trained, "--out", out])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.startswith("calibrated ") and len(captured.out.splitlines()) == 1, captured.out
    assert "on 70 normal images" in captured.out and "3 unreadable" in captured.out
    assert "scored 70 of 70 calibration images" in captured.err  # progress on stderr
    before, after = ModelBundle.load(trained), ModelBundle.load(out)
    assert after.version != before.version
    assert after.training["calibration"]["n_images"] == 70 and after.training["calibration"]["n_skipped"] == 3
    assert after.training["calibration"]["from_version"] == before.version
    assert after.training["fingerprint"] == before.training["fingerprint"]  # the same models
    # every directed column of every detector now holds the scores of those 70 images, from the
    # models as they were (PNG keeps 16 px grey digits exactly)
    expected = before.score(calib)
    for name, det in after.detectors.items():
        assert det.anomaly_columns_ == before.detectors[name].anomaly_columns_
        for col, stats in det.calibration_.items():
            assert col in DIRECTIONS and stats["n"] == 70, (name, col)
            np.testing.assert_allclose(stats["sample"], np.sort(expected[col]), rtol=1e-5, atol=1e-6)
            assert before.detectors[name].calibration_[col]["n"] == 10  # the held-out tenth of 100
    # the models are untouched: the same raw scores for new images; the fused score now reads
    # against the new calibration
    fresh = zeros[170:]
    a, b = before.score(fresh), after.score(fresh)
    np.testing.assert_allclose(a["recon_error"], b["recon_error"], rtol=1e-6)
    np.testing.assert_allclose(a["gmm_loglik"], b["gmm_loglik"], rtol=1e-6)
    assert not np.allclose(a["anomaly_score"], b["anomaly_score"])
    # the training report travels with the models; its calibration.json is the new calibration
    assert json.loads(read_bytes(f"{out}/training/curves.json")) == json.loads(
        read_bytes(f"{trained}/training/curves.json")
    )
    assert json.loads(read_bytes(f"{out}/training/calibration.json"))["recon_error"]["n"] == 70


def test_calibrating_on_the_training_images_is_refused(
    tmp_path: Any, capsys: Any, trained: str, zeros: np.ndarray
) -> None:
    write_folder(str(tmp_path / "same"), samples(zeros[:100], [None] * 100))
    out = str(tmp_path / "out")
    rc = main(["calibrate", "--source", str(tmp_path / "same"), "--models", trained, "--out", out])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert err[-1].startswith("imgscan: error: ") and "the very images" in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not exists(f"{out}/bundle.json")  # no bundle written


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["calibrate", "--source", "{src}", "--out", "{out}"], "required: --models"),
        (["calibrate", "--source", "{src}", "--models", "{missing}", "--out", "{out}"], "No model bundle at"),
        (["calibrate", "--source", "{missing}", "--models", "{model}", "--out", "{out}"], "Source not found"),
        (
            ["calibrate", "--source", "{src}", "--models", "{model}", "--out", "{out}", "--normal-label", "7"],
            "--normal-label '7' is not a label",
        ),
    ],
)
def test_bad_input_is_one_line_and_non_zero(
    tmp_path: Any, capsys: Any, tiny_bundle: str, digits16: Any, argv: list[str], message: str
) -> None:
    images, labels = digits16
    write_folder(str(tmp_path / "src"), samples(images[labels == 0][60:80], [None] * 20))
    args = [
        a.format(src=tmp_path / "src", out=tmp_path / "out", model=tiny_bundle, missing=tmp_path / "nope") for a in argv
    ]
    rc = main(args)
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("[imgscan calibrate]")]
    assert rc != 0
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err


@pytest.mark.s3
def test_calibrate_from_and_to_s3(s3: dict[str, Any], capsys: Any, tiny_bundle: str, digits16: Any) -> None:
    root, so = s3["root"], s3["storage_options"]
    images, labels = digits16
    zeros = images[labels == 0]
    # a labelled source: only the label named calibrates
    write_folder(f"{root}/calib", samples(zeros[60:90], ["0"] * 30) + samples(images[labels == 1][:20], ["1"] * 20), so)
    argv = ["calibrate", "--source", f"{root}/calib", "--models", tiny_bundle, "--out", f"{root}/model"]
    rc = main([*argv, "--normal-label", "0", "--storage-options", json.dumps(so)])
    assert rc == 0, capsys.readouterr().err
    bundle = ModelBundle.load(f"{root}/model", so)
    det = bundle.detectors["autoencoder"]
    assert det.calibration_["recon_error"]["n"] == 30
    np.testing.assert_allclose(
        det.calibration_["recon_error"]["sample"], np.sort(det.score(zeros[60:90])["recon_error"]), rtol=1e-5
    )
