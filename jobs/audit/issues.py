"""Label issues by confident learning: cleanlab on out-of-fold probabilities.

cleanlab is the maintained implementation of confident learning (Northcutt et
al., 2021); this module only calls it and shapes what it returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LabelIssues:
    """cleanlab's findings for n images over k classes.

    is_issue: bool (n,); quality: float64 (n,) in [0, 1], low = likely mislabelled
    (self-confidence: the out-of-fold probability of the given label);
    suggested: int64 (n,), the most probable class; ranked: int64 (m,), the
    positions of the issues, worst first; noise_matrix: float64 (k, k),
    P(given label = i | true label = j) (columns sum to 1); confident_joint: int64 (k, k).
    """

    is_issue: np.ndarray
    quality: np.ndarray
    suggested: np.ndarray
    ranked: np.ndarray
    noise_matrix: np.ndarray
    confident_joint: np.ndarray


def find_issues(labels: np.ndarray, probs: np.ndarray) -> LabelIssues:
    """labels int (n,) in [0, k); probs float (n, k) out-of-fold probabilities (rows sum to 1)."""
    from cleanlab.count import estimate_py_and_noise_matrices_from_probabilities
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    probs = np.asarray(probs, np.float64)
    probs = probs / probs.sum(axis=1, keepdims=True)  # float32 softmax rows drift from 1 by ~1e-7
    labels = np.asarray(labels, np.int64)
    # cleanlab's defaults: prune by the estimated noise rate, rank by self-confidence
    ranked = np.asarray(find_label_issues(labels, probs, return_indices_ranked_by="self_confidence"), np.int64)
    is_issue = np.zeros(len(labels), bool)
    is_issue[ranked] = True
    quality = np.asarray(get_label_quality_scores(labels, probs, method="self_confidence"), np.float64)
    _, noise_matrix, _, confident_joint = estimate_py_and_noise_matrices_from_probabilities(labels, probs)
    return LabelIssues(
        is_issue=is_issue,
        quality=quality,
        suggested=probs.argmax(axis=1).astype(np.int64),
        ranked=ranked,
        noise_matrix=np.asarray(noise_matrix, np.float64),
        confident_joint=np.asarray(confident_joint, np.int64),
    )


def issues_per_class(found: LabelIssues, labels: np.ndarray, classes: Sequence[str]) -> dict[str, int]:
    """Given label -> number of issues carrying it."""
    counts = np.bincount(labels[found.is_issue], minlength=len(classes))
    return {c: int(counts[i]) for i, c in enumerate(classes)}
