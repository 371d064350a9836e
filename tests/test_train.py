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

pytestmark = pytest.mark.heavy


def _make_folder(root: str, so: dict[str, Any] | None = None) -> tuple[np.ndarray, np.ndarray]:
    imgs, labels = digits(16, classes=[0, 1])
    imgs, labels = imgs[:120], labels[:120]
    items = samples(imgs, [str(v) for v in labels]) + corrupt_samples(imgs[0], "0")
    write_folder(root, items, so)
    return imgs, labels


def test_train_writes_a_bundle_score_can_load(tmp_path: Any, capsys: Any) -> None:
    src, out = str(tmp_path / "src"), str(tmp_path / "model")
    imgs, labels = _make_folder(src)
    argv = ["train", "--source", src, "--out", out, "--image-size", "16", "--epochs", "2", "--normal-label", "0"]
    rc = main([*argv, "--calibration-replicas", "2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert len(captured.out.splitlines()) == 1 and captured.out.startswith("trained "), captured.out  # epochs: stderr
    assert captured.err.count("Epoch 1/2") == 2 and captured.err.count("Epoch 2/2") == 2  # autoencoder, CAM
    bundle = ModelBundle.load(out)
    assert set(bundle.detectors) == {"autoencoder", "mixture", "cam", "ocsvm", "whitening"}
    assert bundle.training["n_images"] == 120 and bundle.training["n_skipped"] == 3
    assert bundle.training["n_normal"] == int((labels == 0).sum())
    assert bundle.detectors["cam"].classes_ == ["0", "1"]  # type: ignore[attr-defined]
    # a small set: each detector's own held-out tenth and those of its 2 calibration replicas
    # whose scores are on the model's scale (a replica refused is said on stderr)
    tenth = round(0.1 * int((labels == 0).sum()))
    sizes = {name: {c["n"] for c in det.calibration_.values()} for name, det in bundle.detectors.items()}
    for name, per in sizes.items():
        unit = 12 if name == "cam" else tenth  # the CAM learns both labels
        assert len(per) == 1 and per <= {unit, 2 * unit, 3 * unit}, (name, per)
        refused = captured.err.count(f"{name}: replica ")
        assert per == {(3 - refused) * unit}, (name, per, refused)
    assert any(per == {3 * tenth} for per in sizes.values())
    assert "calibration replica 2 of 2 (seed 2)" in captured.err
    assert bundle.training["calibration_replicas"] == 2
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
    bundle = ModelBundle.load(f"{root}/model", so)
    assert set(bundle.detectors) == {"autoencoder", "ocsvm"}
    # replicas are opt-in: by default a detector calibrates on its own held-out tenth alone
    assert bundle.training["calibration_replicas"] == 0
    # a tenth of the 120 readable images
    assert {c["n"] for c in bundle.detectors["ocsvm"].calibration_.values()} == {12}


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
        (
            ["train", "--source", "{src}", "--out", "{out}", "--calibration-replicas", "-1"],
            "--calibration-replicas must be >= 0",
        ),
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


def test_param_overrides_reach_the_detectors_and_the_bundle(tmp_path: Any, capsys: Any) -> None:
    src, out = str(tmp_path / "src"), str(tmp_path / "model")
    _make_folder(src)
    argv = ["train", "--source", src, "--out", out, "--image-size", "16", "--epochs", "1"]
    argv += ["--detectors", "autoencoder", "mixture", "--param", "autoencoder.latent_dim=8"]
    argv += ["--param", "autoencoder.filters=[4, 8]", "--param", "mixture.covariance_type=diag"]
    assert main(argv) == 0, capsys.readouterr().err
    bundle = ModelBundle.load(out)
    ae, mix = bundle.detectors["autoencoder"], bundle.detectors["mixture"]
    assert ae.latent_dim == 8 and list(ae.filters) == [4, 8]  # type: ignore[attr-defined]
    assert ae.model_.get_layer("latent").units == 8  # type: ignore[attr-defined]
    assert mix.covariance_type == "diag"  # type: ignore[attr-defined]
    assert mix.global_[-1].covariance_type == "diag"  # type: ignore[attr-defined]
    assert bundle.training["params"] == {
        "autoencoder": {"latent_dim": 8, "filters": [4, 8]},
        "mixture": {"covariance_type": "diag"},
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--param", "latent_dim=8"], "--param expects DETECTOR.NAME=VALUE"),
        (["--param", "autoencoder.no_such=1"], "--param autoencoder.no_such: autoencoder has no such parameter"),
        (["--detectors", "ocsvm", "--param", "cam.epochs=1"], "--param names detectors that are not trained"),
        (["--backbone", "vgg16", "--weights", "memory://nowhere/vgg16.weights.h5"], "--weights: No such file"),
    ],
)
def test_bad_param_or_weights_is_one_line(tmp_path: Any, capsys: Any, extra: list[str], message: str) -> None:
    src = str(tmp_path / "src")
    _make_folder(src)
    rc = main(["train", "--source", src, "--out", str(tmp_path / "m"), "--image-size", "16", "--epochs", "1", *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and message in err[-1] and "Traceback" not in "\n".join(err), err
    assert not any(line.startswith("[imgscan train] read") for line in err)  # refused before reading


def test_backbone_weights_come_from_the_uri_the_user_gives(tmp_path: Any, capsys: Any) -> None:
    """The mixture's VGG16 features carry the weights of the file at --weights, and the
    bundle records that URI (not the temp copy Keras loaded it from)."""
    import fsspec
    import keras

    vgg = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    local = str(tmp_path / "vgg16.weights.h5")
    vgg.save_weights(local)
    uri = "memory://weights-test/vgg16.weights.h5"
    with open(local, "rb") as f, fsspec.open(uri, "wb") as g:
        g.write(f.read())
    src, out = str(tmp_path / "src"), str(tmp_path / "model")
    _make_folder(src)
    argv = ["train", "--source", src, "--out", out, "--image-size", "32", "--detectors", "mixture"]
    assert main([*argv, "--backbone", "vgg16", "--weights", uri]) == 0, capsys.readouterr().err
    mix = ModelBundle.load(out).detectors["mixture"]
    assert mix.weights == uri and ModelBundle.load(out).training["weights"] == uri  # type: ignore[attr-defined]
    got = mix.extractor_.get_layer("block1_conv1").get_weights()[0]  # type: ignore[attr-defined]
    np.testing.assert_array_equal(got, vgg.get_layer("block1_conv1").get_weights()[0])


@pytest.mark.parametrize(
    ("replicas", "n_normal", "expected"),
    [(2, 120, 2), (5, 999, 5), (2, 1000, 0), (0, 120, 0), (2, 29, 0), (2, 30, 2)],
)
def test_only_small_sets_get_calibration_replicas(replicas: int, n_normal: int, expected: int) -> None:
    from jobs.train import MIN_REPLICATE, REPLICATE_BELOW, calibration_replicas

    assert (MIN_REPLICATE, REPLICATE_BELOW) == (30, 1000)  # the cases above are at their edges
    assert calibration_replicas(replicas, n_normal) == expected


def test_a_replica_on_another_scale_is_brought_to_the_model_s_scale() -> None:
    """A replica whose scores are the same kind of model's times 3 plus 7 (another scale, as an
    OCSVM's offset or a CAM's confidence moves with the seed) lends held-out scores on the model's
    scale: read from both models' scores of the images both trained on."""
    from detectors import WhiteningDetector
    from jobs.train import aligned_to

    class Rescaled(WhiteningDetector):
        def score(self, images: Any) -> dict[str, Any]:
            out = super().score(images)
            return out | {"white_excess": 3.0 * np.asarray(out["white_excess"]) + 7.0}

    x = digits(16, classes=[3])[0][:100, ..., None]
    own = WhiteningDetector(input_size=16, channels=1, seed=0).fit(x)
    plain = WhiteningDetector(input_size=16, channels=1, seed=1).fit(x)  # the replica on the model's scale
    rescaled = Rescaled(input_size=16, channels=1, seed=1).fit(x)
    raw = np.asarray(rescaled.calibration_["white_excess"]["sample"])
    np.testing.assert_allclose(raw, 3.0 * np.asarray(plain.calibration_["white_excess"]["sample"]) + 7.0, rtol=1e-6)
    got = aligned_to(own, rescaled, x)
    assert got is not None
    want = np.asarray(plain.calibration_["white_excess"]["sample"])
    # back on the model's scale (up to how far two fits of one detector differ), far from the raw 3x + 7
    assert np.max(np.abs(got["white_excess"] - want)) < 0.1 * np.ptp(want)
    assert np.min(np.abs(raw - want)) > np.ptp(want)
    # a column already on the model's scale stays nearly where it was
    kept = np.asarray(plain.calibration_["white_deficit"]["sample"])
    assert np.max(np.abs(got["white_deficit"] - kept)) < 0.1 * np.ptp(kept)
    # too few images both trained on: nothing to read the scale from
    assert aligned_to(own, rescaled, x[:9]) is None


def test_a_replica_still_off_the_model_s_scale_after_alignment_is_not_pooled() -> None:
    """Alignment matches the scores of images both models trained on; where the replica's held-out
    scores still differ from the model's own (another generalisation gap), a KS test refuses them."""
    from jobs.train import same_scale

    rng = np.random.default_rng(0)
    own = {"recon_error": rng.normal(size=30)}
    assert same_scale(own, {"recon_error": rng.normal(size=30)}, ["recon_error"])
    assert not same_scale(own, {"recon_error": rng.normal(2.0, 1.0, size=30)}, ["recon_error"])
    # only the declared columns are tested; a replica without one has nothing to pool
    assert same_scale(own | {"cam_prob": rng.normal(size=30)}, {"recon_error": rng.normal(size=30)}, ["recon_error"])
    assert not same_scale(own, {}, ["recon_error"])


def test_a_small_set_calibrates_on_the_held_out_scores_of_its_replicas() -> None:
    """Two replicas (seeds 1 and 2) triple the held-out scores a detector calibrates on; the
    model that scores is still the seed-0 one, and labelled non-normal images never enter."""
    from dataclasses import replace

    from detectors import WhiteningDetector
    from jobs.train import TrainConfig, aligned_to, fit_detectors

    imgs, labels = digits(16, classes=[3, 5])
    x = np.concatenate([imgs[labels == 3][:60], imgs[labels == 5][:20]])[..., None]
    names = ["3"] * 60 + ["5"] * 20
    normal = np.array([n == "3" for n in names])
    cfg = TrainConfig(
        source="<t>",
        out="<t>",
        image_size=16,
        detectors=("ocsvm", "whitening"),
        normal_label="3",
        calibration_replicas=2,
    )
    pooled, _ = fit_detectors(cfg, x, names, normal, channels=1)
    alone, _ = fit_detectors(replace(cfg, calibration_replicas=0), x, names, normal, channels=1)
    for name in ("ocsvm", "whitening"):
        assert {s["n"] for s in alone[name].calibration_.values()} == {6}  # a tenth of the 60 normal images
        assert {s["n"] for s in pooled[name].calibration_.values()} == {18}
    got, one = pooled["whitening"], alone["whitening"]
    np.testing.assert_array_equal(got.spectrum_, one.spectrum_)  # type: ignore[attr-defined]
    # by hand: the held-out scores of the detector fitted with seed 0, and those of seeds 1 and 2
    # brought to its scale (aligned_to, from the normal images alone: the "5"s never enter)
    by_hand = [WhiteningDetector(input_size=16, channels=1, seed=k).fit(x[normal]) for k in range(3)]
    parts = [np.asarray(by_hand[0].calibration_["white_excess"]["sample"])]
    for replica in by_hand[1:]:
        aligned = aligned_to(by_hand[0], replica, x[normal])
        assert aligned is not None
        parts.append(aligned["white_excess"])
    np.testing.assert_allclose(got.calibration_["white_excess"]["sample"], np.sort(np.concatenate(parts)))
