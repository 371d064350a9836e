"""The scoring job: its pure core (decode -> rows, rows -> scores) and the Ray Data job on a local
2-CPU Ray, on real digits in every source format, from local disk and a real S3 API."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from detectors import AutoencoderDetector, CamDetector, MixtureDetector, OcsvmDetector, WhiteningDetector
from detectors.preprocessing import resize_uint8
from jobs.bundle import ModelBundle
from jobs.demo_data import (
    Sample,
    corrupt_samples,
    digits,
    samples,
    write_folder,
    write_parquet_shards,
    write_tar_shards,
)
from jobs.images import decode_image
from jobs.ledger import committed_shards, read_results
from jobs.schema import RESULT_SCHEMA
from jobs.score import ScoreActor, ScoreConfig, score
from jobs.scoring import SEQ, SHARD_N, decode_records, finish_part, pixels_of, score_table
from jobs.sources import Record, list_shards
from jobs.storage import filesystem, join, read_bytes, write_bytes

SIZE = 16
#: the score columns compared against a direct call of the bundle
SCORES = (
    "recon_error",
    "recon_local",
    "gmm_loglik",
    "gmm_local_loglik",
    "cam_prob",
    "ocsvm_score",
    "white_excess",
    "white_deficit",
)


@pytest.fixture(scope="module")
def bundle_uri(tmp_path_factory: Any, digits16: tuple[np.ndarray, np.ndarray]) -> str:
    """A real bundle of every detector, trained tiny at 16 px on real digits (once per module)."""
    images, labels = digits16
    normal = images[labels == 0][:120]
    some = np.isin(labels, [0, 1, 2])
    detectors = {
        "autoencoder": AutoencoderDetector(input_size=SIZE, epochs=3, filters=(8, 16), latent_dim=8).fit(normal),
        "mixture": MixtureDetector(
            input_size=SIZE, n_components=2, autoencoder_params={"epochs": 2, "filters": (8, 16)}
        ).fit(normal),
        "cam": CamDetector(input_size=SIZE, epochs=2, filters=(8, 16)).fit(
            images[some][:300], [str(v) for v in labels[some][:300]]
        ),
        "ocsvm": OcsvmDetector(input_size=SIZE).fit(normal),
        "whitening": WhiteningDetector(input_size=SIZE).fit(normal),
    }
    uri = str(tmp_path_factory.mktemp("bundle") / "model")
    ModelBundle(detectors=detectors, input_size=SIZE, channels=1).save(uri)
    return uri


@pytest.fixture(scope="module")
def bundle(bundle_uri: str) -> ModelBundle:
    return ModelBundle.load(bundle_uri)


def _odd_images(base: np.ndarray) -> list[Sample]:
    """Inputs of other sizes and modes than the model's: RGB 40x24, RGBA, 16-bit, palette."""
    big = np.asarray(Image.fromarray(base).resize((24, 40)))
    out = []
    for key, im in [
        ("odd-rgb", Image.fromarray(np.dstack([big, big // 2, 255 - big]), "RGB")),
        ("odd-rgba", Image.fromarray(np.dstack([big, big, big, np.full_like(big, 128)]), "RGBA")),
        ("odd-i16", Image.fromarray(big.astype(np.uint16) * 257)),
        ("odd-p", Image.fromarray(np.dstack([big, big, big]), "RGB").convert("P")),
    ]:
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        out.append(Sample(key, buf.getvalue(), "odd"))
    return out


@pytest.fixture(scope="module")
def archive() -> list[Sample]:
    """A few hundred real digits (labels 0..9), 4 images of other sizes/modes, 3 corrupt files."""
    imgs, labels = digits(SIZE)
    rng = np.random.default_rng(0)
    pick = rng.choice(len(imgs), 280, replace=False)
    items = samples(imgs[pick], [str(v) for v in labels[pick]]) + _odd_images(imgs[0]) + corrupt_samples(imgs[1], "0")
    return [items[i] for i in rng.permutation(len(items))]


def _expected_scores(bundle: ModelBundle, items: list[Sample]) -> dict[str, dict[str, Any]]:
    """key -> the bundle's own scores of the same decoded + resized pixels (one direct call)."""
    decoded = {s.key: decode_image(s.data) for s in items}
    ok = [k for k, d in decoded.items() if d.pixels is not None]
    pixels = np.stack([resize_uint8(decoded[k].pixels, SIZE, 1) for k in ok])  # type: ignore[arg-type]
    scores = bundle.score(pixels)
    return {k: {c: v[i] for c, v in scores.items()} for i, k in enumerate(ok)}


# -- the pure core ----------------------------------------------------------------------------------


def _records(items: list[Sample]) -> list[Record]:
    return [Record(f"mem://s#{s.key}", "s", s.key, s.data, s.label) for s in items]


def test_decode_records_streams_chunks_and_counts_the_shard(archive: list[Sample]) -> None:
    items = archive[:10]
    tables = list(decode_records(_records(items), "mem://s", SIZE, 1, chunk_rows=4))
    assert [t.num_rows for t in tables] == [4, 4, 2]
    assert [set(t.column(SHARD_N).to_pylist()) for t in tables] == [{-1}, {-1}, {10}]
    table = pa.concat_tables(tables)
    assert table.column(SEQ).to_pylist() == list(range(10))
    assert table.column("member").to_pylist() == [s.key for s in items]
    px = pixels_of(table, SIZE, 1)
    assert px.shape == (10, SIZE, SIZE, 1) and px.dtype == np.uint8
    for i, s in enumerate(items):
        d = decode_image(s.data)
        status = table.column("status")[i].as_py()
        if d.pixels is None:
            assert status == "error" and table.column("error")[i].as_py() == d.error
        else:
            assert status == "ok" and table.column("error")[i].as_py() is None
            np.testing.assert_array_equal(px[i], resize_uint8(d.pixels, SIZE, 1))
            assert (table.column("width")[i].as_py(), table.column("height")[i].as_py()) == (d.width, d.height)
    assert list(decode_records([], "mem://s", SIZE, 1)) == []  # an empty shard yields nothing


def test_score_table_equals_direct_scores_and_leaves_errors_null(bundle: ModelBundle, archive: list[Sample]) -> None:
    items = [s for s in archive if s.key.startswith(("corrupt", "odd"))] + archive[:20]
    table = pa.concat_tables(list(decode_records(_records(items), "mem://s", SIZE, 1)))
    out = score_table(bundle, table, run_id="r1")
    part = finish_part([out])
    assert part.schema == RESULT_SCHEMA and part.num_rows == len(items)
    _check_scores(part, bundle, items)
    # a bundle without some detectors leaves their columns null
    only = ModelBundle(detectors={"ocsvm": bundle.detectors["ocsvm"]}, input_size=SIZE, channels=1, version="x")
    part = finish_part([score_table(only, table, run_id="r1")])
    assert part.column("recon_error").null_count == part.num_rows
    assert part.column("cam_map").null_count == part.num_rows
    assert part.column("ocsvm_score").null_count == sum(s.key.startswith("corrupt") for s in items)


def test_score_actor_scores_a_table_in_slices_of_score_rows(bundle_uri: str, archive: list[Sample]) -> None:
    """A CPU actor calls the models on at most ``score_rows`` rows at a time (its memory follows
    the largest call): the rows, their order and their scores are those of one call."""
    items = [s for s in archive if s.key.startswith(("corrupt", "odd"))] + archive[:20]
    table = pa.concat_tables(list(decode_records(_records(items), "mem://s", SIZE, 1)))
    actor = ScoreActor(bundle_uri, {}, "r1", score_rows=4)
    out = actor(table)
    assert out.column(SEQ).to_pylist() == table.column(SEQ).to_pylist()
    part = finish_part([out])
    assert part.num_rows == len(items)
    _check_scores(part, actor.bundle, items)


def _check_scores(results: pa.Table, bundle: ModelBundle, items: list[Sample]) -> None:
    """Every ok row equals the detectors called directly; every error row has a reason and null scores."""
    expected = _expected_scores(bundle, items)
    rows = results.to_pylist()
    for row in rows:
        key = row["member"].split(".", 1)[0]
        assert row["model_version"] == bundle.version
        if key.startswith("corrupt"):
            assert row["status"] == "error" and row["error"], row
            assert row["recon_error"] is None and row["cam_map"] is None
            continue
        assert row["status"] == "ok" and row["error"] is None, row
        exp = expected[key]
        for col in SCORES:
            assert row[col] == pytest.approx(float(exp[col]), rel=1e-4, abs=1e-5), (key, col)
        assert row["cam_pred"] == exp["cam_pred"]
        np.testing.assert_allclose(row["cam_map"], exp["cam_map"], rtol=1e-4, atol=1e-5)
        assert row["width"] and row["height"]


#: scores of a camera-size JPEG through the DCT-scaled decode against the full decode: the mean
#: |difference| of each score stays under this fraction of the score's spread over the images
FAST_SCORE_TOL = 0.1


def test_jpeg_scores_of_the_fast_path_match_the_full_decode(bundle: ModelBundle) -> None:
    imgs, labels = digits(SIZE)
    rng = np.random.default_rng(0)
    items = []
    for i in range(24):  # 24 digits as 800x600 photos: upscaled, with noise, JPEG quality 90
        big = np.asarray(Image.fromarray(imgs[i]).resize((800, 600), Image.Resampling.BICUBIC)).astype(np.int16)
        noisy = np.clip(big + rng.integers(-10, 11, big.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(np.dstack([noisy] * 3), "RGB").save(buf, format="JPEG", quality=90)
        items.append(Sample(f"photo{i}", buf.getvalue(), str(labels[i])))
    table = pa.concat_tables(list(decode_records(_records(items), "mem://s", SIZE, 1)))
    assert table.column("width").to_pylist() == [800] * 24 and table.column("height").to_pylist() == [600] * 24
    fast = bundle.score(pixels_of(table, SIZE, 1))
    full_px = np.stack([resize_uint8(decode_image(s.data).pixels, SIZE, 1) for s in items])  # type: ignore[arg-type]
    full = bundle.score(full_px)
    for col in SCORES:
        a, b = np.asarray(full[col], np.float64), np.asarray(fast[col], np.float64)
        assert np.abs(a - b).mean() <= FAST_SCORE_TOL * a.std(), (col, np.abs(a - b).mean(), a.std())


# -- the Ray job ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One local Ray with 2 CPUs for the module (as on the CI machines)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


WRITERS = {
    "folder": lambda root, items, so: write_folder(root, items, so),
    "tar": lambda root, items, so: write_tar_shards(root, items, 40, so),
    "parquet": lambda root, items, so: write_parquet_shards(root, items, 60, so),
}


def _copy_tree(src: str, dst: str, so: dict[str, Any] | None) -> None:
    fs, root = filesystem(src)
    for path in fs.find(root):
        write_bytes(join(dst, path[len(root) :]), read_bytes(path), so)


@pytest.mark.heavy
@pytest.mark.cluster
@pytest.mark.parametrize("fmt", list(WRITERS))
@pytest.mark.parametrize("where", ["local", pytest.param("s3", marks=pytest.mark.s3)])
def test_job_scores_every_input_exactly_once(
    fmt: str,
    where: str,
    local_ray: None,
    bundle_uri: str,
    bundle: ModelBundle,
    archive: list[Sample],
    tmp_path: Any,
    request: Any,
) -> None:
    if where == "local":
        root, so, models = str(tmp_path), None, bundle_uri
    else:  # archive, bundle and results all on the S3 API; the actors load the bundle from there
        s3 = request.getfixturevalue("s3")
        root, so, models = s3["root"], s3["storage_options"], f"{s3['root']}/model"
        _copy_tree(bundle_uri, models, so)
    WRITERS[fmt](f"{root}/src", archive, so)
    cfg = ScoreConfig(
        source=f"{root}/src", models=models, out=f"{root}/out", batch_size=64, storage_options=dict(so or {})
    )
    summary = score(cfg)
    results = read_results(cfg.out, so)
    n_shards = len(list_shards(cfg.source, so))
    assert summary["images"] == results.num_rows == len(archive)  # row count == input count
    assert summary["shards"] == summary["shards_committed"] == n_shards == len(committed_shards(cfg.out, so))
    assert summary["errors"] == 3
    ids = results.column("image_id").to_pylist()
    assert len(set(ids)) == len(ids)
    assert set(results.column("run_id").to_pylist()) == {summary["run_id"]}
    labels = {row["member"].split(".", 1)[0]: row["label"] for row in results.select(["member", "label"]).to_pylist()}
    assert labels == {s.key: s.label for s in archive}
    _check_scores(results, bundle, archive)
    # a second call with the same run id finds every shard committed and scores nothing
    again = score(ScoreConfig(**{**cfg.__dict__, "run_id": summary["run_id"]}))
    assert again["shards_skipped"] == n_shards and again["images"] == 0
    assert read_results(cfg.out, so).num_rows == len(archive)


def _score_actor_pids() -> set[int]:
    import importlib

    import ray  # noqa: F401  (Ray ships psutil and puts it on sys.path)

    psutil = importlib.import_module("psutil")

    return {
        p.pid
        for p in psutil.Process().children(recursive=True)
        if "ScoreActor" in " ".join(p.cmdline() or []) or "ScoreActor" in p.name()
    }


@pytest.mark.heavy
@pytest.mark.cluster
def test_a_killed_actor_is_restarted_and_its_work_redone_once(local_ray: None, bundle_uri: str, tmp_path: Any) -> None:
    imgs, labels = digits(SIZE)
    items = samples(imgs[:600], [str(v) for v in labels[:600]])
    write_tar_shards(str(tmp_path / "src"), items, 20)
    cfg = ScoreConfig(source=str(tmp_path / "src"), models=bundle_uri, out=str(tmp_path / "out"), batch_size=4)
    result: dict[str, Any] = {}
    job = threading.Thread(target=lambda: result.update(score(cfg)))
    job.start()
    deadline = time.monotonic() + 300
    while not committed_shards(cfg.out) and time.monotonic() < deadline and job.is_alive():
        time.sleep(0.05)
    victims = _score_actor_pids()
    at_kill = len(committed_shards(cfg.out))
    assert victims and 0 < at_kill < 30, (victims, at_kill)
    import os
    import signal

    for pid in victims:  # processes this test started (its own local Ray's actor)
        os.kill(pid, signal.SIGKILL)
    job.join(timeout=600)
    assert not job.is_alive() and result, "the job did not finish after its actor was killed"
    results = read_results(cfg.out)
    ids = results.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == 600
    assert result["shards"] == 30 == len(committed_shards(cfg.out))
    assert (results.column("status").to_pylist()) == ["ok"] * 600


@pytest.mark.heavy
@pytest.mark.cluster
def test_decode_runs_in_tasks_apart_from_the_actors(
    local_ray: None, bundle_uri: str, archive: list[Sample], tmp_path: Any, capsys: Any
) -> None:
    """Ray Data fuses ops with equal remote args; fused, decoding would run inside the actors."""
    from jobs.score import build_dataset

    write_tar_shards(str(tmp_path / "src"), archive, 40)
    cfg = ScoreConfig(source=str(tmp_path / "src"), models=bundle_uri, out=str(tmp_path / "out"))
    build_dataset(cfg, "r", list_shards(cfg.source), SIZE, 1).explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "ActorPoolMapOperator[MapBatches(ScoreActor)]" in optimized
    assert "TaskPoolMapOperator[MapBatches(decode_shards)]" in optimized
