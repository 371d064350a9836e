"""Security (#12): bundles that would run code are refused; credentials reach no output, log line
or message; per-image limits; every page shows hostile names and labels as text (headless Chromium).

Everything is real: bundles trained on digits and then tampered with, a moto S3 server on
127.0.0.1, a local 2-CPU Ray, the command line verbs, Chromium's DOM after its scripts ran.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.bundle import BundleError, ModelBundle, bundle_version, check_bundle
from jobs.cli import main
from jobs.demo_data import digits, png_bytes
from jobs.images import decode_image
from jobs.sources import Shard, read_shard
from jobs.storage import REDACTED, StorageError, filesystem, redact, remember_secrets

SIZE = 16
#: the effect a script that ran would leave: the page's whole title (checked in the DOM after load)
PWNED = "PWNED-by-data"
HOSTILE_NAME = f"<script>alert(1);document.title='{PWNED}'</script>.png"
HOSTILE_LABEL = f"<img src=x onerror=\"document.title='{PWNED}'\">"


# -- 1a. bundles that would run code ---------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_uri(tmp_path_factory: Any, digits16: tuple[np.ndarray, np.ndarray]) -> str:
    """A real, small bundle: an autoencoder (Keras) + HOG/OCSVM (skops)."""
    from detectors import AutoencoderDetector, OcsvmDetector

    images, labels = digits16
    normal = images[labels == 0][:60]
    detectors = {
        "autoencoder": AutoencoderDetector(input_size=SIZE, epochs=1, filters=(8, 16), latent_dim=4).fit(normal),
        "ocsvm": OcsvmDetector(input_size=SIZE).fit(normal),
    }
    uri = str(tmp_path_factory.mktemp("bundle") / "model")
    ModelBundle(detectors=detectors, input_size=SIZE, channels=1).save(uri)
    return uri


def _rehash(bundle: Path) -> None:
    """Recompute bundle.json's version over the files it lists, as an attacker who knows the
    scheme would: then only the content checks stand between the bundle and the loader."""
    manifest = json.loads((bundle / "bundle.json").read_text())
    digests = {
        f"{name}/{f}": hashlib.sha256((bundle / name / f).read_bytes()).digest()
        for name, files in manifest["detectors"].items()
        for f in files
    }
    manifest["version"] = bundle_version(digests)
    (bundle / "bundle.json").write_text(json.dumps(manifest))


class _Exploit:
    """Unpickling this creates ``path``: proof that a loader ran code it was handed."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (Path(self.path),))


def _plant_pickle(bundle: Path, marker: Path, name: str) -> None:
    """ocsvm/<name>: a real pickle whose loading would create ``marker``; listed, rehashed."""
    (bundle / "ocsvm" / name).write_bytes(pickle.dumps(_Exploit(str(marker)), protocol=4))
    manifest = json.loads((bundle / "bundle.json").read_text())
    if name not in manifest["detectors"]["ocsvm"]:
        manifest["detectors"]["ocsvm"].append(name)
    (bundle / "bundle.json").write_text(json.dumps(manifest))
    _rehash(bundle)


def _plant_lambda(bundle: Path) -> None:
    """autoencoder/model.keras replaced by a real Keras model with a Lambda layer; rehashed."""
    import keras

    inputs = keras.Input((SIZE, SIZE, 1))
    model = keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2.0)(inputs))
    path = bundle / "lambda.keras"
    model.save(path)
    shutil.move(path, bundle / "autoencoder" / "model.keras")
    _rehash(bundle)


def _tamper_hash(bundle: Path) -> None:
    manifest = json.loads((bundle / "bundle.json").read_text())
    manifest["version"] = "0123456789abcdef"
    (bundle / "bundle.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("attack", "message"),
    [
        ("pickle", "model.pkl is a pickle: loading it would run code"),
        ("pickle-as-npy", "pixel_error.npy is a pickle"),
        ("lambda", "a Lambda layer holds code"),
        ("tampered-hash", "do not match version 0123456789abcdef"),
    ],
)
def test_a_bundle_that_would_run_code_is_refused_in_one_line(
    bundle_uri: str, tmp_path: Path, attack: str, message: str
) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(bundle_uri, bad)
    marker = tmp_path / "code-ran"
    if attack == "pickle":
        _plant_pickle(bad, marker, "model.pkl")
    elif attack == "pickle-as-npy":  # a pickle under the name of a file the detector does read
        (bad / "autoencoder" / "pixel_error.npy").write_bytes(pickle.dumps(_Exploit(str(marker)), protocol=4))
        _rehash(bad)
    elif attack == "lambda":
        _plant_lambda(bad)
    else:
        _tamper_hash(bad)
    with pytest.raises(BundleError) as e:  # the driver's check, before any cluster work
        check_bundle(str(bad))
    assert message in str(e.value) and len(str(e.value).splitlines()) == 1, str(e.value)
    with pytest.raises(BundleError):  # and the actors' loader, should the files change after the check
        ModelBundle.load(str(bad))
    assert not marker.exists(), "a pickle in the bundle was loaded"
    # the command line: one line, exit 1, no traceback
    assert main(["score", "--source", str(tmp_path), "--models", str(bad), "--out", str(tmp_path / "o")]) == 1


def test_the_sound_bundle_still_loads(bundle_uri: str) -> None:
    """The checks above refuse the attacks, not bundles: the untouched copy passes both."""
    assert check_bundle(bundle_uri)["version"] == ModelBundle.load(bundle_uri).version


# -- 1c. per-image limits --------------------------------------------------------------------------


def _png(h: int, w: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)  # noise: PNG cannot compress it, so bytes ~ pixels
    return png_bytes(rng.integers(0, 256, (h, w), dtype=np.uint8))


def test_byte_limit_makes_an_error_row_in_every_kind_of_shard(tmp_path: Path) -> None:
    small, big = _png(8, 8), _png(64, 64)  # ~0.2 kB and ~4 kB
    limit = 2048
    assert len(small) < limit < len(big)
    assert "file too large" in str(decode_image(big, max_bytes=limit).error)
    assert decode_image(big).error is None
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "small.png").write_bytes(small)
    (tmp_path / "files" / "big.png").write_bytes(big)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("small.png", small), ("big.png", big)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "s.tar").write_bytes(buf.getvalue())
    shards = [
        Shard(
            "f",
            str(tmp_path / "files"),
            "files",
            0,
            "",
            tuple(str(tmp_path / "files" / n) for n in ("big.png", "small.png")),
        ),
        Shard("t", str(tmp_path / "s.tar"), "tar", 0, ""),
    ]
    for shard in shards:
        recs = {r.member.rsplit("/", 1)[-1]: r for r in read_shard(shard, max_bytes=limit)}
        assert recs["small.png"].error is None and recs["small.png"].data == small
        # refused before it is read into memory: no bytes held, a reason that names the flag
        assert recs["big.png"].data is None and "--max-bytes" in str(recs["big.png"].error), recs["big.png"]


def test_pixel_limit_is_a_flag_and_limits_are_validated_once(tmp_path: Path, capsys: Any) -> None:
    from jobs.score import ScoreConfig

    assert "--max-pixels" in str(decode_image(_png(40, 40), max_pixels=1000).error)
    for flag, value in (("--max-bytes", "0"), ("--max-pixels", "-5")):
        assert main(["score", "--source", "x", "--models", "y", "--out", "z", flag, value]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"imgscan: error: {flag} must be a whole number >= 1") and err.count("\n") == 1
    with pytest.raises(ValueError, match="--max-bytes"):
        ScoreConfig(source="a", models="b", out="c", max_bytes=0)


# -- 1b. credentials --------------------------------------------------------------------------------


def test_redact_masks_uri_userinfo_options_and_environment(monkeypatch: Any) -> None:
    key, secret, token = (f"{p}{uuid.uuid4().hex}" for p in ("AKIA", "sec", "tok"))
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)
    so = {"key": key, "client_kwargs": {"aws_secret_access_key": secret, "endpoint_url": "http://127.0.0.1:1"}}
    text = f"s3://{key}:{secret}@bucket/x failed; token {token}; other s3://bucket/k@v.png"
    out = redact(text, so)
    assert key not in out and secret not in out and token not in out
    assert f"s3://{REDACTED}@bucket/x" in out and "s3://bucket/k@v.png" in out
    with pytest.raises(StorageError) as e:
        filesystem(f"s3://{key}:{secret}@bucket/x")
    assert secret not in str(e.value) and "--storage-options" in str(e.value)


@pytest.mark.parametrize("secret", ['quote"and\\backslash-1', "pässwörd-geheim-2", "\u5bc6\u7801-secret-3"])
def test_stored_json_masks_a_secret_that_json_would_escape(tmp_path: Path, secret: str) -> None:
    """Masked string by string, before JSON escapes a quote, a backslash or a non-ASCII letter
    (masking the escaped text let these through: ``\\"``, ``\\u00e4``)."""
    from jobs.storage import read_json, write_json

    uri = str(tmp_path / "a.json")
    write_json(uri, {"note": f"failed with {secret}", secret: [secret]}, {"secret": secret})
    text = (tmp_path / "a.json").read_text()
    assert secret not in json.loads(text)["note"] and secret not in text
    assert read_json(uri) == {"note": f"failed with {REDACTED}", REDACTED: [REDACTED]}


def test_a_secret_that_is_also_a_word_of_the_source_still_lets_the_run_resume(tmp_path: Path) -> None:
    """A password that is a common word can occur in a URI too: it is masked in _run.json as
    everywhere (the stored text never holds it), and the resume compares the source as stored."""
    from jobs.ledger import plan_run, write_run

    so = {"password": "archive2026"}  # 11 characters: masked (MIN_SECRET is 8)
    out = str(tmp_path / "out")
    facts = {"model_version": "v1", "source": "s3://bucket/archive2026/src", "manifest_fingerprint": "f"}
    plan = plan_run(out, "r1", facts, so)
    write_run(out, plan, so)
    assert "archive2026" not in (tmp_path / "out" / "_run.json").read_text()
    assert plan_run(out, "r1", facts, so).run_id == "r1"  # resumes; it was refused before
    with pytest.raises(ValueError, match="was started with source"):
        plan_run(out, "r1", {**facts, "source": "s3://bucket/other/src"}, so)


def _texts_of_object(path: str, data: bytes) -> list[str]:
    """What a person or a program could read out of one stored object: its bytes, and for
    Parquet (compressed: a secret in it need not appear as plain bytes) every value and the metadata."""
    out = [data.decode("latin-1")]
    if path.endswith(".parquet"):
        table = pq.read_table(io.BytesIO(data))
        out += [str(table.schema.metadata), json.dumps(table.to_pylist(), default=str)]
    return out


@pytest.fixture
def ray_with_logs() -> Iterator[Path]:
    """A local 2-CPU Ray whose session logs go to a folder of this test (grepped afterwards);
    the verbs join it instead of starting their own."""
    import ray

    temp = Path(tempfile.mkdtemp(prefix="imgscan-ray-", dir="/tmp"))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=True, _temp_dir=str(temp))
    try:
        yield temp
    finally:
        ray.shutdown()
        shutil.rmtree(temp, ignore_errors=True)


def _scan_parquet(n: int) -> bytes:
    """Digits plus three hostile rows: a script for a name (scored), an HTML label, and a
    script-named row of broken bytes (an error row: the reasons table shows its name too)."""
    imgs, labels = digits(SIZE)
    rng = np.random.default_rng(0)
    rows = [{"id": f"img{i:04d}", "image": png_bytes(imgs[i]), "label": str(labels[i])} for i in range(n)]
    noise = png_bytes(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8))  # noise: flagged by some score
    rows += [
        {"id": HOSTILE_NAME, "image": noise, "label": HOSTILE_LABEL},
        {"id": f"broken-{HOSTILE_NAME}", "image": b"<html>" + HOSTILE_LABEL.encode(), "label": HOSTILE_LABEL},
    ]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


def _assert_page_is_inert(dom: str, name: str) -> None:
    """Chromium's DOM after load: no script of the data ran (the title it would set is not set),
    and the hostile text is there, as text."""
    title = dom.split("<title>", 1)[1].split("</title>", 1)[0]
    assert title.strip() != PWNED, f"{name}: a script from the data ran (it set the title)"
    assert "&lt;script&gt;alert(1)" in dom, f"{name}: the hostile name is not shown as text"
    assert "<script" not in dom.lower(), f"{name}: a script element made it into the page"


@pytest.mark.heavy
@pytest.mark.s3
@pytest.mark.cluster
def test_no_credential_reaches_any_output_log_or_message_and_pages_stay_inert(
    s3_server: str, ray_with_logs: Path, tmp_path: Path, capfd: Any, monkeypatch: Any, dump_dom: Callable[[str], str]
) -> None:
    """train -> score -> reduce on the S3 API with planted credentials in the storage options and
    the environment, plus the refusals that quote URIs; then every object in the bucket, every line
    the verbs printed and every Ray session log is searched for them."""
    import boto3

    tag = uuid.uuid4().hex
    key, secret, token = f"AKIA{tag[:16].upper()}", f"planted-secret-{tag}", f"planted-token-{tag}"
    monkeypatch.setenv("AWS_SESSION_TOKEN", token)  # botocore sends it; moto accepts any
    bucket = f"imgscan-sec-{tag[:12]}"
    boto3.client(
        "s3", endpoint_url=s3_server, aws_access_key_id=key, aws_secret_access_key=secret, region_name="us-east-1"
    ).create_bucket(Bucket=bucket)
    so = {"key": key, "secret": secret, "token": token, "client_kwargs": {"endpoint_url": s3_server}}
    fs, _ = filesystem(f"s3://{bucket}", so)
    imgs, labels = digits(SIZE)
    for i in np.flatnonzero(labels == 0)[:60]:
        fs.pipe_file(f"{bucket}/train/0/img{i:04d}.png", png_bytes(imgs[i]))
    fs.pipe_file(f"{bucket}/scan/part-0.parquet", _scan_parquet(30))
    root, opts = f"s3://{bucket}", ["--storage-options", json.dumps(so)]
    common = ["--image-size", str(SIZE), "--epochs", "1", "--detectors", "autoencoder", "ocsvm"]
    assert main(["train", "--source", f"{root}/train", "--out", f"{root}/model", *common, *opts]) == 0
    score = ["--models", f"{root}/model", "--out", f"{root}/results", "--batch-size", "64", *opts]
    assert main(["score", "--source", f"{root}/scan", *score]) == 0
    rules = ["--rule", "quantile:0.5", "--rule", "each=quantile:0.5"]
    reduce = ["--results", f"{root}/results", "--out", f"{root}/report", *rules]
    assert main(["reduce", *reduce, "--top-k", "40", *opts]) == 0
    # refusals that quote what they were given: a URI with credentials, a missing run, a bad bucket
    assert main(["score", "--source", f"s3://{key}:{secret}@{bucket}/scan", *score]) == 1
    assert main(["reduce", "--results", f"{root}/none", "--out", f"{root}/r2", *opts]) == 1
    assert main(["score", "--source", f"s3://{bucket}/missing", *score]) == 1
    out, err = capfd.readouterr()
    refusals = [line for line in err.splitlines() if line.startswith("imgscan: error:")]
    assert len(refusals) == 3 and f"s3://{REDACTED}@{bucket}/scan" in refusals[0], refusals

    planted = {"key": key, "secret": secret, "token": token}
    sources = {"stdout": out, "stderr": err}
    for path in fs.find(bucket):
        for i, text in enumerate(_texts_of_object(path, fs.cat_file(path))):
            sources[f"s3://{path}[{i}]"] = text
    logs = [p for p in ray_with_logs.rglob("*") if p.is_file() and p.suffix in (".out", ".err", ".log")]
    assert logs, "no Ray session logs to search"
    sources |= {str(p): p.read_bytes().decode("latin-1") for p in logs}
    assert any(p.startswith(f"s3://{bucket}/results/parts/") for p in sources)
    leaks = [(where, what) for where, text in sources.items() for what, v in planted.items() if v in text]
    assert not leaks, leaks

    # 1d: the report shows the hostile name and label as text, and Chromium runs none of it
    (tmp_path / "report.html").write_bytes(fs.cat_file(f"{bucket}/report/report.html"))
    page = (tmp_path / "report.html").read_text()
    assert "&lt;script&gt;alert(1)" in page and "&lt;img src=x onerror=" in page, "hostile row not in the report"
    _assert_page_is_inert(dump_dom(f"file://{tmp_path / 'report.html'}"), "report.html")


def test_chromium_runs_scripts_of_a_page_so_the_inert_checks_can_fail(
    tmp_path: Path, dump_dom: Callable[[str], str]
) -> None:
    """The control: the same payloads written into a page unescaped do run."""
    page = tmp_path / "control.html"
    page.write_text(f"<!doctype html><html><head><title>t</title></head><body>{HOSTILE_LABEL}</body></html>")
    dom = dump_dom(f"file://{page}")
    assert dom.split("<title>", 1)[1].split("</title>", 1)[0].strip() == PWNED


def test_history_page_is_inert(tmp_path: Path, dump_dom: Callable[[str], str]) -> None:
    from jobs.history import write_history
    from jobs.storage import join, write_json

    root = str(tmp_path / "nightly")
    write_json(join(root, "_scan", "scan.json"), {"source": f"s3://b/{HOSTILE_NAME}", "model_uri": HOSTILE_LABEL})
    for i, date in enumerate(["2026-11-01", "2026-11-02"]):
        entry = {
            "date": date,
            "items": {"total": 1, "new": 1, "changed": 0},
            "images": 10,
            "scored": 9,
            "errors": 1,
            "flagged": {"overall": i, "per_score": {f"{HOSTILE_LABEL}=quantile": 1}},
            "drift": {HOSTILE_NAME: {"drifted": True}},
            "report": HOSTILE_LABEL,
        }
        write_json(join(root, "_scan", "history", f"{date}.json"), entry)
    write_history(root)
    _assert_page_is_inert(dump_dom(f"file://{tmp_path / 'nightly' / '_scan' / 'history.html'}"), "history.html")


def test_audit_page_is_inert(tmp_path: Path, dump_dom: Callable[[str], str]) -> None:
    from jobs.audit.page import Member, Suspect, render_page

    px = np.zeros((SIZE, SIZE, 1), np.uint8)
    cam = np.zeros(16, np.float32)
    suspects = [
        Suspect(
            1, f"s3://b/{HOSTILE_NAME}", HOSTILE_LABEL, "1", 0.1, 0, ((HOSTILE_LABEL, 0.9),), px, cam, cam, HOSTILE_NAME
        )
    ]
    groups = [(HOSTILE_LABEL, [Member(HOSTILE_NAME, HOSTILE_LABEL, 1.0, HOSTILE_LABEL, px, HOSTILE_NAME)])]
    summary = {
        "source": HOSTILE_NAME,
        "classes": [HOSTILE_LABEL],
        "issues_per_class": {HOSTILE_LABEL: 1},
        "unreadable": [{"image_id": HOSTILE_NAME, "error": HOSTILE_LABEL}],
    }
    page = tmp_path / "audit.html"
    page.write_text(render_page(summary, suspects, groups))
    _assert_page_is_inert(dump_dom(f"file://{page}"), "audit.html")


def test_remembered_secrets_are_masked_in_log_lines(capsys: Any) -> None:
    from jobs.score import log

    secret = f"remembered-{uuid.uuid4().hex}"
    remember_secrets({"secret": secret})
    log(f"something failed near {secret}")
    assert secret not in capsys.readouterr().err
