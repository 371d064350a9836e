"""How well scores separate known anomalies: ROC AUC, PR AUC, F1, confusion matrix.

Pure (no files). Rows whose label equals the anomaly label are known anomalies,
rows with another label known normal, unlabelled rows unknown (left out).

Memory: the AUCs need the scores of labelled rows. Every known anomaly is
kept; known normal rows are kept up to ``max_normals``, beyond which a uniform
random sample of that size stands for them (bottom-k of a random key, which
merges batch by batch), weighted by how many each one represents, so the
AUCs stay unbiased. The confusion matrix at the threshold is counted exactly
over every labelled row (``Confusion``), never sampled.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MAX_NORMALS = 2_000_000


def label_codes(labels: pa.Array | Sequence[str | None], anomaly_label: str) -> np.ndarray:
    """labels: strings or None, (n,) -> int8 (n,): 1 known anomaly, 0 known normal, -1 unknown."""
    lab = labels if isinstance(labels, pa.Array) else pa.array(list(labels), pa.string())
    known = np.asarray(lab.is_valid().to_numpy(zero_copy_only=False), dtype=bool)
    anomaly = np.asarray(pc.fill_null(pc.equal(lab, anomaly_label), False).to_numpy(zero_copy_only=False), bool)
    return np.where(known, anomaly.astype(np.int8), np.int8(-1)).astype(np.int8)


@dataclass
class Confusion:
    """Counts of flagged/not flagged against known anomaly/normal."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def update(self, flagged: np.ndarray, codes: np.ndarray) -> None:
        """flagged: bool (n,); codes: int8 (n,) from ``label_codes`` (-1 rows ignored)."""
        anom, norm = codes == 1, codes == 0
        self.tp += int((flagged & anom).sum())
        self.fn += int((~flagged & anom).sum())
        self.fp += int((flagged & norm).sum())
        self.tn += int((~flagged & norm).sum())

    def to_json(self) -> dict[str, Any]:
        p = self.tp / (self.tp + self.fp) if self.tp + self.fp else 0.0
        r = self.tp / (self.tp + self.fn) if self.tp + self.fn else 0.0
        f1 = 2 * p * r / (p + r) if p + r else 0.0
        return {
            "confusion": {"tp": self.tp, "fp": self.fp, "fn": self.fn, "tn": self.tn},
            "precision": p,
            "recall": r,
            "f1": f1,
        }


class LabelledSample:
    """Scores of labelled rows of one column, for the AUCs (see the module docstring)."""

    def __init__(self, *, max_normals: int = MAX_NORMALS, seed: int = 0) -> None:
        self.max_normals = max_normals
        self._rng = np.random.default_rng(seed)
        self._anomalies: list[np.ndarray] = []
        self._normals: list[tuple[np.ndarray, np.ndarray]] = []  # (random keys, scores)
        self._n_normals_kept = 0
        self.n_anomalies = 0
        self.n_normals = 0

    def feed(self, values: np.ndarray, codes: np.ndarray) -> None:
        """values: finite float64 (k,); codes: int8 (k,)."""
        anom, norm = codes == 1, codes == 0
        if anom.any():
            self._anomalies.append(values[anom].astype(np.float64))
            self.n_anomalies += int(anom.sum())
        if norm.any():
            v = values[norm].astype(np.float64)
            self.n_normals += len(v)
            self._normals.append((self._rng.random(len(v)), v))
            self._n_normals_kept += len(v)
            if self._n_normals_kept > 2 * self.max_normals:
                self._shrink()

    def _shrink(self) -> None:
        keys = np.concatenate([k for k, _ in self._normals])
        vals = np.concatenate([v for _, v in self._normals])
        if len(keys) > self.max_normals:
            keep = np.argpartition(keys, self.max_normals)[: self.max_normals]
            keys, vals = keys[keep], vals[keep]
        self._normals = [(keys, vals)]
        self._n_normals_kept = len(keys)

    def metrics(self, direction: str) -> dict[str, Any] | None:
        """ROC AUC and PR AUC (average precision) of the score against known
        anomalies, or None without both anomalies and normals."""
        if not self.n_anomalies or not self.n_normals:
            return None
        from sklearn.metrics import average_precision_score, roc_auc_score

        if self._normals:
            self._shrink()
        pos = np.concatenate(self._anomalies)
        neg = self._normals[0][1]
        scores = np.concatenate([pos, neg])
        scores = scores if direction == "high" else -scores
        y = np.concatenate([np.ones(len(pos), bool), np.zeros(len(neg), bool)])
        weight = np.concatenate([np.ones(len(pos)), np.full(len(neg), self.n_normals / len(neg))])
        return {
            "roc_auc": float(roc_auc_score(y, scores, sample_weight=weight)),
            "pr_auc": float(average_precision_score(y, scores, sample_weight=weight)),
            "n_labelled": self.n_anomalies + self.n_normals,
            "n_anomalies": self.n_anomalies,
            "normals_sampled": len(neg) < self.n_normals,
        }
