"""The nightly scan: drift figures (pure), and three real nights on a real S3 API (moto server)
and on local disk, scored by a local 2-CPU Ray with a real bundle trained on real digits."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.dataset as pds
import pytest
from scipy.stats import ks_2samp

from detectors import AutoencoderDetector, OcsvmDetector
from detectors.base import calibration_stats
from jobs.bundle import ModelBundle
from jobs.cli import main
from jobs.demo_data import Sample, samples, write_folder, write_tar_shards
from jobs.drift import DriftMeter
from jobs.ledger import committed_shards, part_uri, read_results
from jobs.scan import ScanConfig, history_page_uri, ledger_uri, night_uri, plan_night, scan, summary_line
from jobs.score import ScoreConfig, score_shards
from jobs.sources import group_shards, list_items
from jobs.storage import exists, filesystem, join, read_json, remove, write_parquet

SIZE = 16

# -- drift (pure) --------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0.0, 0.05, 0.5, 2.0])
def test_streamed_ks_equals_scipys_two_sample_ks(shift: float) -> None:
    rng = np.random.default_rng(0)
    cal = calibration_stats(rng.normal(size=400))
    night = rng.normal(loc=shift, size=5000)
    meter = DriftMeter("s", "high", cal)
    for chunk in np.array_split(night, 7):  # streamed in batches
        meter.feed(chunk)
    ref = ks_2samp(night, np.asarray(cal["sample"]), method="asymp")
    d, p = meter.ks() or (None, None)
    assert d == pytest.approx(ref.statistic, abs=1e-12)
    assert p == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-300)
    out = meter.result()
    assert out["drifted"] == (shift >= 0.5)  # KS >= 0.1: a shift of about a quarter sd or more
    assert out["share"] == pytest.approx(np.mean(night > cal["quantiles"]["0.999"]))
    assert out["shift"] == pytest.approx((night.mean() - cal["mean"]) / cal["std"])


def test_drift_reads_the_anomalous_side_of_low_scores() -> None:
    rng = np.random.default_rng(1)
    cal = calibration_stats(rng.normal(size=1000))
    meter = DriftMeter("loglik", "low", cal)
    meter.feed(np.concatenate([rng.normal(size=900), rng.normal(loc=-10, size=100), [np.nan, np.inf]]))
    out = meter.result()
    assert out["n"] == 1000
    assert out["threshold"] == cal["quantiles"]["0.001"]
    assert out["beyond"] >= 100 and out["ratio"] > 50  # ~10% beyond where 0.1% is expected
    assert out["shift"] > 0.5  # towards the anomalous side, i.e. lower scores


def test_drift_without_a_calibration_sample_says_so() -> None:
    cal = {k: v for k, v in calibration_stats(np.arange(50.0)).items() if k != "sample"}
    meter = DriftMeter("s", "high", cal)
    meter.feed(np.arange(10.0))
    out = meter.result()
    assert out["ks"] is None and not out["drifted"] and "no calibration sample" in out["note"]


# -- three nights ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_by_class(digits16: tuple[np.ndarray, np.ndarray]) -> dict[int, np.ndarray]:
    images, labels = digits16
    return {d: images[labels == d] for d in range(10)}


@pytest.fixture(scope="module")
def scan_bundle(tmp_path_factory: Any, digits_by_class: dict[int, np.ndarray]) -> str:
    """A real bundle (autoencoder + HOG/OCSVM) trained at 16 px on real zeros and ones.

    20 epochs: after 4 the autoencoder still drew every input as the mean digit, noise
    reconstructed as well as a digit, and only the per-score calibrated rule, which reads
    "beyond the least of 18 held-out scores" as 1 in 1,000, flagged the noise."""
    normal = np.concatenate([digits_by_class[0][:90], digits_by_class[1][:90]])
    detectors = {
        "autoencoder": AutoencoderDetector(input_size=SIZE, epochs=20, filters=(8, 16), latent_dim=8).fit(normal),
        "ocsvm": OcsvmDetector(input_size=SIZE).fit(normal),
    }
    uri = str(tmp_path_factory.mktemp("scan-bundle") / "model")
    ModelBundle(detectors=detectors, input_size=SIZE, channels=1).save(uri)
    return uri


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _normal(digits_by_class: dict[int, np.ndarray], start: int, n: int, prefix: str) -> list[Sample]:
    imgs = np.concatenate([digits_by_class[0][90 + start : 90 + start + n], digits_by_class[1][90 + start :][:n]])
    return samples(imgs, ["normal"] * len(imgs), prefix)


def _noise(n: int, prefix: str, seed: int) -> list[Sample]:
    rng = np.random.default_rng(seed)
    return samples(rng.integers(0, 256, size=(n, SIZE, SIZE), dtype=np.uint8), ["anomaly"] * n, prefix)


def _tar(root: str, name: str, items: list[Sample], so: dict[str, Any] | None) -> None:
    write_tar_shards(join(root, name), items, len(items), so)


def _objects(root: str, so: dict[str, Any] | None) -> dict[str, tuple[Any, ...]]:
    """Every object under root with what changes when it is rewritten."""
    fs, path = filesystem(root, so)
    fs.invalidate_cache()
    return {
        p: (i.get("size"), i.get("ETag") or i.get("etag"), i.get("mtime") or i.get("LastModified"))
        for p, i in fs.find(path, detail=True).items()
    }


def _config(
    src: str, models: str, out: str, so: dict[str, Any] | None, date: str, rules: tuple[str, ...] = ()
) -> ScanConfig:
    return ScanConfig(
        ScoreConfig(source=src, models=models, out=out, batch_size=64, storage_options=dict(so or {})),
        date=date,
        rules=rules,
    )


@pytest.mark.heavy
@pytest.mark.cluster
@pytest.mark.s3
def test_three_nights_on_s3(
    s3: dict[str, Any], scan_bundle: str, digits_by_class: dict[int, np.ndarray], local_ray: None
) -> None:
    root, so = s3["root"], s3["storage_options"]
    src, out = f"{root}/archive", f"{root}/scans"
    a, b = _normal(digits_by_class, 0, 8, "a"), _normal(digits_by_class, 8, 8, "b")
    _tar(src, "a", a, so)
    _tar(src, "b", b, so)

    n1 = scan(_config(src, scan_bundle, out, so, "2026-11-01"))
    assert n1["status"] == "scanned" and n1["images"] == len(a) + len(b) == 32 and n1["items"]["new"] == 2
    assert n1["errors"] == 0 and n1["scored"] == 32

    # night 2: a new shard of noise, b replaced in place (same name, other images), a unchanged
    c, b2 = _noise(12, "c", 0), _normal(digits_by_class, 16, 5, "b2")
    _tar(src, "c", c, so)
    _tar(src, "b", b2, so)
    # the bundle keeps 18 held-out scores per detector: too few for anomaly_score to call any image
    # a 1-in-1,000 event (detectors.fusion; the noise reaches ~2.5), so tonight also flags per score
    n2 = scan(_config(src, scan_bundle, out, so, "2026-11-02", rules=("recon_error=calibrated:0.999",)))
    assert n2["items"] == {"total": 2, "new": 1, "changed": 1}
    assert n2["images"] == len(c) + len(b2) and n2["rows_superseded"] == len(b)

    # night 3: nothing changed but one new shard
    d = _normal(digits_by_class, 21, 6, "d")
    _tar(src, "d", d, so)
    n3 = scan(_config(src, scan_bundle, out, so, "2026-11-03"))
    assert n3["items"]["total"] == 1 and n3["images"] == len(d)

    # every night's rows are what it scored; the whole table holds each image once, b's new rows only
    night_ids = {date: set(read_results(night_uri(out, date), so).column("image_id").to_pylist()) for date in
                 ("2026-11-01", "2026-11-02", "2026-11-03")}  # fmt: skip
    fs, path = filesystem(out, so)
    table = pds.dataset(path, filesystem=fs, format="parquet", partitioning="hive").to_table()
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(a) + len(b2) + len(c) + len(d)
    members = {i.rsplit("#", 1)[1].split(".")[0] for i in ids}
    assert members == {s.key for s in a + b2 + c + d}
    assert not any(m.startswith("b0") for m in members)  # the replaced version's rows are gone
    by_night = {
        str(k): v for k, v in zip(*np.unique(table.column("scan_date").to_numpy(), return_counts=True), strict=True)
    }
    assert by_night == {"2026-11-01": len(a), "2026-11-02": len(b2) + len(c), "2026-11-03": len(d)}
    assert len(night_ids["2026-11-02"]) == len(b2) + len(c)
    assert not night_ids["2026-11-01"] & night_ids["2026-11-02"]  # no unchanged shard scored twice

    # the history: three nights, counts right, drift figures present; the noise night drifted
    history = read_json(join(out, "_scan", "history.json"), so)
    assert [h["date"] for h in history] == ["2026-11-01", "2026-11-02", "2026-11-03"]
    assert [h["images"] for h in history] == [32, len(b2) + len(c), len(d)]
    assert history[1]["items"]["changed"] == 1 and history[1]["rows_superseded"] == 16
    assert set(history[0]["drift"]) >= {"anomaly_score", "recon_error", "ocsvm_score"}
    for h in history:
        for name, fig in h["drift"].items():
            assert fig["n"] == h["scored"]
            # anomaly_score: only its tail is known by construction, so no KS against a fixed null
            assert (fig["ks"] is None) if name == "anomaly_score" else (0.0 <= fig["ks"] <= 1.0)
    fused = history[1]["drift"]["anomaly_score"]
    assert fused["threshold"] == 3.0 and "drift is read from each score" in fused["note"]
    noise = {i for i in night_ids["2026-11-02"] if i.rsplit("#", 1)[1].startswith("c")}
    night2 = read_results(night_uri(out, "2026-11-02"), so).to_pylist()
    fused_noise = [r["anomaly_score"] for r in night2 if r["image_id"] in noise]
    fused_digits = [r["anomaly_score"] for r in table.to_pylist() if r["image_id"] not in noise]
    assert len(fused_noise) == len(c) and min(fused_noise) > max(fused_digits)  # the noise leads anomaly_score
    # 12 of night 2's 22 images are noise: the score that sees them moves far from its calibration
    per_score = {k: v for k, v in history[1]["drift"].items() if v["ks"] is not None}
    score, noisy = max(per_score.items(), key=lambda kv: kv[1]["ks"])
    calm = history[0]["drift"][score]
    assert noisy["beyond"] >= len(c) and noisy["ratio"] > 100 and noisy["drifted"]
    assert noisy["ks"] > calm["ks"] and noisy["ks_p"] < calm["ks_p"] and noisy["shift"] > calm["shift"]
    assert history[1]["flagged"]["overall"] >= len(c)
    page = history_page_uri(out)
    assert exists(page, so) and exists(join(night_uri(out, "2026-11-02"), "_report", "report.html"), so)

    # a night with nothing new is a night in the history, with nothing scored
    n4 = scan(_config(src, scan_bundle, out, so, "2026-11-04"))
    assert n4["status"] == "scanned" and n4["items"]["total"] == 0 and n4["images"] == 0
    assert not exists(night_uri(out, "2026-11-04"), so)

    # the same night again: nothing scored, nothing written
    before = _objects(out, so)
    again = scan(_config(src, scan_bundle, out, so, "2026-11-03"))
    assert again["status"] == "already complete" and "nothing new" in summary_line(again)
    assert _objects(out, so) == before


@pytest.mark.heavy
@pytest.mark.cluster
def test_folder_nights_and_an_interrupted_night(
    tmp_path: Any, scan_bundle: str, digits_by_class: dict[int, np.ndarray], local_ray: None
) -> None:
    """Image files: a file landing in a folder scores that file only; a file replaced in place
    drops its earlier row; a night stopped midway is finished by the next call, exactly once."""
    src, out = str(tmp_path / "archive"), str(tmp_path / "scans")
    first = _normal(digits_by_class, 0, 5, "f")
    write_folder(src, first)
    n1 = scan(_config(src, scan_bundle, out, None, "2026-11-01"))
    assert n1["images"] == 10

    # night 2 is planned and one of its two shards is committed, then the job "dies"
    write_folder(src, _normal(digits_by_class, 5, 3, "g"))  # 6 new files under normal/
    write_folder(src, _noise(4, "h", 1))  # 4 new files under anomaly/
    write_folder(src, [Sample(first[0].key, _noise(1, "x", 2)[0].data, "normal")])  # replaced in place
    cfg2 = _config(src, scan_bundle, out, None, "2026-11-02")
    items = plan_night(cfg2, "2026-11-02")
    assert items.num_rows == 11 and items.column("replaces").to_pylist().count("2026-11-01") == 1
    write_parquet(join(out, "_scan", "plans", "2026-11-02.parquet"), items)
    planned = set(items.column("uri").to_pylist())
    shards = group_shards([i for i in list_items(src) if i.uri in planned])
    assert len(shards) == 2
    night2 = night_uri(out, "2026-11-02")
    score_shards(ScoreConfig(source=src, models=scan_bundle, out=night2, run_id="scan-2026-11-02", batch_size=64),
                 shards)  # fmt: skip
    remove(part_uri(night2, shards[1].shard_id))  # the state of a job killed before its second commit
    assert not exists(ledger_uri(out, "2026-11-02")) and len(committed_shards(night2)) == 1

    # night 3 (by the command line, as cron runs it) finishes night 2 first, then scores nothing new
    write_folder(src, _normal(digits_by_class, 8, 1, "k"))
    rc = main(["scan", "--source", src, "--models", scan_bundle, "--out", out, "--date", "2026-11-03"])
    assert rc == 0
    n2 = read_json(join(out, "_scan", "history", "2026-11-02.json"))
    assert n2["images"] == 11 and n2["rows_superseded"] == 1
    n3 = read_json(join(out, "_scan", "history", "2026-11-03.json"))
    assert n3["images"] == 2  # the two files that landed after night 2 was planned
    table = pds.dataset(out, format="parquet", partitioning="hive").to_table()
    ids = table.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 10 + 10 + 2
    replaced = [r for r in table.to_pylist() if r["image_id"].endswith(f"/{first[0].key}.png")]
    assert [str(r["scan_date"]) for r in replaced] == ["2026-11-02"]


def test_scan_flags_are_checked_before_anything_runs(tmp_path: Any, capsys: Any) -> None:
    for argv, needle in [
        (["--date", "2026-02-30"], "--date must be a calendar date"),
        (["--rule", "nope=quantile"], "is not a score column"),
        (["--workers", "0"], "--workers must be >= 1"),
    ]:
        rc = main(["scan", "--source", str(tmp_path), "--models", str(tmp_path), "--out", str(tmp_path), *argv])
        err = capsys.readouterr().err
        assert rc != 0 and needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
