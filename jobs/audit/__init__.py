"""``imgscan audit``: the label-quality audit of a labelled image set.

Modules: ``job`` (flags -> config, the orchestrating function, the Ray set-up),
``folds`` (K-fold CAM training: pure core + Ray tasks), ``issues`` (cleanlab),
``duplicates`` (identical bytes and embedding neighbours), ``page`` (audit.html).
"""

from __future__ import annotations

from jobs.audit.job import AuditConfig, audit, summary_line

__all__ = ["AuditConfig", "audit", "summary_line"]
