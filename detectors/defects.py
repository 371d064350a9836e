"""Self-made defects for training on normal images only (CutPaste / DRAEM-style).

A classifier that tells these apart from untouched images learns local
irregularity without ever seeing a real defect. What it learns carries over to
defects it never saw only if the self-made ones are varied: a CAM trained on
CutPaste patches alone (the former default) scored 0.88-0.95 AUROC on textures
with pasted photo patches. So each image gets one defect of a random kind, in a
random shape (rectangle, rotated ellipse, or an irregular blob) at a random
place, of a random size between ``min_frac`` and ``max_frac`` of a side:

* ``cutpaste``: the same shape cut from another normal image of the batch
  (another place of the archive, never an outside photo), flipped or rotated,
  its brightness and contrast changed;
* ``scratch``: a thin anti-aliased line (1-3 px) at a random angle, dark or bright;
* ``stain``: a soft-edged shift of intensity (per channel: of colour);
* ``hole``: a flat fill of one random value (per channel);
* ``blur``: the image blurred inside a soft-edged shape;
* ``noise``: Gaussian noise inside the shape.

Measured on the one archive these kinds were tuned on (grass crops, 150 to
train, 60 normal and 60 defect crops per kind to test; ``bench/accuracy.py
--only texture --archives grass --quick --detectors cam``, seed 0, one run each):
cam_anomaly AUROC per bench kind photo / scratch / stain / hole / blur was
0.936 / 0.631 / 0.570 / 0.748 / 0.632 (mean 0.703) with the former CutPaste
patches and scars, 0.881 / 0.603 / 0.556 / 0.782 / 0.782 (mean 0.721) with these
six kinds: better on blur and holes, worse on photo patches, and far from
enough on grass either way. The other archives were not looked at while
choosing them; ``bench/accuracy.py`` reports them.

``make_defects_with_masks`` also gives each defect's mask (the weight with which
every pixel took it): the CAM trains its map on those, DRAEM-style
(``detectors.cam``), so it learns *where* a defect is, not only that one exists.

Every defect is checked to change the image (``MIN_CHANGE`` grey levels on
average over the pixels it covers, else it is drawn again): a stain on a blank
background that changes nothing would teach the classifier that normal images
can be defects.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

KINDS = ("cutpaste", "scratch", "stain", "hole", "blur", "noise")
#: mean absolute change, grey levels, over the pixels a defect covers, below which it is drawn again
MIN_CHANGE = 6.0
_TRIES = 8


def shape_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """bool (h, w): a random rectangle, rotated ellipse or irregular blob inside the box."""
    kind = rng.integers(3)
    if kind == 0 or min(h, w) < 4:
        return np.ones((h, w), bool)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    if kind == 1:
        t = rng.uniform(0, np.pi)
        u = (yy - cy) * np.cos(t) + (xx - cx) * np.sin(t)
        v = -(yy - cy) * np.sin(t) + (xx - cx) * np.cos(t)
        return bool_or_centre((u / max(cy, 0.5)) ** 2 + (v / max(cx, 0.5)) ** 2 <= 1.0)
    # irregular blob: smoothed noise thresholded, kept inside an ellipse so it stays local
    noise = ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), max(1.0, min(h, w) / 6))
    ellipse = ((yy - cy) / max(cy, 0.5)) ** 2 + ((xx - cx) / max(cx, 0.5)) ** 2 <= 1.0
    return bool_or_centre((noise > np.quantile(noise, rng.uniform(0.3, 0.6))) & ellipse)


def bool_or_centre(m: np.ndarray) -> np.ndarray:
    """The mask, or its centre pixel when it came out empty."""
    if not m.any():
        m = m.copy()
        m[m.shape[0] // 2, m.shape[1] // 2] = True
    return m


def _soft(mask: np.ndarray, sigma: float) -> np.ndarray:
    """float32 (h, w) in [0, 1]: the mask with its edge blurred, still zero outside it."""
    return (ndimage.gaussian_filter(mask.astype(np.float32), sigma) * mask).astype(np.float32)


def _scratch(s: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """float32 (s, s) in [0, 1]: a 1-3 px line of length ~``side`` at a random angle."""
    from skimage.draw import line_aa

    t = rng.uniform(0, np.pi)
    dy, dx = (side - 1) * np.sin(t), (side - 1) * np.cos(t)
    y0 = rng.uniform(max(0.0, -dy), s - 1 - max(0.0, dy))
    x0 = rng.uniform(max(0.0, -dx), s - 1 - max(0.0, dx))
    rr, cc, val = line_aa(round(y0), round(x0), round(y0 + dy), round(x0 + dx))
    ok = (rr >= 0) & (rr < s) & (cc >= 0) & (cc < s)
    m = np.zeros((s, s), np.float32)
    m[rr[ok], cc[ok]] = val[ok]
    width = int(rng.integers(1, 4))
    return ndimage.grey_dilation(m, size=(width, width)) if width > 1 else m


def one_defect(
    img: np.ndarray, others: np.ndarray, kind: str, rng: np.random.Generator, lo: int, hi: int
) -> tuple[np.ndarray, np.ndarray]:
    """float32 (s, s, c) image -> (float32 (s, s, c) with one defect, float32 (s, s) weight in [0, 1]
    of every pixel it covers). ``others``: uint8 (m, s, s, c) normal images to cut patches from."""
    s, _, c = img.shape
    h, w = (int(v) for v in rng.integers(lo, hi + 1, size=2))
    if kind == "scratch":
        weight = _scratch(s, max(h, w), rng)
        value = rng.uniform(0, 60, size=c) if rng.random() < 0.5 else rng.uniform(195, 255, size=c)
        return img * (1 - weight[..., None]) + value * weight[..., None], weight
    y, x = int(rng.integers(0, s - h + 1)), int(rng.integers(0, s - w + 1))
    mask = shape_mask(h, w, rng)
    region = img[y : y + h, x : x + w]
    if kind == "cutpaste":
        src = others[int(rng.integers(len(others)))].astype(np.float32)
        sy, sx = int(rng.integers(0, s - h + 1)), int(rng.integers(0, s - w + 1))
        patch = src[sy : sy + h, sx : sx + w]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        if rng.random() < 0.5:
            patch = patch[::-1]
        mean = patch.mean()
        patch = (patch - mean) * rng.uniform(0.6, 1.4) + mean + rng.uniform(-40, 40)
        m = mask.astype(np.float32)
    elif kind == "stain":
        m = _soft(mask, max(1.0, min(h, w) / 5))
        shift = rng.uniform(15, 60, size=c) * rng.choice([-1.0, 1.0])
        if c > 1 and rng.random() < 0.5:  # a colour cast, not only a change of brightness
            shift = shift * rng.uniform(-1.0, 1.0, size=c)
        patch = region + shift
    elif kind == "hole":
        m = mask.astype(np.float32)
        patch = np.broadcast_to(rng.uniform(0, 255, size=c), region.shape)
    elif kind == "blur":
        m = _soft(mask, 1.0)
        patch = ndimage.gaussian_filter(img, (rng.uniform(1.5, 4.0),) * 2 + (0,), mode="reflect")[y : y + h, x : x + w]
    elif kind == "noise":
        m = mask.astype(np.float32)
        patch = region + rng.normal(0, rng.uniform(20, 60), size=region.shape)
    else:
        raise ValueError(f"Expected a defect kind among {list(KINDS)}. Received: {kind!r}.")
    out = img.copy()
    out[y : y + h, x : x + w] = region * (1 - m[..., None]) + patch * m[..., None]
    weight = np.zeros((s, s), np.float32)
    weight[y : y + h, x : x + w] = m
    return out, weight


def make_defects(
    images: np.ndarray,
    rng: np.random.Generator,
    *,
    min_frac: float = 0.1,
    max_frac: float = 0.4,
    kinds: Sequence[str] = KINDS,
) -> np.ndarray:
    """uint8 (n, s, s, c) normal images -> uint8 (n, s, s, c) images with one defect each.

    The defect's box side is drawn between ``min_frac`` and ``max_frac`` of the
    image side (a scratch's length too); ``kinds`` are drawn with equal chance.
    """
    return make_defects_with_masks(images, rng, min_frac=min_frac, max_frac=max_frac, kinds=kinds)[0]


def make_defects_with_masks(
    images: np.ndarray,
    rng: np.random.Generator,
    *,
    min_frac: float = 0.1,
    max_frac: float = 0.4,
    kinds: Sequence[str] = KINDS,
) -> tuple[np.ndarray, np.ndarray]:
    """As ``make_defects``, and where each defect is: -> (uint8 (n, s, s, c) images,
    float32 (n, s, s) masks in [0, 1], the weight with which each pixel took the defect:
    1 inside, soft at a stain's or a blur's edge, 0 elsewhere).
    """
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown or not kinds:
        raise ValueError(f"Expected defect kinds among {list(KINDS)}. Received: {list(kinds)}.")
    if not 0 < min_frac <= max_frac <= 1:
        raise ValueError(f"Expected 0 < min_frac <= max_frac <= 1. Received: {min_frac}, {max_frac}.")
    n, s, _, _ = images.shape
    lo = max(2, int(s * min_frac))
    hi = max(lo, int(s * max_frac))
    out = images.copy()
    masks = np.zeros((n, s, s), np.float32)
    for i in range(n):
        img = images[i].astype(np.float32)
        for _ in range(_TRIES):  # drawn again while it changes (almost) nothing
            kind = kinds[int(rng.integers(len(kinds)))]
            new, weight = one_defect(img, images, kind, rng, lo, hi)
            new = np.clip(np.round(new), 0, 255)
            covered = weight > 0.25
            if covered.any() and np.abs(new - img)[covered].mean() >= MIN_CHANGE:
                break
        out[i] = new.astype(np.uint8)
        masks[i] = weight
    return out, masks
