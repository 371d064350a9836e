"""Faults (#12): the object store stops answering midway (tars, loose files, Parquet), or for
good; the output cannot be written, or fills up midway; the reducer is killed. Real
components: a local 2-CPU Ray, the moto S3 server on 127.0.0.1 behind a TCP proxy this test
breaks at will (connections reset, new ones refused), a real tmpfs that fills up, a real bucket
policy that refuses writes.

What must hold: a store that stops answering is retried and the job completes with every image
scored once (never an error row for a network fault); a store gone for good stops the job with
one clear line, what was committed stays valid, and a resume finishes it; an output that cannot
be written is one clear line (before any shard is scored when it is so from the start), and one
that fills up midway keeps its committed parts whole for the resume; a killed reducer leaves no
half-written output, and its re-run gives the same outputs."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs import sources
from jobs.bundle import ModelBundle
from jobs.cli import main
from jobs.demo_data import digits, png_bytes, samples, write_tar_shards
from jobs.ledger import committed_shards, read_results
from jobs.score import ScoreConfig, preflight, score_shards
from jobs.sources import Record, TransientReadError, list_shards, read_shard
from jobs.storage import StorageError, filesystem, write_bytes

SIZE = 16
ROOT = Path(__file__).resolve().parents[1]
#: seconds a decode task keeps retrying a silent store (IMGSCAN_IO_RETRY_S for this module's Ray):
#: longer than the 10 s outage, short enough for the "down for good" test
RETRY_S = 20
OUTAGE_S = 10.0
#: seconds the store answers between two outages of the soak test
UP_S = 15.0
#: one attempt per call in botocore: its own retries (up to 5, with backoff) would wait out a
#: short outage before ours are tried, and stretch each retry of a store gone for good
ONE_ATTEMPT = {"config_kwargs": {"retries": {"max_attempts": 1}}}


class FlakyProxy:
    """A TCP proxy to ``127.0.0.1:target``. ``down()`` resets every open connection and resets
    each new one at once (a store that stopped answering); ``restore()`` serves again."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.refused = 0  # connections reset while down: proof that the job met the fault
        self._up = threading.Event()
        self._up.set()
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _reset(self, s: socket.socket) -> None:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self._up.is_set():
                self.refused += 1
                self._reset(client)
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                self._reset(client)
                continue
            with self._lock:
                self._open |= {client, upstream}
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with self._lock:
                    self._open.discard(s)
                self._reset(s)

    def down(self) -> None:
        self._up.clear()
        with self._lock:
            victims, self._open = list(self._open), set()
        for s in victims:
            self._reset(s)

    def restore(self) -> None:
        self._up.set()

    def close(self) -> None:
        self._closed = True
        self.down()
        self.listener.close()


@pytest.fixture(scope="module")
def bundle_uri(tiny_bundle: str) -> str:
    return tiny_bundle


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """A local 2-CPU Ray whose workers retry a silent store for RETRY_S seconds (they take the
    environment of the process that starts Ray)."""
    import ray

    old = os.environ.get("IMGSCAN_IO_RETRY_S")
    os.environ["IMGSCAN_IO_RETRY_S"] = str(RETRY_S)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
    if old is None:
        os.environ.pop("IMGSCAN_IO_RETRY_S", None)
    else:
        os.environ["IMGSCAN_IO_RETRY_S"] = old


@pytest.fixture
def flaky_s3(s3: dict[str, Any], s3_server: str) -> Iterator[dict[str, Any]]:
    """A fresh bucket reached through a FlakyProxy: {"root", "storage_options", "proxy"}."""
    import s3fs

    proxy = FlakyProxy(int(s3_server.rsplit(":", 1)[1]))
    s3fs.S3FileSystem.clear_instance_cache()
    so = {**s3["storage_options"], "client_kwargs": {"endpoint_url": proxy.url}}
    yield {"root": s3["root"], "storage_options": so, "proxy": proxy}
    proxy.close()


def _archive(root: str, so: dict[str, Any], n: int, per_shard: int) -> int:
    imgs, labels = digits(SIZE)
    write_tar_shards(f"{root}/src", samples(imgs[:n], [str(v) for v in labels[:n]]), per_shard, so)
    return n


def _check_once(out: str, n: int, so: dict[str, Any] | None = None) -> None:
    """Every image exactly once, scored (a network fault is never a row)."""
    results = read_results(out, so)
    ids = results.column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == n, (len(ids), len(set(ids)), n)
    assert set(results.column("status").to_pylist()) == {"ok"}, results.column("error").unique().to_pylist()


@pytest.mark.heavy
@pytest.mark.cluster
@pytest.mark.s3
def test_a_store_silent_for_ten_seconds_is_retried_and_every_image_scored(
    local_ray: None, bundle_uri: str, flaky_s3: dict[str, Any], tmp_path: Path
) -> None:
    so, proxy = flaky_s3["storage_options"], flaky_s3["proxy"]
    n = _archive(flaky_s3["root"], so, 80, 10)
    cfg = ScoreConfig(
        source=f"{flaky_s3['root']}/src",
        models=bundle_uri,
        out=str(tmp_path / "out"),
        batch_size=16,
        storage_options=so,
    )
    preflight(cfg)
    shards = list_shards(cfg.source, so)
    # down before the job's first read, up again OUTAGE_S after the first connection it refused
    proxy.down()

    def restore_later() -> None:
        deadline = time.monotonic() + 300
        while proxy.refused == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(OUTAGE_S)
        proxy.restore()

    threading.Thread(target=restore_later, daemon=True).start()
    summary = score_shards(cfg, shards)
    assert proxy.refused > 0, "the job never met the outage"
    assert summary["images"] == n and summary["errors"] == 0 and summary["shards_committed"] == len(shards)
    _check_once(cfg.out, n)


@pytest.mark.heavy
@pytest.mark.cluster
@pytest.mark.s3
def test_a_store_gone_for_good_stops_the_job_in_one_line_and_resume_finishes_it(
    local_ray: None, bundle_uri: str, flaky_s3: dict[str, Any], tmp_path: Path, capfd: Any
) -> None:
    so, proxy = flaky_s3["storage_options"], flaky_s3["proxy"]
    n = _archive(flaky_s3["root"], so, 40, 10)
    src, out = f"{flaky_s3['root']}/src", str(tmp_path / "out")
    cfg = ScoreConfig(source=src, models=bundle_uri, out=out, batch_size=16, storage_options=so, run_id="gone")
    shards = list_shards(src, so)
    proxy.down()  # and never back while the job runs
    # the command line, with the store gone before it lists the source: one line
    argv = ["score", "--source", src, "--models", bundle_uri, "--out", str(tmp_path / "o2")]
    assert main([*argv, "--storage-options", json.dumps(so)]) == 1
    err = [x for x in capfd.readouterr().err.splitlines() if x.startswith("imgscan: error:")]
    assert len(err) == 1 and "Cannot list" in err[0], err
    # the job, with the store gone after it listed the source: one line, after RETRY_S of retries
    with pytest.raises(StorageError) as e:
        score_shards(cfg, shards)
    message = str(e.value)
    assert len(message.splitlines()) == 1 and "did not answer" in message and "--run-id gone" in message, message
    assert proxy.refused > 0
    committed = committed_shards(out)
    if committed:  # whatever was committed holds its shards whole and scored
        results = read_results(out)
        assert set(results.column("status").to_pylist()) == {"ok"} and results.num_rows == 10 * len(committed)
    proxy.restore()
    summary = score_shards(cfg, shards)  # the resume
    assert summary["shards_skipped"] == len(committed) and summary["shards_committed"] == len(shards) - len(committed)
    _check_once(out, n)


def _loose_or_parquet(root: str, so: dict[str, Any], kind: str, n: int) -> list[bytes]:
    """``n`` images at ``root/src``: loose PNG files, or one Parquet file of row groups of 3
    beside a 10 kB column the reader skips, so that each row group is a GET of its own (as in
    a Parquet file of many MiB; pyarrow reads a small file whole with its footer)."""
    rng = np.random.default_rng(12)
    images = [png_bytes(rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8)) for _ in range(n)]
    if kind == "files":
        for i, data in enumerate(images):
            write_bytes(f"{root}/src/img{i:03d}.png", data, so)
    else:
        table = pa.table(
            {
                "id": [f"img{i:03d}" for i in range(n)],
                "image": pa.array(images, pa.binary()),
                "raw": pa.array([rng.bytes(10_000) for _ in range(n)], pa.binary()),
            }
        )
        buf = io.BytesIO()
        pq.write_table(table, buf, row_group_size=3)
        write_bytes(f"{root}/src/part.parquet", buf.getvalue(), so)
    return images


def _read_with_outage(
    flaky: dict[str, Any], kind: str, monkeypatch: Any, got: list[Record], *, back_after: float | None
) -> list[bytes]:
    """Read a loose-file or Parquet shard of 12 images without Ray into ``got``; the store goes
    down once the first image is read (midway: more reads are to come) and is back
    ``back_after`` s later (None: never). Returns the images written."""
    # a budget longer than the outage and the backoff pause that may straddle its end (0.5 + 1
    # + 2 + 4 s), or short, for a store gone for good
    monkeypatch.setenv("IMGSCAN_IO_RETRY_S", "3" if back_after is None else "10")
    monkeypatch.setattr(sources, "FETCH_CHUNK", 4)  # loose files: 3 fetches of 4
    monkeypatch.setattr(sources, "PARQUET_BATCH_ROWS", 3)  # Parquet: one row group per batch
    # small blocks: each row group is read when its batch is decoded, not all at once
    so = {**flaky["storage_options"], "default_block_size": 4096, **ONE_ATTEMPT}
    proxy = flaky["proxy"]
    images = _loose_or_parquet(flaky["root"], so, kind, 12)
    (shard,) = list_shards(f"{flaky['root']}/src", so)
    for rec in read_shard(shard, so):
        got.append(rec)
        if len(got) == 1:
            proxy.down()
            if back_after is not None:
                threading.Timer(back_after, proxy.restore).start()
    return images


@pytest.mark.s3
@pytest.mark.parametrize("kind", ["files", "parquet"])
def test_an_outage_midway_through_loose_files_or_parquet_is_retried_never_a_row(
    flaky_s3: dict[str, Any], kind: str, monkeypatch: Any
) -> None:
    got: list[Record] = []
    images = _read_with_outage(flaky_s3, kind, monkeypatch, got, back_after=1.5)
    assert flaky_s3["proxy"].refused > 0, "the read never met the outage"
    assert [r.error for r in got] == [None] * len(images)
    assert [r.data for r in got] == images  # every image whole, in order, once


@pytest.mark.s3
@pytest.mark.parametrize("kind", ["files", "parquet"])
def test_loose_files_or_parquet_on_a_store_gone_for_good_fail_the_shard_not_its_rows(
    flaky_s3: dict[str, Any], kind: str, monkeypatch: Any
) -> None:
    got: list[Record] = []
    with pytest.raises(TransientReadError, match="did not answer") as e:
        _read_with_outage(flaky_s3, kind, monkeypatch, got, back_after=None)
    assert len(str(e.value).splitlines()) == 1
    assert flaky_s3["proxy"].refused > 0
    assert got and [r.error for r in got] == [None] * len(got)  # what was read before is whole


@pytest.mark.s3
def test_the_reports_fetch_of_loose_files_retries_a_silent_store(flaky_s3: dict[str, Any], monkeypatch: Any) -> None:
    """The gallery's images (jobs.fetch) are read by the scoring job's reader: an outage is
    waited out, not shown as "cannot read"."""
    from jobs.fetch import fetch_images

    monkeypatch.setenv("IMGSCAN_IO_RETRY_S", "6")
    so, proxy = {**flaky_s3["storage_options"], **ONE_ATTEMPT}, flaky_s3["proxy"]
    _loose_or_parquet(flaky_s3["root"], so, "files", 3)
    ids = [f"{flaky_s3['root']}/src/img{i:03d}.png" for i in range(3)]
    proxy.down()
    threading.Timer(1.5, proxy.restore).start()
    got = fetch_images(ids, so)
    assert proxy.refused > 0
    assert [got[i].error for i in ids] == [None] * 3 and all(got[i].pixels is not None for i in ids)


def test_an_output_that_cannot_be_written_is_one_clear_line(bundle_uri: str, tmp_path: Path, capfd: Any) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.png").write_bytes(b"x")
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")  # the output URI names a file: nothing can be made below it
    argv = ["score", "--source", str(tmp_path / "src"), "--models", bundle_uri, "--out", str(blocker / "out")]
    assert main(argv) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Not a directory" in err[0] and str(blocker) in err[0], err
    assert blocker.read_text() == "in the way"


@contextlib.contextmanager
def _small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` (a file system that really fills up: ENOSPC);
    skipped, with the reason in pytest's summary, where mounting needs privileges this process
    lacks (this machine and CI run as root and can mount; a skip there would show in the summary)."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _fill(path: Path) -> None:
    """Write ``path`` until the file system holding it has no byte left."""
    with path.open("wb") as f:
        try:
            while True:
                f.write(bytes(1 << 16))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e


def _deny_writes(s3_server: str, bucket: str, deny: bool) -> None:
    """Put (or delete) a bucket policy that refuses every PutObject: moto enforces it (403)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    if not deny:
        client.delete_bucket_policy(Bucket=bucket)
        return
    statement = {"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{bucket}/*"}
    client.put_bucket_policy(Bucket=bucket, Policy=json.dumps({"Version": "2012-10-17", "Statement": [statement]}))


@pytest.mark.heavy
@pytest.mark.cluster
# the same path on S3 costs another ~40 s of two Ray jobs: in the long run only (its
# refusal at the start is checked in every run, below)
@pytest.mark.parametrize("where", ["local-disk-full", pytest.param("s3-writes-refused", marks=pytest.mark.slow)])
def test_an_output_that_fills_up_or_refuses_writes_midway_stops_in_one_line_and_resume_finishes(
    local_ray: None, bundle_uri: str, tmp_path: Path, monkeypatch: Any, where: str, request: Any
) -> None:
    """After the 2nd committed part the output takes no more: a tmpfs filled to its last byte
    (the driver's next part write gets ENOSPC), or a bucket policy that refuses PutObject (403).
    The job stops with one line; the 2 committed parts stay whole; once there is room again
    (the filler deleted, the policy lifted) the resume scores the rest, every image once."""
    import jobs.score as score_mod

    n = _archive(str(tmp_path), {}, 40, 5)  # 8 shards
    stack = contextlib.ExitStack()
    if where == "local-disk-full":
        disk = stack.enter_context(_small_disk(tmp_path / "disk", "8m"))
        out, so = str(disk / "out"), {}
        filler = disk / "filler"
        make_full, make_room, says = (lambda: _fill(filler)), filler.unlink, "No space left on device"
    else:
        s3, s3_server = request.getfixturevalue("s3"), request.getfixturevalue("s3_server")
        out, so = f"{s3['root']}/out", s3["storage_options"]
        bucket = s3["root"].removeprefix("s3://")
        make_full = lambda: _deny_writes(s3_server, bucket, True)  # noqa: E731
        make_room, says = (lambda: _deny_writes(s3_server, bucket, False)), "Forbidden"
    with stack:
        cfg = ScoreConfig(source=str(tmp_path / "src"), models=bundle_uri, out=out, batch_size=16, run_id="full")
        cfg = ScoreConfig(**{**cfg.__dict__, "storage_options": so})
        shards = list_shards(cfg.source)
        commits: list[str] = []

        def commit_then_fill(*args: Any, **kwargs: Any) -> str:
            """The real commit; after the 2nd, the output is full (a real write then fails)."""
            uri = str(real_commit(*args, **kwargs))
            commits.append(uri)
            if len(commits) == 2:
                make_full()
            return uri

        real_commit = score_mod.commit_part
        monkeypatch.setattr(score_mod, "commit_part", commit_then_fill)
        with pytest.raises(StorageError) as e:
            score_shards(cfg, shards)
        message = str(e.value)
        assert len(message.splitlines()) == 1 and says in message and "--run-id full" in message, message
        assert len(commits) == 2 and committed_shards(out, so) == {
            u.rsplit("/", 1)[1][: -len(".parquet")] for u in commits
        }
        results = read_results(out, so)  # the committed parts are whole, readable, scored
        assert results.num_rows == 10 and set(results.column("status").to_pylist()) == {"ok"}
        fs, parts = filesystem(f"{out}/parts", so)
        assert [p for p in fs.ls(parts, detail=False) if not str(p).endswith(".parquet")] == []  # no temporaries
        make_room()
        summary = score_shards(cfg, shards)
        assert summary["shards_skipped"] == 2 and summary["shards_committed"] == len(shards) - 2
        _check_once(out, n, so)


@pytest.mark.s3
@pytest.mark.parametrize("bucket", ["refuses-writes", "missing"])
def test_an_s3_output_that_cannot_be_written_is_one_line_before_any_shard_is_scored(
    bundle_uri: str, s3: dict[str, Any], s3_server: str, tmp_path: Path, capfd: Any, bucket: str
) -> None:
    n = _archive(str(tmp_path), {}, 10, 5)
    assert n == 10
    root = s3["root"]
    if bucket == "missing":
        root = f"{root}-gone"  # a bucket name that no one created
    else:
        _deny_writes(s3_server, root.removeprefix("s3://"), True)
    out = f"{root}/out"
    argv = ["score", "--source", str(tmp_path / "src"), "--models", bundle_uri, "--out", out]
    assert main([*argv, "--storage-options", json.dumps(s3["storage_options"])]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    # one line, and no line of the job (Ray not started, no shard scored)
    assert len(err) == 1 and err[0].startswith("imgscan: error: Cannot write to " + out), err
    assert ("Forbidden" if bucket == "refuses-writes" else "bucket does not exist") in err[0], err


@pytest.mark.heavy
def test_a_killed_reducer_leaves_no_half_written_output_and_its_rerun_is_the_same(
    bundle_uri: str, tmp_path: Path
) -> None:
    """Results written by the scoring core without Ray (as the reducer's tests do), then
    ``imgscan reduce`` killed at its first output and run again, against a clean run."""
    from jobs.ledger import commit_part, write_run
    from jobs.scoring import decode_records, finish_part, score_table

    bundle = ModelBundle.load(bundle_uri)
    n = _archive(str(tmp_path), {}, 120, 40)
    results = str(tmp_path / "results")
    shards = list_shards(str(tmp_path / "src"))
    from jobs.ledger import plan_run
    from jobs.sources import read_shard

    plan = plan_run(results, "r1", {"model_uri": bundle_uri, "model_version": bundle.version, "source": "s"})
    write_run(results, plan)
    for shard in shards:
        tables = [score_table(bundle, t, run_id="r1") for t in decode_records(read_shard(shard), shard.uri, SIZE, 1)]
        commit_part(results, shard.shard_id, finish_part(tables))
    assert read_results(results).num_rows == n

    def reduce_cmd(out: Path) -> list[str]:
        flags = ["--out", str(out), "--rule", "quantile:0.9", "--no-report"]  # the report would load TensorFlow
        return [sys.executable, "-m", "jobs", "reduce", "--results", results, *flags]

    def same(name: str) -> None:
        """The same content as the clean run's (the time a file was made aside)."""
        a, b = clean / name, killed / name
        if name.endswith(".json"):
            x, y = json.loads(a.read_text()), json.loads(b.read_text())
            for d in (x, y):
                for key in ("created_at", "seconds"):
                    d.pop(key, None)
            assert x == y, name
        else:
            # as text: NaN scores (of a detector a bundle lacks) compare equal that way
            dump = [json.dumps(pq.read_table(f).to_pylist(), default=str) for f in (a, b)]
            assert dump[0] == dump[1], name

    clean = tmp_path / "clean"
    subprocess.run(reduce_cmd(clean), cwd=ROOT, check=True, capture_output=True)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(reduce_cmd(killed), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not any(killed.glob("*")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # our own child, at its first output
    proc.wait()
    visible = [p.name for p in killed.glob("*") if not p.name.startswith(".")]
    for name in visible:  # what a reader sees is whole: what a finished run writes
        if name in ("thresholds.json", "flagged.parquet"):
            same(name)
    subprocess.run(reduce_cmd(killed), cwd=ROOT, check=True, capture_output=True)
    for name in ("thresholds.json", "flagged.parquet"):
        same(name)
    assert sorted(p.name for p in killed.glob("*") if not p.name.startswith(".")) == sorted(
        p.name for p in clean.glob("*")
    )


#: images of the long outage runs: enough that a job on idle cores outlasts two outages
SOAK_IMAGES = 3000


def _soak_source(root: str, so: dict[str, Any], kind: str, n: int) -> None:
    """``n`` digits (the 1,797 of load_digits, repeated) at ``root/src``: tars or Parquet files
    of 10, or loose files in class folders (shards of up to FILES_PER_SHARD, as by default)."""
    from jobs.demo_data import write_folder, write_parquet_shards

    imgs, labels = digits(SIZE)
    reps = -(-n // len(imgs))
    items = samples(np.concatenate([imgs] * reps)[:n], [str(v) for v in np.concatenate([labels] * reps)[:n]])
    write = {"tar": write_tar_shards, "parquet": write_parquet_shards}
    if kind == "files":
        write_folder(f"{root}/src", items, so)
    else:
        write[kind](f"{root}/src", items, 10, so)


@pytest.mark.slow
@pytest.mark.heavy
@pytest.mark.cluster
@pytest.mark.s3
@pytest.mark.parametrize("kind", ["tar", "files", "parquet"])
def test_soak_repeated_outages_over_a_bigger_archive(
    local_ray: None, bundle_uri: str, flaky_s3: dict[str, Any], tmp_path: Path, kind: str
) -> None:
    """Outages of OUTAGE_S, again and again (up to 5), UP_S apart, while SOAK_IMAGES images are
    read from tars, loose files or Parquet files. UP_S is longer than the longest pause between
    retries (IO_RETRY_MAX_PAUSE_S): a store back for less than that can be missed by a reader
    asleep in its backoff, and with outages close enough together the retry budget runs out
    (the first soak run, 5 s apart, failed so with the 20-s budget of this module)."""
    so, proxy = flaky_s3["storage_options"], flaky_s3["proxy"]
    n = SOAK_IMAGES
    _soak_source(flaky_s3["root"], so, kind, n)
    cfg = ScoreConfig(
        source=f"{flaky_s3['root']}/src",
        models=bundle_uri,
        out=str(tmp_path / "out"),
        batch_size=16,
        storage_options=so,
    )
    shards = list_shards(cfg.source, so)
    met: list[int] = []  # connections refused per outage
    done = threading.Event()

    def outages() -> None:
        for _ in range(5):
            before = proxy.refused
            proxy.down()
            while proxy.refused == before and not done.is_set():
                time.sleep(0.1)
            time.sleep(OUTAGE_S)
            proxy.restore()
            met.append(proxy.refused - before)
            if done.wait(UP_S):
                return

    threading.Thread(target=outages, daemon=True).start()
    summary = score_shards(cfg, shards)
    done.set()
    proxy.restore()
    print(
        f"soak {kind}: {len(met)} outage(s) of {OUTAGE_S:g}s met, refused connections {met}; "
        f"{summary['images']} images in {len(shards)} shards, {summary['errors']} errors, {summary['seconds']}s"
    )
    assert len(met) >= 2 and all(met), met  # the job met an outage, came through, and met another
    assert summary["images"] == n and summary["errors"] == 0
    _check_once(cfg.out, n)
