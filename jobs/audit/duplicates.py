"""Duplicate images: identical bytes, and near-duplicates in the fold models' embedding space.

Pairs are joined into groups (union-find): an exact pair by its content hash,
a near pair when the cosine similarity of the joint embeddings
(``jobs.audit.folds.joint_embeddings``) is at least ``NEAR_SIMILARITY``. A
group whose members carry different labels is a *conflict*: at least one of
its labels is wrong, whatever the classifier thinks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: cosine similarity (mean over the fold models) from which two images are near-duplicates.
#: The embeddings are a classifier's, so images of one class are already close; on the
#: digits (bench/audit.py) different images of one class reach about 0.99 at most while a
#: re-encoded or slightly shifted copy stays above 0.995. Exact copies are 1.0.
NEAR_SIMILARITY = 0.995
#: neighbours looked at per image: a group larger than this is still joined through its members
NEIGHBOURS = 8


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
    threshold: float = NEAR_SIMILARITY,
    neighbours: int = NEIGHBOURS,
) -> list[DuplicateGroup]:
    """Groups of duplicates, conflicting groups first, then by size.

    digests: n content hashes of the images' bytes (``TrainingSet.digests``);
    embeddings: float32 (n, d) unit rows, or None (exact only);
    labels: n given labels.
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
        from sklearn.neighbors import NearestNeighbors

        nn = NearestNeighbors(n_neighbors=min(neighbours + 1, n), metric="cosine").fit(embeddings)
        dist, idx = nn.kneighbors(embeddings)
        sim = 1.0 - dist
        for i in range(n):
            for s, j in zip(sim[i], idx[i], strict=True):
                if j != i and s >= threshold:
                    parent[root(int(j))] = root(i)
                    best[i] = max(best[i], min(float(s), 1.0))
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
