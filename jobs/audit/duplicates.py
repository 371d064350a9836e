"""Duplicate images: identical bytes, and near-duplicates in the fold models' embedding space.

Pairs are joined into groups (union-find): an exact pair by its content hash,
a near pair when the cosine similarity of the joint embeddings
(``jobs.audit.folds.joint_embeddings``) is at least ``NEAR_SIMILARITY`` and the
model inputs agree to ``NEAR_PIXEL_DIFF`` grey levels on average. A group whose
members carry different labels is a *conflict*: at least one of its labels is
wrong, whatever the classifier thinks.

Why the pixel check: the embeddings are a classifier's, trained to put every image
of a class close together, so two different images of one class can be as close as
a copy and its re-encoding; the nearest-neighbour search finds the candidates fast,
the model inputs (already in memory, s x s pixels) confirm them. A copy that was
re-encoded, re-compressed or slightly re-coloured passes; a crop or a shift of more
than a pixel or two does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

#: cosine similarity (mean over the fold models) from which two images are near-duplicate
#: candidates; a copy with a few grey levels of noise scores above 0.999, exact copies 1.0
NEAR_SIMILARITY = 0.99
#: mean absolute difference of the model inputs (grey levels, 0-255) up to which a candidate
#: pair is a near-duplicate. load_digits at 32 px: a copy with +-3 levels of noise differs by
#: 1.5; each digit's nearest other digit by 3.8 at the least (a near twin in the data), by 7.6
#: at the 1st percentile, and two random digits of one class by 13 or more
NEAR_PIXEL_DIFF = 5.0
#: neighbours looked at per image: a group larger than this is still joined through its members
NEIGHBOURS = 8
#: up to this many images the neighbours are exact (faiss ``IndexFlatIP``: 40,000 images of 320
#: dimensions in 11 CPU-s, against 45 for scikit-learn's brute-force cosine); beyond it a
#: graph index (``IndexHNSWFlat``: 10 CPU-s there, 99.7% of the exact neighbours on clustered
#: random data), because the exact search grows with the square of the images (hours at 1M).
#: ``PYTHONPATH=. python bench/neighbours.py``, 2026-12-03, idle cores
EXACT_MAX = 100_000
#: HNSW graph degree and search breadths (faiss's usual values; larger = more exact, slower)
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 64, 64
#: candidate pairs whose pixels are fetched at once (bounds the driver's memory: 2 images a pair)
PAIR_CHUNK = 4096


@dataclass(frozen=True)
class DuplicateGroup:
    """members: positions (sorted); similarity: float per member, its best similarity to
    another member (1.0 for identical bytes); kind: "exact" when all bytes are identical, else "near"."""

    members: tuple[int, ...]
    similarity: tuple[float, ...]
    kind: str
    conflicting: bool


def find_duplicates(
    digests: Sequence[str],
    embeddings: np.ndarray | None,
    labels: Sequence[str],
    *,
    take: Callable[[np.ndarray], np.ndarray] | None = None,
    threshold: float = NEAR_SIMILARITY,
    max_pixel_diff: float = NEAR_PIXEL_DIFF,
    neighbours: int = NEIGHBOURS,
) -> list[DuplicateGroup]:
    """Groups of duplicates, conflicting groups first, then by size.

    digests: n content hashes of the images' bytes (``TrainingSet.digests``);
    embeddings: float32 (n, d) unit rows, or None (exact only);
    labels: n given labels; take: positions int64 (m,) -> their model inputs uint8 (m, s, s, c)
    (``ImageBlocks.take``; None: no pixel check). Only the candidate pairs' pixels are asked
    for, ``PAIR_CHUNK`` pairs at a time.
    """
    n = len(digests)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    best = np.zeros(n, np.float64)
    first: dict[str, int] = {}
    for i, d in enumerate(digests):
        if d in first:
            parent[root(i)] = root(first[d])
            best[i] = best[first[d]] = 1.0
        else:
            first[d] = i
    if embeddings is not None and n > 1:
        sim, idx = nearest(embeddings, min(neighbours + 1, n))
        rows, cols = np.nonzero((sim >= threshold) & (idx >= 0) & (idx != np.arange(n)[:, None]))
        pairs = [(int(i), int(idx[i, c]), float(sim[i, c])) for i, c in zip(rows, cols, strict=True)]
        for start in range(0, len(pairs), PAIR_CHUNK):
            chunk = pairs[start : start + PAIR_CHUNK]
            diffs = _pixel_diffs(take, chunk) if take is not None else np.zeros(len(chunk))
            for (i, j, s), d in zip(chunk, diffs, strict=True):
                if d <= max_pixel_diff:
                    parent[root(j)] = root(i)
                    best[i] = max(best[i], min(s, 1.0))
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(root(i), []).append(i)
    out = []
    for members in groups.values():
        if len(members) < 2:
            continue
        members.sort()
        out.append(
            DuplicateGroup(
                members=tuple(members),
                similarity=tuple(float(best[i]) for i in members),
                kind="exact" if len({digests[i] for i in members}) == 1 else "near",
                conflicting=len({labels[i] for i in members}) > 1,
            )
        )
    out.sort(key=lambda g: (not g.conflicting, -len(g.members), g.members[0]))
    return out


def nearest(embeddings: np.ndarray, k: int, *, exact_max: int = EXACT_MAX) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest rows by cosine (itself included): (similarity float32 (n, k),
    positions int64 (n, k), -1 where fewer were found).

    embeddings: float (n, d) unit rows, so the inner product is the cosine. faiss, the
    maintained library for it: exact up to ``exact_max`` rows, an HNSW graph beyond.
    """
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    d = x.shape[1]
    index: faiss.Index
    if len(x) <= exact_max:
        index = faiss.IndexFlatIP(d)
    else:
        graph = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        graph.hnsw.efSearch = max(HNSW_EF_SEARCH, k)
        index = graph
    index.add(x)
    sim, idx = index.search(x, k)
    return sim, idx.astype(np.int64)


def _pixel_diffs(take: Callable[[np.ndarray], np.ndarray], pairs: Sequence[tuple[int, int, float]]) -> np.ndarray:
    """Mean absolute difference of each pair's model inputs, in grey levels: float64 (len(pairs),)."""
    wanted = np.unique([p for i, j, _ in pairs for p in (i, j)])
    pixels = take(wanted).astype(np.int16)
    row = {int(p): r for r, p in enumerate(wanted)}
    return np.array([np.abs(pixels[row[i]] - pixels[row[j]]).mean() for i, j, _ in pairs], np.float64)
