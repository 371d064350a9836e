"""The nightly history page: built from real drift figures, escapes what came from the data,
and renders in headless Chromium."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from detectors.base import calibration_stats
from jobs.drift import DriftMeter
from jobs.history import read_entries, write_history
from jobs.storage import join, read_bytes, read_json, write_json

NIGHTS = ["2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04"]


def _write_nights(root: str) -> None:
    """Four nights; the third has drifted (its scores moved 3 sd towards the anomalous side)."""
    rng = np.random.default_rng(0)
    cal = {
        "recon_error": calibration_stats(rng.normal(size=300)),
        "gmm_loglik": calibration_stats(rng.normal(size=300)),
    }
    write_json(join(root, "_scan", "scan.json"), {"source": "s3://b/<script>alert(1)</script>", "model_version": "v1"})
    for i, date in enumerate(NIGHTS):
        n = 200 + 50 * i
        drift = {}
        for score, direction in (("recon_error", "high"), ("gmm_loglik", "low")):
            meter = DriftMeter(score, direction, cal[score])  # type: ignore[arg-type]
            shift = 3.0 if i == 2 else 0.0
            meter.feed(rng.normal(loc=shift if direction == "high" else -shift, size=n))
            drift[score] = meter.result()
        entry = {
            "date": date,
            "items": {"total": 3, "new": 2, "changed": 1},
            "images": n + 2,
            "scored": n,
            "errors": 2,
            "flagged": {"overall": 5 + 40 * (i == 2), "per_score": {"recon_error=calibrated:0.999": 3, "gmm": 2}},
            "drift": drift,
            "report": "x",
        }
        write_json(join(root, "_scan", "history", f"{date}.json"), entry)


def test_history_gathers_every_night_oldest_first(tmp_path: Path) -> None:
    root = str(tmp_path)
    _write_nights(root)
    entries = write_history(root)
    assert [e["date"] for e in entries] == NIGHTS == [e["date"] for e in read_json(join(root, "_scan", "history.json"))]
    assert [e["date"] for e in read_entries(root)] == NIGHTS
    drifted = [e["date"] for e in entries if e["drift"]["recon_error"]["drifted"]]
    assert drifted == ["2026-11-03"]
    page = read_bytes(join(root, "_scan", "history.html")).decode()
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # data is text, never code
    assert page.count('src="data:image/png;base64,') == 4  # the four time series, embedded
    assert 'href="../scan_date=2026-11-03/_report/report.html"' in page
    assert "Last night: 2026-11-04" in page


def test_history_page_renders_in_headless_chromium(tmp_path: Path, screenshot: Any) -> None:
    root = str(tmp_path / "root")
    _write_nights(root)
    write_history(root)
    shot = screenshot(f"file://{root}/_scan/history.html", height=1400)
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert rgb.std() > 10, "blank screenshot"
    coloured = ((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum()
    assert coloured > 3000, coloured  # the charts' bars and lines (text and tables are black on white)
