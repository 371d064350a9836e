"""The README's first command: the whole pipeline on the embedded default."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from jobs.demo import format_summary, run_demo

pytestmark = [pytest.mark.heavy, pytest.mark.cluster]


def test_demo_runs_the_whole_pipeline(tmp_path: Path) -> None:
    summary: dict[str, Any] = run_demo(str(tmp_path), epochs=1, num_cpus=2)
    demo = summary["demo"]
    assert summary["rows"] == demo["inputs"] == demo["rows"]  # one row per input, corrupt files included
    assert summary["errors"] == 3
    assert summary["labels"]["anomalies"] == 40
    for score in ("recon_error", "gmm_loglik", "ocsvm_score"):
        assert 0.0 <= summary["scores"][score]["roc_auc"] <= 1.0
    report = Path(summary["report"])
    assert report.read_text().lower().startswith("<!doctype html>")
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["rows"] == demo["inputs"]
    text = format_summary(summary)
    assert "ROC AUC" in text and str(report) in text
