"""``imgscan audit``: the label-quality audit of a labelled image set.

Modules: ``job`` (flags -> config, the orchestrating function, the Ray set-up),
``blocks`` (decoded images as Ray objects, one block per shard: the driver holds no
pixels), ``folds`` (K-fold CAM training: pure core + Ray tasks), ``issues`` (cleanlab),
``duplicates`` (identical bytes and embedding neighbours), ``result`` (what the tables
and the page read), ``page`` (audit.html).
"""

from __future__ import annotations

from jobs.audit.job import AuditConfig, audit, summary_line

__all__ = ["AuditConfig", "audit", "summary_line"]
