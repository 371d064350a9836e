"""The audit's decoded images, one block per shard in Ray's object store; the driver holds none.

A decode task per shard reads and decodes its images at the model input size and
returns two objects: the shard's facts (ids, labels, content hashes, unreadable
inputs; small, fetched by the driver) and its pixels (uint8 (m, s, s, c), left in
the object store, which Ray spills to disk when it fills). Fold tasks read every
block (they train on them in memory); the driver reads only the rows it checks or
shows (``ImageBlocks.take``: duplicate candidates, the page's suspects and groups),
one block at a time.

Pure core: ``decode_shard`` (no Ray). Ray layer: ``decode_blocks``.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from detectors.preprocessing import resize_uint8
from jobs.images import DRAFT_MARGIN, MAX_BYTES, MAX_PIXELS, decode_image
from jobs.sources import Shard, SourceError, read_shard
from jobs.storage import StorageOptions


@dataclass(frozen=True)
class ShardFacts:
    """What the driver keeps of one shard: per readable image its id, label and sha256 of
    its bytes (in block order); the unreadable inputs with their reason; channels of the
    block (3 when one of its images has colour, else 1)."""

    ids: list[str]
    labels: list[str | None]
    digests: list[str]
    skipped: list[dict[str, str | None]]
    channels: int


def decode_shard(
    shard: Shard,
    image_size: int,
    storage_options: StorageOptions | None = None,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
) -> tuple[ShardFacts, np.ndarray]:
    """Read and decode one shard: (facts, pixels uint8 (m, image_size, image_size, c)).

    The same decoding as ``jobs.train.load_training_set`` (the size the model needs,
    gray or RGB as stored, the same per-image limits), so the fold models see what
    ``imgscan train`` would.
    """
    raw: list[np.ndarray] = []
    ids: list[str] = []
    labels: list[str | None] = []
    digests: list[str] = []
    skipped: list[dict[str, str | None]] = []
    for rec in read_shard(shard, storage_options, max_bytes=max_bytes):
        dec = (
            decode_image(rec.data, max_pixels=max_pixels, max_bytes=max_bytes, min_size=DRAFT_MARGIN * image_size)
            if rec.error is None
            else None
        )
        if dec is None or dec.pixels is None:
            skipped.append({"image_id": rec.image_id, "reason": rec.error or (dec.error if dec else "")})
            continue
        raw.append(dec.pixels)
        ids.append(rec.image_id)
        labels.append(rec.label)
        digests.append(hashlib.sha256(rec.data or b"").hexdigest())
    channels = 3 if any(_has_colour(p) for p in raw) else 1
    pixels = np.zeros((len(raw), image_size, image_size, channels), np.uint8)
    for i, p in enumerate(raw):
        pixels[i] = resize_uint8(p, image_size, channels)
    return ShardFacts(ids, labels, digests, skipped, channels), pixels


def _has_colour(p: np.ndarray) -> bool:
    return p.shape[2] == 3 and not (np.array_equal(p[..., 0], p[..., 1]) and np.array_equal(p[..., 1], p[..., 2]))


def to_channels(pixels: np.ndarray, channels: int) -> np.ndarray:
    """A gray block uint8 (m, s, s, 1) as RGB when the set has colour: uint8 (m, s, s, channels)."""
    return np.repeat(pixels, channels, axis=3) if pixels.shape[3] != channels else pixels


def assemble(blocks: Sequence[np.ndarray], channels: int) -> np.ndarray:
    """Every block in order: uint8 (n, s, s, channels), what a fold task trains on."""
    return np.concatenate([to_channels(b, channels) for b in blocks])


@dataclass(frozen=True)
class ImageBlocks:
    """The decoded set: the driver's bookkeeping plus references to the pixel blocks.

    refs: one Ray ObjectRef per shard with readable images, uint8 (m_b, s, s, c_b);
    starts: int64 (B + 1,), position of each block's first image (and n at the end);
    ids, labels, digests: per image in block order; skipped: the unreadable inputs;
    channels: 3 when any image has colour (gray blocks are widened on read), else 1.
    """

    refs: tuple[Any, ...]
    starts: np.ndarray
    ids: list[str]
    labels: list[str | None]
    digests: list[str]
    skipped: list[dict[str, str | None]]
    channels: int

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """Pixels of some images: uint8 (m, s, s, channels), in the order asked.

        Fetches only the blocks that hold them, one at a time, so the driver holds at
        most one block besides the rows it asked for.
        """
        import ray

        pos = np.asarray(positions, np.int64)
        block = np.searchsorted(self.starts, pos, side="right") - 1
        out: np.ndarray | None = None
        for b in np.unique(block):
            rows = np.flatnonzero(block == b)
            pixels = ray.get(self.refs[b])
            if out is None:
                out = np.zeros((len(pos), *pixels.shape[1:3], self.channels), np.uint8)
            out[rows] = to_channels(pixels[pos[rows] - self.starts[b]], self.channels)
            del pixels
        if out is None:  # nothing asked
            out = np.zeros((0, 1, 1, self.channels), np.uint8)
        return out


def decode_blocks(
    shards: Sequence[Shard],
    image_size: int,
    source: str,
    storage_options: StorageOptions | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
) -> ImageBlocks:
    """Decode every shard as a Ray task (needs a connected Ray); blocks stay in the object store.

    A failing read (a storage error, not bad image data) fails its task, which Ray retries.
    """
    import ray

    task = ray.remote(num_returns=2, num_cpus=1)(decode_shard)
    pairs = [task.remote(s, image_size, storage_options, max_pixels, max_bytes) for s in shards]
    fact_refs = {p[0]: i for i, p in enumerate(pairs)}
    facts: dict[int, ShardFacts] = {}
    t0 = time.monotonic()
    done_images = done_bad = 0
    pending = list(fact_refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        f: ShardFacts = ray.get(ready[0])
        facts[fact_refs[ready[0]]] = f
        done_images += len(f.ids) + len(f.skipped)
        done_bad += len(f.skipped)
        if progress:
            progress(f"read {done_images} images ({done_bad} unreadable), {time.monotonic() - t0:.1f}s")
    ordered = [facts[i] for i in range(len(shards))]
    if not any(f.ids for f in ordered):
        raise SourceError(f"Source {source} has no readable image ({done_bad} unreadable).")
    keep = [i for i, f in enumerate(ordered) if f.ids]  # a block of no image holds nothing to read
    sizes = [len(ordered[i].ids) for i in keep]
    return ImageBlocks(
        refs=tuple(pairs[i][1] for i in keep),
        starts=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
        ids=[x for f in ordered for x in f.ids],
        labels=[x for f in ordered for x in f.labels],
        digests=[x for f in ordered for x in f.digests],
        skipped=[x for f in ordered for x in f.skipped],
        channels=max(f.channels for f in ordered),
    )
