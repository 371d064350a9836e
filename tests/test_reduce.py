"""The reducer on generated result parts (jobs.schema.to_table): thresholds, flags, outputs, refusals."""

from __future__ import annotations

import datetime as dt
import io
import itertools
import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from detectors.base import calibration_stats
from jobs.cli import main
from jobs.reduce import ReduceConfig, reduce
from jobs.schema import to_table
from jobs.storage import join, read_bytes, read_json, write_bytes, write_json

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def make_rows(
    n: int,
    *,
    seed: int = 0,
    n_errors: int = 0,
    anomaly_every: int = 50,
    model_version: str = "v1",
    labels: Sequence[str] = ("0", "1"),
) -> list[dict[str, Any]]:
    """n result rows: recon_error (high) and gmm_loglik (low) scores, known
    anomalies every ``anomaly_every`` rows, error rows carrying extreme scores
    (so a threshold that used them would be visibly wrong), a few null scores."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        anomaly = anomaly_every > 0 and i % anomaly_every == 0
        err = i < n_errors
        label = "anomaly" if anomaly else labels[i % len(labels)]
        pred = label if rng.random() > 0.05 else labels[(i + 1) % len(labels)]
        rows.append(
            {
                "image_id": f"file:///archive/{label}/img{i:06d}.png",
                "shard": f"file:///archive/{label}",
                "shard_id": f"shard{i % 7}",
                "member": f"img{i:06d}.png",
                "label": label,
                "status": "error" if err else "ok",
                "error": "corrupt image: truncated" if err else None,
                # float32 in the schema: store values float32 can hold, so numpy sees what Parquet holds
                "recon_error": 1e9 if err else float(np.float32(rng.gamma(2.0, 0.01) + (0.05 if anomaly else 0.0))),
                "gmm_loglik": -1e9 if err else float(rng.normal(-10.0, 1.0) - (4.0 if anomaly else 0.0)),
                "cam_pred": pred,
                "cam_prob": float(rng.uniform(0.5, 1.0)),
                "cam_map": rng.random(16).astype(np.float32).tolist(),
                "model_version": model_version,
                "run_id": "run-1",
                "scored_at": NOW,
            }
        )
    if n > 20:  # a null score on an ok row: not a value, not an error
        rows[n_errors + 3]["gmm_loglik"] = None
    return rows


def write_run(
    root: str,
    parts: Sequence[Sequence[dict[str, Any]]],
    *,
    model_uri: str = "/nonexistent/model",
    storage_options: dict[str, Any] | None = None,
) -> str:
    for i, rows in enumerate(parts):
        buf = io.BytesIO()
        pq.write_table(to_table(list(rows)), buf)
        write_bytes(join(root, "parts", f"part-{i:05d}.parquet"), buf.getvalue(), storage_options)
    run = {"run_id": "run-1", "model_uri": model_uri, "model_version": "v1", "source": "file:///archive"}
    write_json(join(root, "_run.json"), run, storage_options)
    return root


def split(rows: Sequence[dict[str, Any]], n_parts: int) -> list[list[dict[str, Any]]]:
    cuts = np.linspace(0, len(rows), n_parts + 1).astype(int)
    return [list(rows[a:b]) for a, b in itertools.pairwise(cuts)]


def valid(rows: Sequence[dict[str, Any]], col: str) -> tuple[np.ndarray, list[str]]:
    keep = [r for r in rows if r["status"] == "ok" and r[col] is not None]
    return np.array([r[col] for r in keep], np.float64), [r["image_id"] for r in keep]


def flagged_ids(out: str, rule_prefix: str) -> set[str]:
    t = pq.read_table(join(out, "flagged.parquet")).to_pylist()
    return {r["image_id"] for r in t if any(x.startswith(rule_prefix) for x in r["rules"])}


@pytest.mark.parametrize("rule", ["quantile:0.99", "sigma:2", "iqr:1.5"])
def test_thresholds_equal_numpy_and_flags_are_exactly_the_rows_beyond(tmp_path: Any, rule: str) -> None:
    rows = make_rows(3000, n_errors=30)
    results = write_run(str(tmp_path / "results"), split(rows, 4))
    out = str(tmp_path / "out")
    summary = reduce(ReduceConfig(results, out, rules=(rule, "cam_mismatch=off"), report=False))
    th = read_json(join(out, "thresholds.json"))
    assert th["run_id"] == "run-1" and set(th["thresholds"]) == {"recon_error", "gmm_loglik", "cam_prob"}
    for col, direction in (("recon_error", "high"), ("gmm_loglik", "low")):
        v, ids = valid(rows, col)
        kind, _, p = rule.partition(":")
        k = float(p)
        if kind == "quantile":
            expected = np.quantile(v, k if direction == "high" else 1 - k)
        elif kind == "sigma":
            expected = v.mean() + (k if direction == "high" else -k) * v.std()
        else:
            q1, q3 = np.quantile(v, [0.25, 0.75])
            expected = q3 + k * (q3 - q1) if direction == "high" else q1 - k * (q3 - q1)
        t = th["thresholds"][col]
        assert abs(t["value"] - expected) / abs(expected) < 1e-6
        assert t["direction"] == direction and t["n"] == len(v) and t["run_id"] == "run-1"
        beyond = v > t["value"] if direction == "high" else v < t["value"]
        expected_ids = {i for i, b in zip(ids, beyond, strict=True) if b}
        assert flagged_ids(out, f"{col}=") == expected_ids
        assert summary["flagged"]["per_score"][col] == len(expected_ids)
    assert summary["errors"] == 30 and summary["scored"] == 2970 and summary["rows"] == 3000
    flagged = pq.read_table(join(out, "flagged.parquet"))
    assert "error" not in set(flagged.column("status").to_pylist())
    assert flagged.column("rank").to_pylist() == list(range(1, flagged.num_rows + 1))


def test_ranks_follow_the_scores(tmp_path: Any) -> None:
    rows = make_rows(2000)
    results = write_run(str(tmp_path / "results"), [rows])
    out = str(tmp_path / "out")
    reduce(ReduceConfig(results, out, rules=("quantile:0.99", "cam_mismatch=off"), report=False))
    t = pq.read_table(join(out, "flagged.parquet")).to_pylist()
    by_recon = sorted((r for r in t if r["rank_recon_error"]), key=lambda r: r["rank_recon_error"])
    assert [r["rank_recon_error"] for r in by_recon] == list(range(1, len(by_recon) + 1))
    assert by_recon[0]["recon_error"] == max(v for v in valid(rows, "recon_error")[0])
    by_gmm = sorted((r for r in t if r["rank_gmm_loglik"]), key=lambda r: r["rank_gmm_loglik"])
    assert [r["gmm_loglik"] for r in by_gmm] == sorted(r["gmm_loglik"] for r in by_gmm)  # low first
    assert t[0]["rank"] == 1 and 1 in (t[0]["rank_recon_error"], t[0]["rank_gmm_loglik"])


def test_many_part_files_give_the_same_result_as_one(tmp_path: Any) -> None:
    rows = make_rows(3000, n_errors=12, seed=3)
    outs = []
    for n_parts in (1, 37):
        results = write_run(str(tmp_path / f"results{n_parts}"), split(rows, n_parts))
        out = str(tmp_path / f"out{n_parts}")
        reduce(ReduceConfig(results, out, rules=("quantile:0.99", "gmm_loglik=iqr", "recon_error=f1"), report=False))
        outs.append(out)
    one, many = (read_json(join(o, "thresholds.json"))["thresholds"] for o in outs)
    assert one == many
    cols = ["image_id", "rules", "rank", "rank_recon_error", "rank_gmm_loglik", "rank_cam_mismatch"]
    a, b = (pq.read_table(join(o, "flagged.parquet")).select(cols).to_pylist() for o in outs)
    assert a == b and len(a) > 0
    sa, sb = (read_json(join(o, "summary.json")) for o in outs)
    for key in ("rows", "scored", "errors", "flagged", "scores", "errors_per_shard"):
        assert sa[key] == sb[key]


def test_summary_metrics_against_known_anomalies(tmp_path: Any) -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    rows = make_rows(2000, n_errors=5, seed=4)
    results = write_run(str(tmp_path / "results"), split(rows, 3))
    out = str(tmp_path / "out")
    s = reduce(ReduceConfig(results, out, rules=("quantile:0.95",), report=False))
    assert s["labels"] == {"anomaly_label": "anomaly", "labelled": 1995, "anomalies": 39}  # row 0: anomaly and error
    for col, sign in (("recon_error", 1.0), ("gmm_loglik", -1.0)):
        keep = [r for r in rows if r["status"] == "ok" and r[col] is not None]
        y = np.array([r["label"] == "anomaly" for r in keep])
        v = np.array([r[col] for r in keep]) * sign
        m = s["scores"][col]
        assert m["roc_auc"] == pytest.approx(roc_auc_score(y, v), abs=1e-12)
        assert m["pr_auc"] == pytest.approx(average_precision_score(y, v), abs=1e-12)
        thr = read_json(join(out, "thresholds.json"))["thresholds"][col]["value"] * sign
        flags = v > thr
        c = m["confusion"]
        assert c == {
            "tp": int((flags & y).sum()),
            "fp": int((flags & ~y).sum()),
            "fn": int((~flags & y).sum()),
            "tn": int((~flags & ~y).sum()),
        }
    assert json.loads(read_bytes(join(out, "summary.json")))["flagged"] == s["flagged"]


def _fake_bundle(
    root: str,
    calibration: dict[str, Any],
    classes: list[str] | None,
    cam_params: dict[str, Any] | None = None,
    declared: dict[str, list[str]] | None = None,
) -> str:
    """bundle.json and meta.json files only: what the reducer reads of a bundle (no Keras).
    ``declared``: detector -> its anomaly columns (None: a bundle from before the declaration)."""
    detectors = {"autoencoder": ["meta.json"]} | ({"cam": ["meta.json"]} if classes else {})
    write_json(join(root, "bundle.json"), {"format": 1, "version": "v1", "detectors": detectors})
    metas: dict[str, dict[str, Any]] = {"autoencoder": {"detector": "autoencoder", "calibration": calibration}}
    if classes:
        metas["cam"] = {"detector": "cam", "classes": classes, "params": cam_params or {}, "calibration": {}}
    for name, meta in metas.items():
        if declared is not None:
            meta["anomaly_columns"] = declared[name]
        write_json(join(root, name, "meta.json"), meta)
    return root


def test_a_small_calibration_is_said_when_anomaly_score_is_calibrated(tmp_path: Any, capsys: Any) -> None:
    """18 held-out scores cannot put many images at 1 in 1,000: the reducer says so, in one line."""
    rng = np.random.default_rng(4)
    rows = make_rows(200, n_errors=0)
    for r in rows:
        r["anomaly_score"] = float(-np.log10(rng.uniform()))
    model = _fake_bundle(
        str(tmp_path / "model"),
        {"recon_error": calibration_stats(rng.gamma(2.0, 0.01, size=18))},
        ["0", "__defect__"],
        declared={"autoencoder": ["recon_error"], "cam": []},
    )
    results = write_run(str(tmp_path / "results"), split(rows, 2), model_uri=model)
    s = reduce(ReduceConfig(results, str(tmp_path / "out"), rules=("calibrated", "cam_mismatch=off")))
    notes = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    few = "as few as 18 normal scores to calibrate on"
    assert len(notes) == 1 and few in notes[0] and "imgscan calibrate" in notes[0]
    assert s["notes"] == [notes[0].split("] ", 1)[1]]  # summary.json carries it, and the page's lead
    assert few in read_bytes(join(str(tmp_path / "out"), "report.html")).decode()
    quantile = ReduceConfig(results, str(tmp_path / "out2"), rules=("quantile:0.99", "cam_mismatch=off"), report=False)
    assert reduce(quantile)["notes"] == [] and "note:" not in capsys.readouterr().err  # only for the calibrated rule


def test_default_flags_on_anomaly_score_and_shows_what_the_detectors_declare(tmp_path: Any, capsys: Any) -> None:
    """The fused score is thresholded by default; the declared scores are shown (histogram,
    ROC AUC) without flags; a score no detector declares (cam_prob of a CAM with an anomaly
    class, where a confident anomaly has a HIGH cam_prob) is neither, unless a rule names it."""
    rng = np.random.default_rng(3)
    rows = make_rows(2000, n_errors=5)
    for r in rows:  # by construction -log10 of a uniform p for normals; far out for the known anomalies
        r["anomaly_score"] = float(-np.log10(rng.uniform())) + (6.0 if r["label"] == "anomaly" else 0.0)
        r["cam_anomaly"] = float(rng.uniform())
    normal = rng.gamma(2.0, 0.01, size=1000)
    declared = {"autoencoder": ["recon_error"], "cam": ["cam_anomaly"]}
    model = _fake_bundle(
        str(tmp_path / "model"), {"recon_error": calibration_stats(normal)}, ["0", "__defect__"], declared=declared
    )
    results = write_run(str(tmp_path / "results"), split(rows, 3), model_uri=model)
    out = str(tmp_path / "out")
    s = reduce(ReduceConfig(results, out, rules=("calibrated", "cam_mismatch=off"), report=False))
    th = read_json(join(out, "thresholds.json"))
    assert list(th["thresholds"]) == ["anomaly_score"] and th["thresholds"]["anomaly_score"]["value"] == 3.0
    assert list(s["scores"]) == ["anomaly_score", "recon_error", "cam_anomaly"]  # declared only: no cam_prob
    assert s["scores"]["recon_error"]["rule"] is None and s["scores"]["recon_error"]["flagged"] is None
    assert s["scores"]["recon_error"]["roc_auc"] > 0.9 and s["scores"]["anomaly_score"]["roc_auc"] == 1.0
    expected = {r["image_id"] for r in rows if r["status"] == "ok" and r["anomaly_score"] > 3.0}
    assert flagged_ids(out, "anomaly_score") == expected and s["flagged"]["overall"] == len(expected)
    assert s["anomaly_columns"] == ["recon_error", "cam_anomaly"]

    assert "note:" not in capsys.readouterr().err  # 1,000 held-out scores: no word on a small calibration

    # each=RULE: every declared score flags on its own too; cam_prob only when named
    out2 = str(tmp_path / "out2")
    reduce(ReduceConfig(results, out2, rules=("calibrated", "each=quantile:0.99", "cam_mismatch=off"), report=False))
    assert set(read_json(join(out2, "thresholds.json"))["thresholds"]) == {
        "anomaly_score",
        "recon_error",
        "cam_anomaly",
    }
    out3 = str(tmp_path / "out3")
    reduce(ReduceConfig(results, out3, rules=("cam_prob=quantile:0.99", "anomaly_score=off"), report=False))
    assert set(read_json(join(out3, "thresholds.json"))["thresholds"]) == {"cam_prob"}


def test_calibrated_rule_and_label_audit_use_the_bundle(tmp_path: Any) -> None:
    rows = make_rows(1500, n_errors=4, seed=5, labels=("0", "1", "7"))  # "7" is no class of the model
    normal = np.random.default_rng(9).gamma(2.0, 0.01, size=4000)
    model = _fake_bundle(str(tmp_path / "model"), {"recon_error": calibration_stats(normal)}, ["0", "1", "anomaly"])
    results = write_run(str(tmp_path / "results"), split(rows, 2), model_uri=model)
    out = str(tmp_path / "out")
    s = reduce(ReduceConfig(results, out, rules=("recon_error=calibrated:0.99", "gmm_loglik=off"), report=False))
    th = read_json(join(out, "thresholds.json"))
    assert set(th["thresholds"]) == {"recon_error", "cam_prob"}  # cam_prob: the default rule
    assert th["thresholds"]["recon_error"]["value"] == pytest.approx(np.quantile(normal, 0.99), rel=1e-12)
    assert th["thresholds"]["recon_error"]["n"] == 4000
    assert th["label_audit"]["classes"] == ["0", "1", "anomaly"]
    expected = {
        r["image_id"]
        for r in rows
        if r["status"] == "ok" and r["label"] in ("0", "1", "anomaly") and r["cam_pred"] != r["label"]
    }
    assert flagged_ids(out, "cam_mismatch") == expected and expected
    assert s["flagged"]["per_score"]["cam_mismatch"] == len(expected)


def test_defaults_need_no_flags(tmp_path: Any, capsys: Any) -> None:
    rows = make_rows(2500, n_errors=3)
    results = write_run(str(tmp_path / "results"), split(rows, 5))
    # hidden, temporary and marker files beside the parts are not parts
    write_bytes(join(results, "parts", ".tmp-abc-part-00009.parquet"), b"half a file")
    write_bytes(join(results, "parts", "_SUCCESS"), b"")
    out = str(tmp_path / "out")
    assert main(["reduce", "--results", results, "--out", out, "--no-report"]) == 0, capsys.readouterr().err
    th = read_json(join(out, "thresholds.json"))
    assert {k: v["rule"] for k, v in th["thresholds"].items()} == {
        "recon_error": "quantile:0.999",
        "gmm_loglik": "quantile:0.999",
        "cam_prob": "quantile:0.999",
    }
    assert "ocsvm_score" in th["skipped"] and "cam_anomaly" in th["skipped"]
    assert "label_audit" in th  # cam_pred present: the audit runs by default
    assert "2500 rows: 2497 scored, 3 errors" in capsys.readouterr().out


def _errors(stderr: str) -> list[str]:
    """The error lines (progress lines go to stderr too); never a traceback."""
    assert "Traceback" not in stderr
    return [line for line in stderr.splitlines() if line.startswith("imgscan: error:")]


def _two_models(root: str) -> str:
    return write_run(root, [make_rows(1200), make_rows(1200, model_version="v2")])


@pytest.mark.parametrize(
    ("setup", "argv", "message"),
    [
        (lambda r: write_run(r, [make_rows(500)]), [], "needs at least 1000 scores (1/(1-Q)); this run has 500"),
        (
            lambda r: write_run(r, [[{**x, "recon_error": 0.5} for x in make_rows(1200)]]),
            ["--rule", "recon_error=quantile:0.99"],
            "all 1200 scores are equal",
        ),
        (
            lambda r: write_run(r, [make_rows(1200, anomaly_every=0)]),
            ["--rule", "gmm_loglik=f1"],
            "needs known anomalies",
        ),
        (lambda r: write_run(r, [make_rows(1200)]), ["--rule", "calibrated"], "needs the model bundle's calibration"),
        (
            lambda r: write_run(r, [make_rows(1200)]),
            ["--rule", "ocsvm_score=quantile:0.99"],
            "ocsvm_score: score column missing from the results",
        ),
        (_two_models, ["--rule", "quantile:0.99"], "mix 2 models"),
        (lambda r: write_json(join(r, "_run.json"), {"run_id": "x"}), [], "No result parts"),
        (lambda r: None, [], "No run at"),
        (lambda r: write_run(r, [make_rows(10)]), ["--rule", "recon_error=median"], "Unknown threshold rule"),
    ],
)
def test_refusals_are_one_line(tmp_path: Any, capsys: Any, setup: Any, argv: list[str], message: str) -> None:
    results = str(tmp_path / "results")
    setup(results)
    rc = main(["reduce", "--results", results, "--out", str(tmp_path / "out"), "--no-report", *argv])
    err = _errors(capsys.readouterr().err)
    assert rc == 1, err
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "out" / "thresholds.json").exists()


def test_calibrated_refuses_a_bundle_without_calibration(tmp_path: Any, capsys: Any) -> None:
    model = _fake_bundle(str(tmp_path / "model"), {}, None)
    results = write_run(str(tmp_path / "results"), [make_rows(1200)], model_uri=model)
    rc = main(["reduce", "--results", results, "--out", str(tmp_path / "out"), "--rule", "recon_error=calibrated"])
    err = _errors(capsys.readouterr().err)
    assert rc == 1 and len(err) == 1 and "no calibration statistics for recon_error" in err[0], err


@pytest.mark.s3
def test_results_and_outputs_on_s3(s3: dict[str, Any]) -> None:
    root, so = s3["root"], s3["storage_options"]
    rows = make_rows(1200, n_errors=2)
    results = write_run(f"{root}/runs/r1", split(rows, 3), storage_options=so)
    out = f"{root}/reports/r1"
    rc = main(
        [
            "reduce",
            "--results",
            results,
            "--out",
            out,
            "--rule",
            "quantile:0.99",
            "--top-k",
            "3",
            "--storage-options",
            json.dumps(so),
        ]
    )
    assert rc == 0
    th = read_json(f"{out}/thresholds.json", so)
    v, _ = valid(rows, "recon_error")
    assert th["thresholds"]["recon_error"]["value"] == pytest.approx(np.quantile(v, 0.99), rel=1e-9)
    html = read_bytes(f"{out}/report.html", so).decode()
    assert html.count("image not available") == 3  # the ids point at files that do not exist: said per image
    assert read_json(f"{out}/summary.json", so)["errors"] == 2


def test_calibrated_for_every_score_skips_scores_the_model_lacks(tmp_path: Any) -> None:
    normal = np.random.default_rng(9).gamma(2.0, 0.01, size=4000)
    model = _fake_bundle(str(tmp_path / "model"), {"recon_error": calibration_stats(normal)}, None)
    results = write_run(str(tmp_path / "results"), [make_rows(800)], model_uri=model)
    out = str(tmp_path / "out")
    reduce(ReduceConfig(results, out, rules=("calibrated",), report=False))
    th = read_json(join(out, "thresholds.json"))
    assert set(th["thresholds"]) == {"recon_error"}
    assert "no calibration for this score" in th["skipped"]["gmm_loglik"]
