"""The training job, end to end on real digits in a folder, through local disk and S3."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from jobs.bundle import ModelBundle
from jobs.cli import main
from jobs.demo_data import corrupt_samples, digits, samples, write_folder
from jobs.storage import exists, read_bytes

pytestmark = pytest.mark.slow


def _make_folder(root: str, so: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    imgs, labels = digits(16, classes=[0, 1])
    imgs, labels = imgs[:120], labels[:120]
    items = samples(imgs, [str(v) for v in labels]) + corrupt_samples(imgs[0], "0")
    write_folder(root, items, so)
    return imgs, labels


def test_train_writes_a_bundle_score_can_load(tmp_path: Any, capsys: Any) -> None:
    src, out = str(tmp_path / "src"), str(tmp_path / "model")
    imgs, labels = _make_folder(src)
    rc = main(["train", "--source", src, "--out", out, "--image-size", "16", "--epochs", "2", "--normal-label", "0"])
    assert rc == 0, capsys.readouterr().err
    bundle = ModelBundle.load(out)
    assert set(bundle.detectors) == {"autoencoder", "mixture", "cam", "ocsvm"}
    assert bundle.training["n_images"] == 120 and bundle.training["n_skipped"] == 3
    assert bundle.training["n_normal"] == int((labels == 0).sum())
    assert bundle.detectors["cam"].classes_ == ["0", "1"]  # type: ignore[attr-defined]
    skipped = json.loads(read_bytes(f"{out}/training/skipped.json"))
    assert {s["image_id"].rsplit("/", 1)[-1] for s in skipped} == {
        "corrupt-empty.png",
        "corrupt-text.png",
        "corrupt-truncated.png",
    }
    assert all(s["reason"] for s in skipped)
    curves = json.loads(read_bytes(f"{out}/training/curves.json"))
    assert len(curves["autoencoder"]["loss"]) == 2 and len(curves["autoencoder"]["val_loss"]) == 2
    for png in ("curves.png", "reconstructions.png"):
        assert read_bytes(f"{out}/training/{png}")[:8] == b"\x89PNG\r\n\x1a\n"
    scores = bundle.score(imgs[:10])
    assert len(scores["recon_error"]) == 10 and len(scores["cam_pred"]) == 10


@pytest.mark.s3
def test_train_from_and_to_s3(s3: dict[str, Any]) -> None:
    root, so = s3["root"], s3["storage_options"]
    _make_folder(f"{root}/src", so)
    rc = main(
        [
            "train",
            "--source",
            f"{root}/src",
            "--out",
            f"{root}/model",
            "--image-size",
            "16",
            "--epochs",
            "1",
            "--detectors",
            "autoencoder",
            "ocsvm",
            "--storage-options",
            json.dumps(so),
        ]
    )
    assert rc == 0
    assert exists(f"{root}/model/bundle.json", so)
    assert set(ModelBundle.load(f"{root}/model", so).detectors) == {"autoencoder", "ocsvm"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--source", "/definitely/missing", "--out", "/tmp/x"], "Source not found"),
        (["train", "--source", "{src}", "--out", "{out}", "--normal-label", "7"], "--normal-label '7' is not a label"),
        (
            ["train", "--source", "{src}", "--out", "{out}", "--image-size", "30"],
            "--image-size must be a multiple of 4",
        ),
        (["train", "--source", "{src}", "--out", "{out}", "--detectors", "nope"], "invalid choice"),
        (["train", "--source", "{src}", "--out", "{out}", "--storage-options", "{{bad"], "must be a JSON object"),
        (["train", "--source", "{empty}", "--out", "{out}"], "Source is empty"),
        (["train", "--out", "{out}"], "required: --source"),
    ],
)
def test_bad_input_is_one_line_and_non_zero(tmp_path: Any, capsys: Any, argv: list[str], message: str) -> None:
    src = tmp_path / "src"
    (src / "0").mkdir(parents=True)
    from jobs.demo_data import png_bytes

    (src / "0" / "a.png").write_bytes(png_bytes(np.zeros((8, 8), np.uint8)))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    args = [a.format(src=src, out=tmp_path / "out", empty=empty) for a in argv]
    rc = main(args)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert message in err and "Traceback" not in err
    assert len(err.splitlines()) == 1, err
