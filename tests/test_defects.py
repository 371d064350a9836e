"""Invariants of the self-made defects (CutPaste / DRAEM-style) the CAM classifier learns from."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from detectors.defects import KINDS, MIN_CHANGE, make_defects


@pytest.fixture(scope="module")
def normal(digits16: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    images, _ = digits16
    return images[:200, :, :, None]  # uint8 (200, 16, 16, 1)


def test_shape_dtype_kept_and_input_untouched(normal: np.ndarray) -> None:
    before = normal.copy()
    out = make_defects(normal, np.random.default_rng(0))
    assert out.shape == normal.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(normal, before)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_is_local_and_visible(normal: np.ndarray, kind: str) -> None:
    """Each kind changes every image, by at least MIN_CHANGE grey levels on average over
    the pixels it changes, inside one box no larger than max_frac of a side (a scratch:
    its length, plus at most 2 px of width)."""
    s = normal.shape[1]
    out = make_defects(normal, np.random.default_rng(1), max_frac=0.4, kinds=[kind])
    diff = np.abs(out.astype(np.int16) - normal.astype(np.int16))[..., 0]
    visible = 0
    for d in diff:
        ys, xs = np.nonzero(d)
        if len(ys) == 0:
            continue
        assert ys.max() - ys.min() + 1 <= int(s * 0.4) + 2
        assert xs.max() - xs.min() + 1 <= int(s * 0.4) + 2
        visible += d[d > 0].mean() >= MIN_CHANGE
    # a few blank digit corners can leave a blur or a scratch too faint after every retry
    assert visible >= 0.9 * len(normal)


def test_kinds_are_mixed_and_checked(normal: np.ndarray) -> None:
    """By default every kind is drawn; a kind that does not exist is refused in one line."""
    rng = np.random.default_rng(2)
    one = {k: make_defects(normal[:40], np.random.default_rng(3), kinds=[k]) for k in KINDS}
    mixed = make_defects(normal[:40], np.random.default_rng(3))
    # the mixed batch is not any single kind's batch
    assert all(not np.array_equal(mixed, v) for v in one.values())
    with pytest.raises(ValueError, match="Expected defect kinds among"):
        make_defects(normal[:2], rng, kinds=["crack"])
    with pytest.raises(ValueError, match="min_frac"):
        make_defects(normal[:2], rng, min_frac=0.5, max_frac=0.2)


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


def test_masks_cover_every_changed_pixel(normal: np.ndarray) -> None:
    """The masks the CAM's map is trained on: in [0, 1], non-zero wherever a defect changed
    a pixel, zero far from it, and the images are those ``make_defects`` gives."""
    from detectors.defects import make_defects_with_masks

    out, masks = make_defects_with_masks(normal[:80], np.random.default_rng(4))
    np.testing.assert_array_equal(out, make_defects(normal[:80], np.random.default_rng(4)))
    assert masks.shape == normal[:80].shape[:3] and masks.dtype == np.float32
    assert masks.min() >= 0.0 and masks.max() <= 1.0
    changed = np.any(out != normal[:80], axis=-1)
    assert np.all(masks[changed] > 0)
    # a defect is local: most of every image is outside its mask
    assert np.all((masks > 0).mean(axis=(1, 2)) < 0.5)
