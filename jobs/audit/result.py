"""``AuditResult``: what the audit found, as the tables and the page both read it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from jobs.audit.duplicates import DuplicateGroup
from jobs.audit.issues import LabelIssues


@dataclass(frozen=True)
class AuditResult:
    """The audit of n readable images over k classes, in block order.

    ids: n image ids; names: n given labels (text); classes: the k labels, sorted;
    labels: int64 (n,), each given label's index into ``classes``; fold_of: int64 (n,),
    the fold that held each image out; probs: float32 (n, k), out-of-fold probabilities;
    found: cleanlab's findings; groups: duplicate groups, conflicting first.
    """

    ids: Sequence[str]
    names: Sequence[str]
    classes: Sequence[str]
    labels: np.ndarray
    fold_of: np.ndarray
    probs: np.ndarray
    found: LabelIssues
    groups: Sequence[DuplicateGroup]

    def __post_init__(self) -> None:
        n = len(self.ids)
        assert len(self.names) == len(self.labels) == len(self.fold_of) == len(self.probs) == n
        assert self.probs.shape[1] == len(self.classes)
