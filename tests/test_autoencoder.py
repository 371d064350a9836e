"""The autoencoder's error map on real digits: where a defect is, and what is unusual."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from detectors import AutoencoderDetector
from detectors.maps import relative_error

pytestmark = pytest.mark.heavy

PARAMS: dict[str, Any] = {"input_size": 16, "epochs": 20, "filters": (8, 16), "seed": 0}


@pytest.fixture(scope="module")
def zeros_ae(digits16: tuple[np.ndarray, np.ndarray]) -> AutoencoderDetector:
    images, labels = digits16
    return AutoencoderDetector(**PARAMS).fit(images[labels == 0][:120])


def test_default_latent_grows_with_the_image_area() -> None:
    assert AutoencoderDetector(input_size=32).latent_dim_ == 32  # what digits were tuned with
    assert AutoencoderDetector(input_size=64).latent_dim_ == 128
    assert AutoencoderDetector(input_size=16).latent_dim_ == 8
    assert AutoencoderDetector(input_size=224).latent_dim_ == 256  # capped
    assert AutoencoderDetector(input_size=64, latent_dim=16).latent_dim_ == 16


def test_error_map_is_the_map_the_peak_and_local_score_use(zeros_ae: AutoencoderDetector, digits16: Any) -> None:
    images, _ = digits16
    batch = images[:9]
    m = zeros_ae.error_map(batch)
    assert m.shape == (9, 16, 16) and m.dtype == np.float32
    x = zeros_ae._prepare(batch)
    sq = np.mean((x - zeros_ae.reconstruct(batch)) ** 2, axis=-1)
    np.testing.assert_allclose(m, relative_error(sq, zeros_ae.pixel_error_), rtol=1e-5)
    s = zeros_ae.score(batch)
    np.testing.assert_allclose(s["recon_local"], m.reshape(9, -1).max(axis=1), rtol=1e-6)
    np.testing.assert_allclose(s["recon_error"], sq.reshape(9, -1).mean(axis=1), rtol=1e-5)  # still the plain MSE
    assert zeros_ae.pixel_error_.shape == (16, 16) and np.all(zeros_ae.pixel_error_ >= 0)


def test_a_pasted_defect_on_real_digits_is_localized(zeros_ae: AutoencoderDetector, digits16: Any) -> None:
    images, labels = digits16
    test = images[labels == 0][120:].copy()
    rng = np.random.default_rng(0)
    pos = rng.integers(0, 16 - 4 + 1, size=(len(test), 2))
    checker = (np.indices((4, 4)).sum(axis=0) % 2 * 255).astype(np.uint8)
    for img, (py, px) in zip(test, pos, strict=True):
        img[py : py + 4, px : px + 4] = checker
    s = zeros_ae.score(test)
    y, x = s["recon_peak_y"] * 16, s["recon_peak_x"] * 16
    inside = (y >= pos[:, 0]) & (y <= pos[:, 0] + 4) & (x >= pos[:, 1]) & (x <= pos[:, 1] + 4)
    assert inside.mean() >= 0.9  # measured 1.0


def test_relative_map_ranks_other_digits_above_normal_ones(zeros_ae: AutoencoderDetector, digits16: Any) -> None:
    """Measured: recon_local AUROC 0.9999 relative, 0.956 with the plain squared error
    (the strokes of normal zeros always carry some error; other digits' strokes
    where a zero has none stand out only after dividing by the normal error)."""
    images, labels = digits16
    normal, others = images[labels == 0][120:], images[labels != 0][:300]
    local = np.r_[zeros_ae.score(normal)["recon_local"], zeros_ae.score(others)["recon_local"]]
    y = np.r_[np.zeros(len(normal)), np.ones(len(others))]
    assert roc_auc_score(y, local) > 0.98


def test_invalid_params_and_missing_artifact_are_clear_errors(zeros_ae: AutoencoderDetector, digits16: Any) -> None:
    images, _ = digits16
    with pytest.raises(ValueError, match="local_window >= 1"):
        AutoencoderDetector(input_size=16, local_window=0).fit(images[:20])
    files = dict(zeros_ae.to_files())
    again = AutoencoderDetector.from_files(files)
    np.testing.assert_array_equal(again.pixel_error_, zeros_ae.pixel_error_)
    del files["pixel_error.npy"]
    with pytest.raises(ValueError, match=r"pixel_error\.npy"):
        AutoencoderDetector.from_files(files)
