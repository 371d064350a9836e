"""The shared contract every detector keeps (one test, every estimator), on real digits."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from detectors import DETECTORS, AutoencoderDetector, BaseDetector, CamDetector, MixtureDetector, NotFittedError
from detectors.cam import build_cam_classifier
from jobs.bundle import ModelBundle

pytestmark = pytest.mark.heavy

FAST: dict[str, dict[str, Any]] = {
    "autoencoder": {"input_size": 16, "epochs": 20, "filters": (8, 16), "latent_dim": 8},
    "mixture": {"input_size": 16, "n_components": 2, "autoencoder_params": {"epochs": 20, "filters": (8, 16)}},
    "cam": {"input_size": 16, "epochs": 2, "filters": (8, 16)},
    "ocsvm": {"input_size": 16},
    "whitening": {"input_size": 16},
}


@pytest.fixture(scope="module")
def fitted(digits16: tuple[np.ndarray, np.ndarray]) -> dict[str, BaseDetector]:
    images, labels = digits16
    normal = images[labels == 0][:80]
    return {name: cls(**FAST[name]).fit(normal) for name, cls in DETECTORS.items()}  # type: ignore[call-arg]


def _as_float(v: Any) -> np.ndarray:
    arr = np.asarray(v)
    if arr.dtype == object:
        return np.array([hash(x) for x in arr], dtype=np.float64)
    return arr.astype(np.float64)


@pytest.mark.parametrize("name", list(DETECTORS))
def test_scores_have_declared_columns_shapes_and_dtypes(
    name: str, fitted: dict[str, BaseDetector], digits16: Any
) -> None:
    images, _ = digits16
    det = fitted[name]
    batch = images[:7]
    scores = det.score(batch)
    assert set(scores) == {c.name for c in det.columns}
    for col in det.columns:
        v = scores[col.name]
        assert len(v) == 7, col.name
        if col.dtype == "list<float32>":
            assert np.asarray(v).ndim == 2 and np.asarray(v).dtype == np.float32
        elif col.dtype == "string":
            assert all(isinstance(x, str) for x in v)
        else:
            assert np.asarray(v).dtype == np.dtype(col.dtype), (col.name, np.asarray(v).dtype)
    # an empty batch gives empty columns, not an error
    assert all(len(v) == 0 for v in det.score(images[:0]).values())


@pytest.mark.parametrize("name", list(DETECTORS))
def test_accepts_any_size_and_colour(name: str, fitted: dict[str, BaseDetector], digits16: Any) -> None:
    images, _ = digits16
    rgb_big = np.repeat(np.kron(images[0], np.ones((3, 3), np.uint8))[:, :, None], 3, axis=2)  # 48x48x3
    mixed = [images[0], rgb_big, np.dstack([rgb_big, np.full(rgb_big.shape[:2], 255, np.uint8)])]
    scores = fitted[name].score(mixed)
    assert all(len(v) == 3 for v in scores.values())


@pytest.mark.parametrize("name", list(DETECTORS))
@pytest.mark.parametrize("store", ["memory", "s3"])
def test_round_trip_through_storage_gives_same_scores(
    name: str, store: str, fitted: dict[str, BaseDetector], digits16: Any, memory_root: str, request: Any
) -> None:
    images, _ = digits16
    if store == "memory":
        root, so = memory_root, None
    else:
        s3 = request.getfixturevalue("s3")
        root, so = s3["root"], s3["storage_options"]
    det = fitted[name]
    bundle = ModelBundle({name: det}, input_size=16, channels=1)
    bundle.save(f"{root}/model", so)
    loaded = ModelBundle.load(f"{root}/model", so)
    assert loaded.version == bundle.version
    again = loaded.detectors[name]
    assert again.calibration_ == det.calibration_ and again.fingerprint_ == det.fingerprint_
    a, b = det.score(images[100:140]), again.score(images[100:140])
    for col in a:
        np.testing.assert_allclose(_as_float(a[col]), _as_float(b[col]), rtol=1e-5, atol=1e-6, err_msg=col)


@pytest.mark.parametrize("name", list(DETECTORS))
def test_calibration_and_metadata_recorded(name: str, fitted: dict[str, BaseDetector]) -> None:
    meta = fitted[name].metadata()
    assert len(meta["fingerprint"]) == 64 and meta["n_train"] == 80
    scored = [c.name for c in fitted[name].columns if c.direction]
    stats = meta["calibration"][scored[0]]
    assert stats["n"] > 0 and np.isfinite(stats["mean"]) and "0.999" in stats["quantiles"]


@pytest.mark.parametrize("name", list(DETECTORS))
def test_empty_training_set_is_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match="at least one image"):
        DETECTORS[name](**FAST[name]).fit(np.zeros((0, 16, 16), np.uint8))  # type: ignore[call-arg]


@pytest.mark.parametrize("name", list(DETECTORS))
def test_unfitted_detector_says_so(name: str) -> None:
    with pytest.raises(NotFittedError, match="not fitted"):
        DETECTORS[name]().score(np.zeros((1, 16, 16), np.uint8))


def test_bad_image_size_is_a_clear_error(digits16: Any) -> None:
    images, _ = digits16
    with pytest.raises(ValueError, match=r"multiple of 4\. Received: image_size=30"):
        AutoencoderDetector(input_size=30, filters=(8, 16)).fit(images[:20])
    with pytest.raises(ValueError, match="Received: image_size=6"):
        CamDetector(input_size=6).fit(images[:20])
    with pytest.raises(ValueError, match="Expected uint8"):
        AutoencoderDetector(input_size=16).fit(images[:20].astype(np.float32))
    with pytest.raises(ValueError, match="backbone"):
        MixtureDetector(backbone="alexnet").fit(images[:20])


def test_anomalies_score_worse_than_normal_digits(fitted: dict[str, BaseDetector], digits16: Any) -> None:
    """Trained on zeros: held-out zeros look normal, noise images do not."""
    images, labels = digits16
    held_out = images[labels == 0][80:]
    noise = np.random.default_rng(0).integers(0, 256, size=(20, 16, 16), dtype=np.uint8)
    for name, col in [
        ("autoencoder", "recon_error"),
        ("mixture", "gmm_loglik"),
        ("ocsvm", "ocsvm_score"),
        ("whitening", "white_excess"),
    ]:
        det = fitted[name]
        normal, odd = det.score(held_out)[col], det.score(noise)[col]
        if det.score_columns[col].direction == "low":
            normal, odd = -normal, -odd
        assert np.median(odd) > np.quantile(normal, 0.9), name


def test_vae_adds_kl_column(digits16: Any) -> None:
    images, labels = digits16
    det = AutoencoderDetector(input_size=16, filters=(8, 16), latent_dim=4, epochs=2, variational=True)
    det.fit(images[labels == 1][:60])
    kl = det.score(images[:5])["ae_kl"]
    assert kl.shape == (5,) and np.all(np.isfinite(kl)) and np.all(kl >= 0)
    again = AutoencoderDetector.from_files(det.to_files())
    np.testing.assert_allclose(again.score(images[:5])["recon_error"], det.score(images[:5])["recon_error"], rtol=1e-5)


def test_cam_learns_labels_and_maps_point_at_the_evidence(digits16: Any) -> None:
    images, labels = digits16
    mask = np.isin(labels, [0, 1])
    det = CamDetector(input_size=16, epochs=4, filters=(8, 16)).fit(images[mask][:200], labels[mask][:200])
    assert det.classes_ == ["0", "1"] and det.anomaly_index_ is None
    s = det.score(images[mask][200:260])
    acc = np.mean(s["cam_pred"] == labels[mask][200:260].astype(str))
    assert acc > 0.9
    assert np.all(np.isnan(s["cam_anomaly"]))
    assert s["cam_map"].shape == (60, 8 * 8)  # 16 px / one pooling
    assert np.all((s["cam_peak_y"] > 0) & (s["cam_peak_y"] < 1))


def test_cam_classifier_layers_are_named() -> None:
    model = build_cam_classifier(num_classes=3, input_size=16, filters=(8, 16))
    for name in ("block1_conv1", "block2_conv2", "cam_features", "cam_gap", "cam_dense"):
        assert model.get_layer(name) is not None
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_cam_classifier(num_classes=1)


def test_u_shaped_cam_maps_at_block_two_with_the_deepest_context(digits16: Any) -> None:
    """With ``decoder`` the map comes back to block 2's resolution (half the input side) through
    skip connections; a one-class CAM is trained on that map and saves/loads it."""
    model = build_cam_classifier(num_classes=2, input_size=16, filters=(4, 8, 16), decoder=True)
    assert model.get_layer("cam_features").output.shape[1:] == (8, 8, 8)  # 16 px / 2, filters[1] channels
    assert model.get_layer("up2_concat").output.shape[-1] == 16 + 8  # upsampled block 3 + block 2's skip
    plain = build_cam_classifier(num_classes=2, input_size=16, filters=(4, 8, 16))
    assert plain.get_layer("cam_features").output.shape[1:] == (4, 4, 16)
    images, labels = digits16
    det = CamDetector(input_size=16, epochs=1, filters=(4, 8, 16), decoder=True).fit(images[labels == 0][:24])
    assert det.model_.get_layer("up2_conv2") is not None and det.cam_map_shape_ == (8, 8)
    s = det.score(images[:6])
    assert s["cam_map"].shape == (6, 64)
    again = CamDetector.from_files(det.to_files())
    np.testing.assert_allclose(again.score(images[:6])["cam_anomaly"], s["cam_anomaly"])


def test_grid_mean_pools_cells_in_order() -> None:
    from detectors.maps import grid_mean

    fmaps = np.arange(2 * 4 * 4 * 3, dtype=np.float64).reshape(2, 4, 4, 3)
    np.testing.assert_allclose(grid_mean(fmaps, 1), fmaps.mean(axis=(1, 2)))
    g2 = grid_mean(fmaps, 2).reshape(2, 4, 3)  # cells row-major: top-left, top-right, ...
    np.testing.assert_allclose(g2[:, 0], fmaps[:, :2, :2].mean(axis=(1, 2)))
    np.testing.assert_allclose(g2[:, 3], fmaps[:, 2:, 2:].mean(axis=(1, 2)))
    # a grid finer than the map is clipped to the map; uneven splits are allowed
    assert grid_mean(fmaps, 9).shape == (2, 16 * 3)
    assert grid_mean(np.zeros((1, 5, 5, 2)), 2).shape == (1, 8)


def test_mixture_grid_must_be_positive(digits16: Any) -> None:
    images, _ = digits16
    with pytest.raises(ValueError, match="grid >= 1"):
        MixtureDetector(input_size=16, grid=0).fit(images[:20])


def test_mixture_global_grid_sees_layout(digits16: Any) -> None:
    """Trained on zeros, the grid-pooled mixture ranks held-out zeros above other digits."""
    images, labels = digits16
    zeros = images[labels == 0]
    det = MixtureDetector(input_size=16, autoencoder_params={"epochs": 20, "filters": (8, 16)}).fit(zeros[:120])
    normal = det.score(zeros[120:])["gmm_loglik"]
    others = det.score(images[labels != 0][:200])["gmm_loglik"]
    from sklearn.metrics import roc_auc_score

    auc = roc_auc_score(np.r_[np.zeros(len(normal)), np.ones(len(others))], -np.r_[normal, others])
    assert auc > 0.9


def test_smoothed_peak_prefers_the_hot_neighbourhood_over_one_hot_cell() -> None:
    from detectors.maps import peak_location, smoothed_peak

    maps = np.zeros((2, 16, 16), np.float32)
    maps[0, 2, 13] = 5.0  # one isolated hot cell ...
    maps[0, 8:12, 4:8] = 2.0  # ... and a hot 4x4 region
    maps[1, 9:14, 2:7] = 1.0
    y, x = peak_location(maps)
    assert (y[0], x[0]) == ((2 + 0.5) / 16, (13 + 0.5) / 16)
    sy, sx = smoothed_peak(maps, 4)  # 5x5-cell window
    assert 8 / 16 <= sy[0] <= 12 / 16 and 4 / 16 <= sx[0] <= 8 / 16
    assert (sy[1], sx[1]) == ((11 + 0.5) / 16, (4 + 0.5) / 16)  # centre of the 5x5 region
    assert smoothed_peak(maps[:0], 4)[0].shape == (0,)


def test_cam_defect_kinds_and_mixture_window_are_checked_before_training(digits16: Any) -> None:
    images, _ = digits16
    with pytest.raises(ValueError, match="defect_kinds among"):
        CamDetector(input_size=16, defect_kinds=["crack"]).fit(images[:20])
    with pytest.raises(ValueError, match="local_window >= 1"):
        MixtureDetector(input_size=16, local_window=0).fit(images[:20])


def test_random_flips_keep_every_image_one_of_its_four_flips() -> None:
    from detectors.cam import random_flips

    x = np.random.default_rng(0).integers(0, 256, size=(64, 8, 8, 1), dtype=np.uint8)
    out = random_flips(x, np.random.default_rng(1))
    seen = set()
    for a, b in zip(x, out, strict=True):
        variants = [a, a[:, ::-1], a[::-1], a[::-1, ::-1]]
        hit = [i for i, v in enumerate(variants) if np.array_equal(v, b)]
        assert hit, "an image that is not a flip of its input"
        seen.add(hit[0])
    assert seen == {0, 1, 2, 3}  # every flip happens


def test_one_class_cam_map_learns_where_the_defects_are() -> None:
    """Trained on the self-made defects' masks (``pixel_loss``), the map is a defect
    probability per cell: held-out defects score above held-out normal images, and the
    map's peak falls on the defect far more often than a random pixel would (real brick
    texture from scikit-image, 32 px crops: digits at 16 px leave defects of 2-6 px)."""
    from skimage import data
    from sklearn.metrics import roc_auc_score

    from detectors.defects import make_defects_with_masks

    brick, rng = data.brick(), np.random.default_rng(0)

    def crops(region: np.ndarray, n: int) -> np.ndarray:
        ys, xs = rng.integers(0, region.shape[0] - 32, n), rng.integers(0, region.shape[1] - 32, n)
        return np.stack([region[y : y + 32, x : x + 32] for y, x in zip(ys, xs, strict=True)])

    train, held = crops(brick[:256], 120), crops(brick[256:], 60)  # top half to train, bottom to test
    det = CamDetector(input_size=32, epochs=6, batch_size=16, filters=(8, 16)).fit(train)
    assert det.pixel_supervised_ and det.anomaly_columns_ == ("cam_anomaly",)
    bad, masks = make_defects_with_masks(held[..., None], np.random.default_rng(5))
    normal, defect = det.score(held), det.score(bad)
    assert np.all((defect["cam_map"] >= 0) & (defect["cam_map"] <= 1))  # probabilities
    y = np.r_[np.zeros(len(held)), np.ones(len(bad))]
    assert roc_auc_score(y, np.r_[normal["cam_anomaly"], defect["cam_anomaly"]]) > 0.8
    py, px = (np.minimum((defect[k] * 32).astype(int), 31) for k in ("cam_peak_y", "cam_peak_x"))
    on_defect = (masks > 0)[np.arange(len(bad)), py, px]
    assert on_defect.mean() > 5 * (masks > 0).mean()  # measured: 60% of peaks on 4% of the pixels


def test_cam_bundle_from_before_pixel_loss_scores_as_it_was_trained(fitted: dict[str, BaseDetector]) -> None:
    """A saved CAM whose params lack ``pixel_loss`` was trained on image labels: its
    ``cam_anomaly`` stays the classifier's defect probability, not the map's maximum."""
    import json

    files = dict(fitted["cam"].to_files())
    meta = json.loads(files["meta.json"])
    meta["params"].pop("pixel_loss")
    meta["params"].pop("decoder")
    files["meta.json"] = json.dumps(meta).encode()
    old = CamDetector.from_files(files)
    assert old.pixel_loss is False and not old.pixel_supervised_ and old.decoder is False
    assert fitted["cam"].pixel_supervised_  # type: ignore[attr-defined]
