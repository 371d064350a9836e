"""Invariants of the self-made defects (CutPaste-style) the CAM classifier learns from."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from detectors.defects import make_defects


@pytest.fixture(scope="module")
def normal(digits16: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    images, _ = digits16
    return images[:200, :, :, None]  # uint8 (200, 16, 16, 1)


def test_shape_dtype_kept_and_input_untouched(normal: np.ndarray) -> None:
    before = normal.copy()
    out = make_defects(normal, np.random.default_rng(0))
    assert out.shape == normal.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(normal, before)


def test_each_defect_is_one_local_rectangle(normal: np.ndarray) -> None:
    """Changed pixels lie in one rectangle no larger than max_frac of a side
    (a scar: at most a third of a side long)."""
    s = normal.shape[1]
    out = make_defects(normal, np.random.default_rng(1), max_frac=0.3)
    changed = np.any(out != normal, axis=-1)
    n_changed = 0
    for m in changed:
        if not m.any():
            continue  # a patch identical to what it covers (e.g. blank background) changes nothing
        n_changed += 1
        ys, xs = np.nonzero(m)
        assert ys.max() - ys.min() + 1 <= max(int(s * 0.3), s // 3) + 1
        assert xs.max() - xs.min() + 1 <= max(int(s * 0.3), s // 3) + 1
    assert n_changed > 0.8 * len(normal)  # nearly every image really gets a defect


def test_same_seed_same_defects(normal: np.ndarray) -> None:
    a = make_defects(normal, np.random.default_rng(7))
    b = make_defects(normal, np.random.default_rng(7))
    c = make_defects(normal, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("shape", [(5, 32, 32, 3), (1, 16, 16, 1)])
def test_works_for_colour_and_single_images(shape: Any) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=shape, dtype=np.uint8)
    out = make_defects(images, rng)
    assert out.shape == shape and np.any(out != images)
