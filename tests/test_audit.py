"""``imgscan audit`` end to end on real digits with known flipped labels, planted
duplicates and unreadable files: the issues, the fold bookkeeping, the outputs, the
page in headless Chromium, the refusals, and the same audit over a real S3 API."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from detectors.base import fingerprint
from jobs.audit.job import DUPLICATE_SCHEMA, ISSUE_SCHEMA, OOF_SCHEMA
from jobs.cli import main
from jobs.demo_data import Sample, corrupt_samples, digits, png_bytes, samples, write_folder, write_tar_shards
from jobs.sources import list_shards
from jobs.storage import exists, join, read_bytes, read_json
from jobs.train import load_training_set

pytestmark = pytest.mark.heavy

#: class folder names: one carries HTML metacharacters, to check that the page escapes data
CLASS_NAMES = {0: "zero", 1: "one", 2: "two", 3: "three<&>"}
PER_CLASS = 60
N_FLIPS = 10
N_PLANTED = 3
SIZE = 16
#: small and quick: 3 folds of a few hundred 16 px digits
FLAGS = ["--folds", "3", "--image-size", str(SIZE), "--epochs", "8"]


def build_items(seed: int = 0) -> dict[str, Any]:
    """240 digits of four classes; N_FLIPS labels flipped; N_PLANTED exact copies of clean
    images under another label; three unreadable files. Keys are the ground truth."""
    rng = np.random.default_rng(seed)
    x, y = digits(SIZE, classes=list(CLASS_NAMES))
    keep = np.concatenate([np.flatnonzero(y == c)[:PER_CLASS] for c in CLASS_NAMES])
    x, y = x[keep], y[keep]
    given = y.copy()
    flipped = rng.choice(len(y), N_FLIPS, replace=False)
    for i in flipped:
        given[i] = rng.choice([c for c in CLASS_NAMES if c != y[i]])
    items = samples(x, [CLASS_NAMES[int(v)] for v in given])
    clean = [i for i in rng.permutation(len(y)) if i not in set(flipped)][:N_PLANTED]
    planted = []
    for n, i in enumerate(clean):
        other = CLASS_NAMES[int((y[i] + 1) % len(CLASS_NAMES))]
        items.append(Sample(f"copy{n:03d}", png_bytes(x[i]), other))
        planted.append((items[i].key, f"copy{n:03d}"))
    items += corrupt_samples(x[0], "zero")
    return {
        "items": items,
        "flipped": {items[i].key for i in flipped},
        "planted": planted,
        "corrupt": {s.key for s in items if s.key.startswith("corrupt")},
    }


def key_of(image_id: str) -> str:
    """The sample key of an image id (``.../<label>/<key>.png``)."""
    return image_id.rsplit("/", 1)[-1].removesuffix(".png")


@pytest.fixture(scope="module")
def ray_local() -> Any:
    """One in-process Ray of 2 CPUs for the module (the audit joins it instead of starting its own)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def truth() -> dict[str, Any]:
    return build_items()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory: pytest.TempPathFactory, truth: dict[str, Any], ray_local: Any) -> dict[str, Any]:
    """The audit through the command line, on a folder on local disk."""
    root = tmp_path_factory.mktemp("audit")
    src, out = str(root / "src"), str(root / "out")
    write_folder(src, truth["items"])
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["audit", "--source", src, "--out", out, *FLAGS])
    assert code == 0, stderr.getvalue()[-3000:]
    return {"src": src, "out": out, "stdout": stdout.getvalue(), "stderr": stderr.getvalue()}


def read_table(uri: str, storage_options: dict[str, Any] | None = None) -> Any:
    return pq.read_table(io.BytesIO(read_bytes(uri, storage_options)))


def test_flipped_labels_rank_near_the_top(local_run: dict[str, Any], truth: dict[str, Any]) -> None:
    oof = read_table(join(local_run["out"], "out_of_fold.parquet")).to_pylist()
    worst = sorted(oof, key=lambda r: r["label_quality"])
    planted_copies = {c for _, c in truth["planted"]}
    # the 2 x N_FLIPS lowest label qualities, not counting the planted copies (wrong labels too)
    top = [key_of(r["image_id"]) for r in worst if key_of(r["image_id"]) not in planted_copies][: 2 * N_FLIPS]
    found = truth["flipped"] & set(top)
    assert len(found) >= 0.8 * N_FLIPS, (sorted(found), top)
    issues = read_table(join(local_run["out"], "label_issues.parquet")).to_pylist()
    flagged = {key_of(r["image_id"]) for r in issues}
    assert len(truth["flipped"] & flagged) >= 0.7 * N_FLIPS
    assert [r["rank"] for r in issues] == list(range(1, len(issues) + 1))
    assert all(a["label_quality"] <= b["label_quality"] for a, b in itertools.pairwise(issues))


def test_no_image_is_scored_by_a_model_that_trained_on_it(local_run: dict[str, Any]) -> None:
    summary = read_json(join(local_run["out"], "summary.json"))
    oof = read_table(join(local_run["out"], "out_of_fold.parquet")).to_pylist()
    # the very images and labels the audit trained on, read again the same way
    ts = load_training_set(list_shards(local_run["src"]), local_run["src"], SIZE, None)
    assert [r["image_id"] for r in oof] == ts.ids
    fold = np.array([r["fold"] for r in oof])
    labels = np.array([r["given_label"] for r in oof])
    assert sorted(set(fold.tolist())) == [0, 1, 2]
    images = np.stack(ts.images)
    for facts in summary["fold_models"]:
        f = facts["fold"]
        train = fold != f
        # the model that scored fold f was fitted on exactly the other folds: same pixels, same labels
        assert facts["train_fingerprint"] == fingerprint(images[train], labels[train].tolist())
        assert facts["n_train"] == int(train.sum()) and facts["n_held_out"] == int((~train).sum())
        for c in set(labels):  # stratified: every class in every fold
            assert ((fold == f) & (labels == c)).any()


def test_conflicting_duplicates_are_found(local_run: dict[str, Any], truth: dict[str, Any]) -> None:
    dups = read_table(join(local_run["out"], "duplicates.parquet")).to_pylist()
    groups: dict[int, set[str]] = {}
    for r in dups:
        groups.setdefault(r["group"], set()).add(key_of(r["image_id"]))
    conflicting = {r["group"] for r in dups if r["conflicting"]}
    for original, copy in truth["planted"]:
        g = next(g for g, keys in groups.items() if copy in keys)
        assert original in groups[g] and g in conflicting
        assert {r["kind"] for r in dups if r["group"] == g} == {"exact"}
    summary = read_json(join(local_run["out"], "summary.json"))
    assert summary["duplicates"]["conflicting_groups"] >= N_PLANTED


def test_outputs_have_the_documented_columns(local_run: dict[str, Any], truth: dict[str, Any]) -> None:
    out = local_run["out"]
    for name, schema in (("label_issues", ISSUE_SCHEMA), ("duplicates", DUPLICATE_SCHEMA), ("out_of_fold", OOF_SCHEMA)):
        assert read_table(join(out, f"{name}.parquet")).schema.names == schema.names
    assert {"image_id", "given_label", "suggested_label", "label_quality", "rank"} <= set(ISSUE_SCHEMA.names)
    assert {"group", "image_id", "label", "similarity"} <= set(DUPLICATE_SCHEMA.names)
    s = read_json(join(out, "summary.json"))
    for key in ("issues_per_class", "noise_matrix", "oof_accuracy", "duplicates", "unreadable"):
        assert key in s
    k = len(CLASS_NAMES)
    assert np.asarray(s["noise_matrix"]["values"]).shape == (k, k)
    assert set(s["issues_per_class"]) == set(CLASS_NAMES.values())
    assert {key_of(u["image_id"]) for u in s["unreadable"]} == truth["corrupt"]
    assert s["images"] == PER_CLASS * k + N_PLANTED
    assert 0.8 < s["oof_accuracy"] <= 1.0
    # stdout: one line; stderr: progress
    assert local_run["stdout"].count("\n") == 1 and local_run["stdout"].startswith("audited ")
    assert "[imgscan audit]" in local_run["stderr"]


def test_page_is_self_contained_and_escaped(local_run: dict[str, Any]) -> None:
    html = read_bytes(join(local_run["out"], "audit.html")).decode()
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert "three<&>" not in html and "three&lt;&amp;&gt;" in html
    assert html.count("data:image/png;base64,") >= 3 * 5  # image + two CAMs per suspect
    assert "CAM for given" in html and "CAM for suggested" in html and "conflicting labels" in html


def test_page_renders_in_headless_chromium(local_run: dict[str, Any], screenshot: Any) -> None:
    shot = screenshot(f"file://{local_run['out']}/audit.html", height=2400)
    rgb = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert rgb.std() > 10, "blank screenshot"
    # text and tables are black on white: colour comes only from the CAM overlays
    assert ((rgb.max(axis=2) - rgb.min(axis=2)) > 60).sum() > 5000


def test_blocks_hold_what_the_training_reader_decodes(truth: dict[str, Any], tmp_path: Any, ray_local: Any) -> None:
    """Decode tasks (one block per shard, several shards) give the training reader's ids, labels,
    hashes and pixels; ``take`` reads any rows, in the order asked, across blocks."""
    from jobs.audit.blocks import decode_blocks

    src = str(tmp_path / "tar")
    write_tar_shards(src, truth["items"][:100], 30)  # 4 shards, one of them short
    shards = list_shards(src)
    blocks = decode_blocks(shards, SIZE, src)
    ts = load_training_set(shards, src, SIZE, None)
    assert len(blocks.refs) == 4 and blocks.starts.tolist() == [0, 30, 60, 90, 100]
    assert (blocks.ids, blocks.labels, blocks.digests) == (ts.ids, ts.labels, ts.digests)
    order = np.array([99, 0, 31, 30, 29, 64])
    assert np.array_equal(blocks.take(order), np.stack(ts.images)[order])


#: the S3 comparison: a small set, so the second audit costs little (the module's Ray and its
#: warm workers are reused); every out-of-fold probability must match, not only the issues
SMALL = ["--folds", "2", "--image-size", str(SIZE), "--epochs", "3"]


@pytest.mark.s3
def test_audit_over_s3_gives_the_same_issues(
    truth: dict[str, Any], tmp_path: Any, s3: dict[str, Any], ray_local: Any
) -> None:
    pick = [s for s in truth["items"] if s.label == "zero"][:30] + [s for s in truth["items"] if s.label == "one"][:30]
    corrupt = [s for s in truth["items"] if s.key in truth["corrupt"]]
    items = [*pick, Sample("copy_s3", pick[0].data, "one"), *corrupt]
    assert {s.key for s in pick} & truth["flipped"]  # the small set carries wrong labels too
    so = s3["storage_options"]
    runs = {}
    for where, root, opts in (("local", str(tmp_path), {}), ("s3", s3["root"], so)):
        src, out = join(root, "src"), join(root, "audit")
        write_folder(src, items, opts)
        code, _, stderr = run_cli("audit", "--source", src, "--out", out, *SMALL, "--storage-options", json.dumps(opts))
        assert code == 0, stderr[-3000:]
        runs[where] = {
            name: read_table(join(out, f"{name}.parquet"), opts).to_pylist()
            for name in ("label_issues", "out_of_fold", "duplicates")
        } | {"summary": read_json(join(out, "summary.json"), opts), "page": exists(join(out, "audit.html"), opts)}
    local, remote = runs["local"], runs["s3"]
    assert all(r["image_id"].startswith("s3://") for r in remote["out_of_fold"])
    for name in ("label_issues", "out_of_fold", "duplicates"):
        strip = [{**r, "image_id": key_of(r["image_id"])} for r in local[name]]
        assert [{**r, "image_id": key_of(r["image_id"])} for r in remote[name]] == strip, name
    assert local["label_issues"] and local["duplicates"]  # something to compare
    assert remote["summary"]["n_unreadable"] == len(truth["corrupt"]) and remote["page"]


# -- refusals: one line, before anything trains ---------------------------------------------------


def run_cli(*argv: str) -> tuple[int, str, str]:
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(list(argv))
    return code, stdout.getvalue(), stderr.getvalue()


def refused(tmp_path: Any, items: list[Sample], *flags: str, tar: bool = False) -> str:
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    (write_tar_shards(src, items, 50) if tar else write_folder(src, items))
    code, stdout, stderr = run_cli("audit", "--source", src, "--out", out, *flags)
    assert code != 0 and stdout == ""
    *progress, last = stderr.splitlines()  # a tar source's labels are known once read: progress lines first
    assert last.startswith("imgscan: error: ") and all(p.startswith("[imgscan audit] read") for p in progress), stderr
    assert not os.path.exists(out)  # nothing trained, nothing written
    return last


def few(label_of: dict[int, str | None], n: dict[int, int]) -> list[Sample]:
    x, y = digits(SIZE, classes=list(n))
    out: list[Sample] = []
    for c, k in n.items():
        idx = np.flatnonzero(y == c)[:k]
        out += samples(x[idx], [label_of[c]] * k, prefix=f"c{c}_")
    return out


def test_refuses_one_class(tmp_path: Any) -> None:
    msg = refused(tmp_path, few({0: "zero"}, {0: 12}))
    assert "one class" in msg and "'zero'" in msg and "12 images" in msg


def test_refuses_a_class_smaller_than_the_folds(tmp_path: Any) -> None:
    msg = refused(tmp_path, few({0: "zero", 1: "one"}, {0: 12, 1: 3}))
    assert "'one' has 3 image(s)" in msg and "--folds 5" in msg


def test_refuses_unlabelled_images(tmp_path: Any) -> None:
    items = few({0: "zero", 1: None}, {0: 12, 1: 4})
    assert "4 of 16 images" in refused(tmp_path, items) and "no label" in refused(tmp_path / "t", items, tar=True)


def test_refuses_unknown_flag_and_bad_uri(tmp_path: Any) -> None:
    code, _, err = run_cli("audit", "--source", str(tmp_path), "--out", str(tmp_path / "o"), "--bogus", "3")
    assert code == 2 and err.count("\n") == 1 and "unrecognized arguments" in err
    for src in ("nosuch://bucket/x", str(tmp_path / "missing")):
        code, _, err = run_cli("audit", "--source", src, "--out", str(tmp_path / "o"))
        assert code == 1 and err.count("\n") == 1, err
    code, _, err = run_cli("audit", "--source", str(tmp_path), "--out", str(tmp_path / "o"), "--folds", "1")
    assert code == 1 and "--folds must be >= 2" in err


@pytest.mark.parametrize("exact_max", [10_000, 0], ids=["exact", "hnsw"])
def test_near_duplicates_are_found_by_exact_and_graph_search(exact_max: int) -> None:
    """The neighbour search finds planted near copies both ways: exact (faiss IndexFlatIP) and the
    HNSW graph that archives above ``EXACT_MAX`` images get; the graph's neighbours agree with the
    exact ones on real digits' pixels."""
    from jobs.audit.duplicates import nearest

    x, _ = digits(8)
    x = x.reshape(len(x), -1).astype(np.float32)
    rng = np.random.default_rng(0)
    originals = rng.choice(len(x), 30, replace=False)
    copies = x[originals] + rng.normal(0, 0.5, (30, x.shape[1])).astype(np.float32)
    emb = np.concatenate([x, copies])
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    sim, idx = nearest(emb, 3, exact_max=exact_max)
    assert sim.shape == idx.shape == (len(emb), 3)
    n = len(x)
    for j, i in enumerate(originals):  # each copy's nearest other row is its original
        row = [p for p in idx[n + j] if p != n + j]
        assert row[0] == i, (j, i, idx[n + j])
    _, exact_idx = nearest(emb, 3, exact_max=len(emb))
    agree = np.mean([len(set(a) & set(b)) / 3 for a, b in zip(idx, exact_idx, strict=True)])
    assert agree >= 0.95
