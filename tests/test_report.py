"""The report end to end: a real archive (digits in tar shards, known anomalies,
corrupt files), a real bundle trained at 16 px, rows scored by the bundle, the
reducer, and the report opened in headless Chromium."""

from __future__ import annotations

import base64
import datetime as dt
import io
import re
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from jobs.bundle import ModelBundle
from jobs.cli import main
from jobs.demo_data import ANOMALY_LABEL, corrupt_samples, make_anomalies, samples, write_folder, write_tar_shards
from jobs.images import decode_image
from jobs.reduce import ReduceConfig, reduce
from jobs.report import cam_overlay
from jobs.schema import to_table
from jobs.sources import list_shards, read_shard
from jobs.storage import join, read_json, write_bytes, write_json

pytestmark = pytest.mark.heavy


def score_archive(source: str, model: str, results: str) -> int:
    """What the scoring job writes (its layout), made here by calling bundle.score
    on the decoded images of each shard: one part per shard, one row per input."""
    bundle = ModelBundle.load(model)
    now = dt.datetime.now(dt.UTC)
    n = 0
    for shard in list_shards(source):
        rows, pixels, ok_rows = [], [], []
        for rec in read_shard(shard):
            dec = decode_image(rec.data) if rec.error is None else None
            row = {
                "image_id": rec.image_id,
                "shard": shard.uri,
                "shard_id": shard.shard_id,
                "member": rec.member,
                "label": rec.label,
                "status": "ok",
                "model_version": bundle.version,
                "run_id": "test-run",
                "scored_at": now,
            }
            if dec is None or dec.pixels is None:
                row.update(status="error", error=rec.error or (dec.error if dec else None))
            else:
                row.update(width=dec.width, height=dec.height)
                pixels.append(dec.pixels)
                ok_rows.append(row)
            rows.append(row)
        scores = bundle.score(pixels)
        for i, row in enumerate(ok_rows):
            for col, values in scores.items():
                v = values[i]
                row[col] = v.tolist() if isinstance(v, np.ndarray) else (v.item() if hasattr(v, "item") else v)
        buf = io.BytesIO()
        pq.write_table(to_table(rows), buf)
        write_bytes(join(results, "parts", f"{shard.shard_id}.parquet"), buf.getvalue())
        n += len(rows)
    write_json(
        join(results, "_run.json"),
        {"run_id": "test-run", "model_uri": model, "model_version": bundle.version, "source": source},
    )
    return n


@pytest.fixture(scope="module")
def reduced(tmp_path_factory: Any, digits16: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("report")
    imgs, labels = digits16
    keep = np.flatnonzero(labels < 2)
    train, scan = keep[:200], keep[200:320]
    write_folder(str(root / "train"), samples(imgs[train], [str(v) for v in labels[train]]))
    rng = np.random.default_rng(0)
    anomalies, _ = make_anomalies(imgs[scan[:12]], rng)
    items = (
        samples(imgs[scan], [str(v) for v in labels[scan]], "digit")
        + samples(anomalies, [ANOMALY_LABEL] * len(anomalies), "anomaly")
        + corrupt_samples(imgs[scan[0]], "0")
    )
    items = [items[i] for i in rng.permutation(len(items))]
    write_tar_shards(str(root / "scan"), items, 50)
    model = str(root / "model")
    argv = ["train", "--source", str(root / "train"), "--out", model, "--image-size", "16", "--epochs", "1"]
    assert main([*argv, "--detectors", "autoencoder", "cam"]) == 0
    results, out = str(root / "results"), str(root / "out")
    n = score_archive(str(root / "scan"), model, results)
    summary = reduce(ReduceConfig(results, out, rules=("quantile:0.9",), top_k=8))
    return {"out": out, "summary": summary, "n": n, "html": (root / "out" / "report.html").read_text()}


def test_every_input_is_counted_and_errors_are_per_shard(reduced: dict[str, Any]) -> None:
    s = reduced["summary"]
    assert s["rows"] == reduced["n"] == 135 and s["errors"] == 3 and s["scored"] == 132
    assert sum(v["errors"] for v in s["errors_per_shard"].values()) == 3
    # what the detectors declare: cam_anomaly means nothing without an anomaly class; cam_prob is low confidence
    assert list(s["scores"]) == ["anomaly_score", "recon_error", "recon_local", "cam_prob"]
    # the default flags on the fused score (and the label audit), not on each score
    assert list(s["flagged"]["per_score"]) == ["anomaly_score", "cam_mismatch"]
    assert s["labels"]["anomalies"] == 12
    assert 0.0 <= s["scores"]["recon_error"]["roc_auc"] <= 1.0


def test_report_is_one_self_contained_file(reduced: dict[str, Any]) -> None:
    html = reduced["html"]
    srcs = re.findall(r'<img alt="([^"]*)" src="([^"]*)"', html)
    assert srcs and all(src.startswith("data:image/png;base64,") for _, src in srcs)
    assert "http://" not in html and "https://" not in html and "<script" not in html
    alts = [a for a, _ in srcs]
    assert alts.count("histogram of recon_error") == 1 and alts.count("histogram of recon_local") == 1
    assert alts.count("histogram of anomaly_score") == 1
    # it leads with the fused score: its flags, before any table
    lead = html.index("<p class=lead>")
    assert lead < html.index("<table>") and "anomaly_score &ge; " in html[lead : lead + 300]
    # 8 gallery cards: original, reconstruction and CAM overlay of each
    assert alts.count("original") == alts.count("reconstruction") == alts.count("CAM") == 8
    for alt, src in srcs:
        img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert img.size[0] > 16 and img.size[1] > 16, alt
    cam = next(src for alt, src in srcs if alt == "CAM")
    rgb = np.asarray(Image.open(io.BytesIO(base64.b64decode(cam.split(",", 1)[1]))).convert("RGB")).astype(int)
    assert (rgb.max(axis=2) - rgb.min(axis=2)).max() > 40  # the jet colours over a gray digit
    assert "Errors per shard" in html and "not an image" in html
    for key in ("ROC AUC", "PR AUC", "quantile:0.9"):
        assert key in html


def test_cam_overlay_is_jet_at_35_percent() -> None:
    gray = np.full((16, 16, 1), 100, np.uint8)
    cam = np.zeros(16, np.float32)
    cam[0] = 1.0  # hottest at the top-left cell of a 4x4 map
    out, why = cam_overlay(gray, cam)
    assert out is not None and why == "" and out.shape == (128, 128, 3)
    top_left, bottom_right = out[0, 0].astype(int), out[-1, -1].astype(int)
    # jet(1) = dark red, jet(0) = dark blue; 35% colour over 65% of gray 100
    assert top_left[0] > top_left[2] and bottom_right[2] > bottom_right[0]
    assert abs(int(top_left[1]) - round(0.65 * 100)) <= 2
    assert cam_overlay(gray, np.zeros(15, np.float32))[0] is None


def test_report_renders_in_headless_chromium(reduced: dict[str, Any], screenshot: Any) -> None:
    shot = screenshot(f"file://{reduced['out']}/report.html", height=3600)
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert rgb.std() > 10, "blank screenshot"
    non_white = (rgb.min(axis=2) < 200).mean()
    coloured = ((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum()
    assert non_white > 0.02, non_white
    # the tables and text are black on white: colour comes only from the rendered images
    # (histogram bars and threshold lines, the CAM overlays)
    assert coloured > 5000, coloured
    assert read_json(join(reduced["out"], "summary.json"))["flagged"]["overall"] > 0
