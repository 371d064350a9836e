"""The bad-input corpus (tests/attack_corpus.py) through ``imgscan score`` on a local 2-CPU Ray,
from local disk and from the S3 API on 127.0.0.1: every input is exactly one row (scored, or
an error with a reason a person reads), the job completes, nothing is written outside the
output URI, and decoding a bomb holds memory bounded by the limits."""

from __future__ import annotations

import json
import posixpath
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from jobs.ledger import committed_shards, read_results
from jobs.score import ScoreConfig, preflight, score_shards
from jobs.sources import list_shards
from jobs.storage import filesystem
from tests.attack_corpus import (
    LINKS,
    MAX_BYTES,
    Expect,
    archive_inputs,
    file_inputs,
    huge_gif,
    huge_jpeg,
    huge_png,
    write_corpus,
)
from tests.attack_corpus import kinds as corpus_kinds

SIZE = 16
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bundle_uri(tiny_bundle: str) -> str:
    return tiny_bundle


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def expected_rows(*, local: bool) -> dict[tuple[str, str], Expect]:
    """(the shard's name: "files" or the archive's file name, member) -> the row it must give."""
    out = {
        ("files", name): e
        for name, (_, e) in file_inputs().items()
        if e.status != "none" and (local or not e.local_only)
    }
    if local:
        out |= {("files", name): e for name, (_, e) in LINKS.items()}
    for archive, rows in archive_inputs()[1].items():
        out |= {(archive, member): e for member, e in rows.items()}
    return out


def _plain(p: Path) -> bool:
    return p.is_file() and not p.is_symlink()


def test_the_corpus_has_at_least_forty_kinds_and_is_reproducible(tmp_path: Path) -> None:
    assert len(corpus_kinds()) >= 40, sorted(corpus_kinds())
    subprocess.run([sys.executable, "tests/attack_corpus.py", str(tmp_path / "a")], cwd=ROOT, check=True)
    write_corpus(tmp_path / "b")
    a = {p.relative_to(tmp_path / "a"): p.read_bytes() for p in (tmp_path / "a").rglob("*") if _plain(p)}
    b = {p.relative_to(tmp_path / "b"): p.read_bytes() for p in (tmp_path / "b").rglob("*") if _plain(p)}
    assert a == b and len(a) == len(file_inputs()) + len(archive_inputs()[0])


def _score_corpus(bundle_uri: str, root: str, so: dict[str, Any] | None) -> tuple[dict[str, Any], Any]:
    """One job over both halves of the corpus (a source holds files or archives, not both)."""
    cfg = ScoreConfig(
        source=f"{root}/files",
        models=bundle_uri,
        out=f"{root}/out",
        batch_size=32,
        max_bytes=MAX_BYTES,
        storage_options=dict(so or {}),
    )
    preflight(cfg)
    shards = list_shards(f"{root}/files", so) + list_shards(f"{root}/archives", so)
    summary = score_shards(cfg, shards)
    assert summary["shards"] == summary["shards_committed"] == len(shards) == len(committed_shards(cfg.out, so))
    return summary, read_results(cfg.out, so)


def _check_rows(results: Any, expected: dict[tuple[str, str], Expect]) -> None:
    rows = results.select(["shard", "member", "status", "error", "image_id"]).to_pylist()
    keys = [(posixpath.basename(r["shard"].rstrip("/")), r["member"]) for r in rows]
    assert len(keys) == len(set(keys)), "an input gave two rows"
    assert len({r["image_id"] for r in rows}) == len(rows)
    assert set(keys) == set(expected), (sorted(set(expected) - set(keys)), sorted(set(keys) - set(expected)))
    wrong = []
    for key, r in zip(keys, rows, strict=True):
        e = expected[key]
        if r["status"] != e.status or e.reason not in (r["error"] or "") or (r["status"] == "error" and not r["error"]):
            wrong.append((key, e, r["status"], r["error"]))
    assert not wrong, wrong
    # reasons are one line a person reads, never a traceback or a bare exception repr
    for r in rows:
        assert r["error"] is None or ("\n" not in r["error"] and "Traceback" not in r["error"]), r["error"]


def _tree(path: Path, skip: Path) -> dict[str, tuple[int, int]]:
    """Every path below ``path`` but ``skip``'s, with size and mtime for files (a folder's
    mtime changes when ``skip`` is made in it)."""
    return {
        str(p): (p.lstat().st_size, p.lstat().st_mtime_ns) if not p.is_dir() else (0, 0)
        for p in path.rglob("*")
        if skip not in p.parents and p != skip
    }


@pytest.mark.heavy
@pytest.mark.cluster
def test_every_bad_input_is_one_row_from_local_disk(local_ray: None, bundle_uri: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    before = _tree(tmp_path.parent, corpus / "out")
    summary, results = _score_corpus(bundle_uri, str(corpus), None)
    expected = expected_rows(local=True)
    assert summary["images"] == results.num_rows == len(expected)
    _check_rows(results, expected)
    # nothing written outside the output URI: not by ../ or absolute tar members, not elsewhere
    after = _tree(tmp_path.parent, corpus / "out")
    assert after == before, sorted(set(after) ^ set(before))[:10]
    assert not Path("/etc/absolute.png").exists() and not (tmp_path.parent / "escaped.png").exists()


@pytest.mark.heavy
@pytest.mark.cluster
@pytest.mark.s3
def test_every_bad_input_is_one_row_from_the_s3_api(local_ray: None, bundle_uri: str, s3: dict[str, Any]) -> None:
    so, root = s3["storage_options"], s3["root"]
    fs, bucket = filesystem(root, so)
    for name, (data, e) in file_inputs().items():
        if not e.local_only:
            fs.pipe_file(f"{bucket}/files/{name}", data)
    for name, data in archive_inputs()[0].items():
        fs.pipe_file(f"{bucket}/archives/{name}", data)
    before = set(fs.find(bucket))
    summary, results = _score_corpus(bundle_uri, root, so)
    expected = expected_rows(local=False)
    assert summary["images"] == results.num_rows == len(expected)
    _check_rows(results, expected)
    fs.invalidate_cache()
    written = set(fs.find(bucket)) - before
    assert written and all(p.startswith(f"{bucket}/out/") for p in written), sorted(written)[:10]


#: what one decode of a bomb may add to a process's peak memory (the default limits hold every
#: bomb of the corpus to its header; the figure measured is in the README)
BOMB_MEMORY_MIB = 64

_MEASURE = """
import json, resource, sys
from jobs.images import decode_image
data = open(sys.argv[1], "rb").read()
decode_image(b"")  # PIL and numpy loaded before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
d = decode_image(data, min_size=32, gray=True)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"mib": (after - before) / 1024, "error": d.error}))
"""


def bomb_memory(data: bytes, path: Path) -> dict[str, Any]:
    """Peak memory (MiB, ru_maxrss) that decoding ``data`` adds to a fresh process, and its reason."""
    path.write_bytes(data)
    out = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return dict(json.loads(out.stdout))


def test_bombs_are_refused_from_their_header_in_bounded_memory(tmp_path: Path) -> None:
    bombs = {"png-100000x100000": huge_png(), "gif-65535x65535": huge_gif(), "jpeg-20000x20000": huge_jpeg()}
    for name, data in bombs.items():
        m = bomb_memory(data, tmp_path / name)
        assert "too large" in str(m["error"]) and m["mib"] < BOMB_MEMORY_MIB, (name, m)


# -- the same limits on the verbs that train: a bomb is an unreadable input, not an OOM ---------

#: limits the test sources are read with: the digits (16x16, ~250 bytes) pass them
LIMITS = {"max_pixels": 1000, "max_bytes": 800}
#: the inputs of ``_limit_source`` the limits refuse, with a word of their reason
REFUSED = {
    "bomb.png": "image too large: 100000x100000",
    "wide.png": "image too large: 40x40 pixels exceeds the limit of 1000 (--max-pixels)",
    "heavy.png": "file too large: over the limit of 800 bytes (--max-bytes)",
}


def _limit_source(root: Path) -> Path:
    """20 real digits in class folders 0 and 1, and in 0/ a PNG declaring 100000x100000 pixels,
    a real 40x40 PNG (1,600 pixels) and a real 30x30 noise PNG of more than 800 bytes."""
    from jobs.demo_data import digits, png_bytes, samples, write_folder

    imgs, labels = digits(16, classes=[0, 1])
    write_folder(str(root), samples(imgs[:20], [str(v) for v in labels[:20]]))
    noise = np.random.default_rng(12).integers(0, 256, (30, 30), dtype=np.uint8)
    refused = {
        "bomb.png": huge_png(),
        "wide.png": png_bytes(np.zeros((40, 40), np.uint8)),
        "heavy.png": png_bytes(noise),
    }
    assert len(refused["heavy.png"]) > LIMITS["max_bytes"]
    for name, data in refused.items():
        (root / "0" / name).write_bytes(data)
    return root


def _check_refused(skipped: list[dict[str, Any]]) -> None:
    reasons = {posixpath.basename(str(s["image_id"])): str(s["reason"]) for s in skipped}
    assert set(reasons) == set(REFUSED), reasons
    for name, words in REFUSED.items():
        assert words in reasons[name], (name, reasons[name])


def _limit_flags() -> list[str]:
    return ["--max-pixels", str(LIMITS["max_pixels"]), "--max-bytes", str(LIMITS["max_bytes"])]


@pytest.mark.heavy
def test_train_takes_the_limits_and_leaves_a_bomb_out(tmp_path: Path) -> None:
    from jobs.cli import main

    src, out = _limit_source(tmp_path / "src"), tmp_path / "model"
    flags = ["--detectors", "autoencoder", "--epochs", "1", "--image-size", "16", *_limit_flags()]
    assert main(["train", "--source", str(src), "--out", str(out), *flags]) == 0
    _check_refused(json.loads((out / "training" / "skipped.json").read_text()))


def test_audit_reads_with_the_limits_of_its_flags(tmp_path: Path, capsys: Any) -> None:
    """The audit's decode (``decode_shard``, what its Ray tasks run) with the limits its flags
    give; a limit no image could meet is one line. The whole audit with a bomb: -m slow."""
    from jobs.audit.blocks import decode_shard
    from jobs.cli import main
    from jobs.sources import list_shards

    src = _limit_source(tmp_path / "src")
    skipped = [x for shard in list_shards(str(src)) for x in decode_shard(shard, 16, None, **LIMITS)[0].skipped]
    _check_refused(skipped)
    argv = ["audit", "--source", str(src), "--out", str(tmp_path / "a"), "--max-bytes", "0"]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["imgscan: error: --max-bytes must be a whole number >= 1. Received: 0."], err


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.cluster
def test_audit_takes_the_limits_and_leaves_a_bomb_out(tmp_path: Path) -> None:
    from jobs.cli import main

    src, out = _limit_source(tmp_path / "src"), tmp_path / "audit"
    flags = ["--folds", "2", "--epochs", "1", "--image-size", "16", "--num-cpus", "2", *_limit_flags()]
    assert main(["audit", "--source", str(src), "--out", str(out), *flags]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_unreadable"] == len(REFUSED)
    _check_refused(summary["unreadable"])
