"""The audit's nearest-neighbour search at archive scale (a measurement, not a test).

    PYTHONPATH=. python bench/neighbours.py [--images 40000] [--dim 320]

Unit vectors of ``--dim`` dimensions (the audit's joint embeddings: 5 fold models x 64)
drawn around 50 centres, so that neighbours mean something. Each row's 9 nearest by
cosine, in CPU seconds of this process: scikit-learn's brute-force ``NearestNeighbors``
(what the audit used before), faiss's exact ``IndexFlatIP`` and its HNSW graph
(``jobs.audit.duplicates.nearest`` below and above ``EXACT_MAX``), and the share of the
exact neighbours the graph finds. The figures quoted at ``EXACT_MAX`` come from here.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from sklearn.neighbors import NearestNeighbors

from jobs.audit.duplicates import nearest

K = 9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=40_000)
    ap.add_argument("--dim", type=int, default=320)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(50, args.dim)).astype(np.float32)
    x = (centres[rng.integers(0, 50, args.images)] + 0.5 * rng.normal(size=(args.images, args.dim))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    t = time.process_time()
    NearestNeighbors(n_neighbors=K, metric="cosine").fit(x).kneighbors(x)
    print(f"scikit-learn brute-force cosine: {time.process_time() - t:.1f} CPU-s", flush=True)
    t = time.process_time()
    _, exact = nearest(x, K, exact_max=len(x))
    print(f"faiss IndexFlatIP (exact): {time.process_time() - t:.1f} CPU-s", flush=True)
    t = time.process_time()
    _, graph = nearest(x, K, exact_max=0)
    print(f"faiss IndexHNSWFlat: {time.process_time() - t:.1f} CPU-s", flush=True)
    found = np.mean([len(set(a) & set(b)) / K for a, b in zip(graph, exact, strict=True)])
    print(f"HNSW finds {found:.1%} of the exact neighbours ({args.images} x {args.dim})")


if __name__ == "__main__":
    main()
