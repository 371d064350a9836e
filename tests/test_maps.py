"""Per-pixel evidence maps (detectors/maps.py)."""

from __future__ import annotations

import numpy as np
import pytest

from detectors.maps import peak_location, relative_error


def test_relative_error_discounts_pixels_normal_images_get_wrong() -> None:
    normal = np.full((4, 4), 0.1, np.float32)
    normal[0, 0] = 0.9  # a pixel every normal image reconstructs badly (e.g. a border)
    errors = np.zeros((1, 4, 4), np.float32)
    errors[0, 0, 0] = 0.8  # as usual there ...
    errors[0, 2, 3] = 0.5  # ... but unusual here
    rel = relative_error(errors, normal)
    assert rel.dtype == np.float32 and rel.shape == (1, 4, 4)
    floor = normal.mean()
    np.testing.assert_allclose(rel[0, 0, 0], 0.8 / (0.9 + floor), rtol=1e-6)
    np.testing.assert_allclose(rel[0, 2, 3], 0.5 / (0.1 + floor), rtol=1e-6)
    assert peak_location(errors)[0][0] == 0.5 / 4  # the raw peak is the usual one
    assert peak_location(rel)[0][0] == 2.5 / 4  # the relative peak the unusual one


def test_relative_error_edge_cases() -> None:
    errors = np.ones((2, 3, 3), np.float32)
    np.testing.assert_array_equal(relative_error(errors, np.zeros((3, 3))), errors)  # nothing to compare with
    assert relative_error(errors[:0], np.ones((3, 3))).shape == (0, 3, 3)
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        relative_error(errors, np.ones((4, 4)))
