"""Camera-size JPEG archives through ``imgscan score`` (a measurement, not a test).

    PYTHONPATH=. python bench/photos.py [--images 320] [--workdir DIR] [--workers N]

1. Generates ``--images`` camera-size JPEGs (quality 90, 4:3) as WebDataset tar shards on
   local disk: random crops of the photos that ship with scikit-image (astronaut, coffee,
   chelsea, rocket), upscaled to 2, 6, 12 and 24 megapixels in turn, with noise. One in
   ten is a defect, labelled ``defect`` (the others ``normal``), of two kinds in turn: a
   crop of a photo of another kind (scikit-image's hubble_deep_field,
   immunohistochemistry, retina: out of distribution as a whole), or a large patch
   (35-55% of each side) of such a photo pasted into a normal crop. Both are visible at
   64 px, so that the score agreement below compares scores that rank something.
2. Trains the full bundle (autoencoder, mixture, CAM, OCSVM) at 64 px RGB on other normal
   crops of the same photos.
3. Measures, on one core each unless said:
   * decode + resize to 64 px per megapixel size, in images per CPU-second (other work on
     the cores does not count): the full decode (before) and the DCT-scaled decode of
     ``jobs.scoring.decode_record`` (after);
   * the scores of every archive image through both decodes: ROC AUC of each score
     (defect vs normal) and the mean absolute difference of the scores;
   * ceiling: ``bundle.score`` on in-memory 64 px batches, one process; the cores' decode
     ceiling: the fast decode of the archive's mix of sizes on one core x the cores;
   * ``python -m jobs score`` on the archive (embedded Ray): images/s of the whole job
     (start-up included) and the peak PSS of its process tree.
4. Prints one table.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
from collections.abc import Callable
from multiprocessing import Pool
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import run_job  # (the same job runner and PSS sampler as the 64 px bench)

SIZE = 64
MEGAPIXELS = (2, 6, 12, 24)
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")
#: photos of other kinds, never seen in training: the defects are made of them
OTHER_PHOTOS = ("hubble_deep_field", "immunohistochemistry", "retina")
PER_SHARD = 40
DEFECT_EVERY = 10


def _photos(names: tuple[str, ...] = PHOTOS) -> list[np.ndarray]:
    """The named scikit-image photos (shipped with the package, no download): uint8 (h, w, 3)."""
    from skimage import data

    return [np.asarray(getattr(data, name)(), dtype=np.uint8) for name in names]


def _crop(rng: np.random.Generator, photos: list[np.ndarray]) -> np.ndarray:
    """A random 4:3 crop (60-100% of the width) of one photo: uint8 (h, w, 3)."""
    src = photos[int(rng.integers(len(photos)))]
    h, w = src.shape[:2]
    cw = int(min(w, h * 4 / 3) * rng.uniform(0.6, 1.0))
    ch = cw * 3 // 4
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    return src[y : y + ch, x : x + cw]


def _paste_defect(img: np.ndarray, rng: np.random.Generator, others: list[np.ndarray]) -> np.ndarray:
    """A patch of a photo of another kind (35-55% of each side), pasted at random."""
    from PIL import Image

    out = img.copy()
    h, w = img.shape[:2]
    ph, pw = int(h * rng.uniform(0.35, 0.55)), int(w * rng.uniform(0.35, 0.55))
    patch = np.asarray(Image.fromarray(_crop(rng, others)).resize((pw, ph)))
    y, x = int(rng.integers(0, h - ph + 1)), int(rng.integers(0, w - pw + 1))
    out[y : y + ph, x : x + pw] = patch
    return out


def _source_image(seed: int, defect: str) -> np.ndarray:
    """The picture of one archive image before upscaling: uint8 (h, w, 3). ``defect``: ""
    (a normal crop), "other" (a crop of another kind of photo) or "patch" (a normal crop
    with a large patch of one)."""
    rng = np.random.default_rng(seed)
    if not defect:
        return _crop(rng, _photos())
    others = _photos(OTHER_PHOTOS)
    if defect == "other":
        return _crop(rng, others)
    return _paste_defect(_crop(rng, _photos()), rng, others)


def _camera_jpeg(args: tuple[int, int, str]) -> bytes:
    """(seed, megapixels, defect kind or "") -> the bytes of one 4:3 JPEG of that size, quality 90."""
    from PIL import Image

    seed, mp, defect = args
    img = _source_image(seed, defect)
    rng = np.random.default_rng(seed + 1)
    width = round((mp * 1e6 * 4 / 3) ** 0.5)
    height = width * 3 // 4
    big = np.asarray(Image.fromarray(img).resize((width, height), Image.Resampling.BILINEAR))
    # sensor-like noise; a 64-row tile repeated with a random offset costs far less than per-pixel draws
    tile = rng.integers(-8, 9, size=(64, width, 3), dtype=np.int16)
    noisy = big.astype(np.int16)
    for y0 in range(0, height, 64):
        rows = noisy[y0 : y0 + 64]
        rows += np.roll(tile[: len(rows)], int(rng.integers(width)), axis=1)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _defect_kind(i: int) -> str:
    """The i-th image's defect: one in DEFECT_EVERY, "other" and "patch" in turn; "" for normal."""
    if i % DEFECT_EVERY != 3:
        return ""
    return "other" if (i // DEFECT_EVERY) % 2 else "patch"


def make_archive(root: Path, n: int, seed: int = 0) -> Path:
    """``root/photos-<n>/shard-*.tar``: ``KEY.jpg`` + ``KEY.cls`` ("normal" or "defect")."""
    out = root / f"photos-{n}"
    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(seed * 1_000_003 + i, MEGAPIXELS[i % len(MEGAPIXELS)], _defect_kind(i)) for i in range(n)]
    with Pool(os.cpu_count() or 1) as pool:
        for s, start in enumerate(range(0, n, PER_SHARD)):
            chunk = jobs[start : start + PER_SHARD]
            with tarfile.open(out / f"shard-{s:06d}.tar", "w") as tar:
                for (i, mp, defect), data in zip(chunk, pool.map(_camera_jpeg, chunk), strict=True):
                    key = f"photo{i:06d}-{mp}mp"
                    _add(tar, f"{key}.jpg", data)
                    _add(tar, f"{key}.cls", b"defect" if defect else b"normal")
    (out / "done").write_text("ok")
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def train_bundle(root: Path, epochs: int, n: int = 400) -> str:
    """The full bundle at 64 px RGB, trained on ``n`` normal crops (unlabelled, 256x192 PNGs)."""
    from PIL import Image

    from jobs.demo_data import Sample, png_bytes, write_folder
    from jobs.train import TrainConfig, train

    model = root / "model"
    if (model / "bundle.json").exists():
        return str(model)
    rng = np.random.default_rng(12345)
    photos = _photos()
    imgs = [np.asarray(Image.fromarray(_crop(rng, photos)).resize((256, 192))) for _ in range(n)]
    write_folder(str(root / "train"), [Sample(f"train{i:05d}", png_bytes(im), None) for i, im in enumerate(imgs)])
    train(TrainConfig(source=str(root / "train"), out=str(model), image_size=SIZE, channels=3, epochs=epochs))
    return str(model)


def _members(archive: Path) -> list[tuple[str, bytes, str]]:
    """(key, JPEG bytes, label) of every image of the archive, in shard order."""
    out = []
    for path in sorted(archive.glob("shard-*.tar")):
        with tarfile.open(path) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}  # type: ignore[union-attr]
        for name in sorted(files):
            if name.endswith(".jpg"):
                key = name[: -len(".jpg")]
                out.append((key, files[name], files[f"{key}.cls"].decode()))
    return out


def full_decode(data: bytes) -> np.ndarray:
    """Before: decode whole, then resize: uint8 (64, 64, 3)."""
    from detectors.preprocessing import resize_uint8
    from jobs.images import decode_image

    dec = decode_image(data)
    assert dec.pixels is not None, dec.error
    return resize_uint8(dec.pixels, SIZE, 3)


def fast_decode(data: bytes) -> np.ndarray:
    """After: what the job does (DCT-scaled decode, then resize): uint8 (64, 64, 3)."""
    from jobs.scoring import decode_record
    from jobs.sources import Record

    row = decode_record(Record("bench#x", "bench", "x.jpg", data, None), SIZE, 3)
    assert row["pixels"] is not None, row["error"]
    return np.asarray(row["pixels"])


def _per_s(fn: Callable[[bytes], np.ndarray], items: list[bytes]) -> float:
    """images per CPU-second of this process (decoding is single-threaded: images/s on one
    core), so that other work sharing the cores does not count against it."""
    fn(items[0])  # warm-up: imports
    t0 = time.process_time()
    for data in items:
        fn(data)
    return len(items) / (time.process_time() - t0)


def decode_rates(members: list[tuple[str, bytes, str]], per_size: int) -> dict[str, tuple[float, float]]:
    """megapixels -> (full, fast) decode + resize images/s on one core; "mix" over the archive's sizes."""
    out: dict[str, tuple[float, float]] = {}
    for mp in MEGAPIXELS:
        items = [d for k, d, _ in members if k.endswith(f"-{mp}mp")][:per_size]
        out[f"{mp}"] = (_per_s(full_decode, items), _per_s(fast_decode, items))
    mix = [d for _, d, _ in members[: per_size * len(MEGAPIXELS)]]
    out["mix"] = (float("nan"), _per_s(fast_decode, mix))
    return out


def score_agreement(model: str, members: list[tuple[str, bytes, str]], batch_size: int) -> dict[str, Any]:
    """Scores of every archive image through both decodes: ROC AUC per score and mean |difference|."""
    from sklearn.metrics import roc_auc_score

    from detectors.columns import ANOMALY_SCORE, COLUMNS
    from jobs.bundle import ModelBundle

    bundle = ModelBundle.load(model)
    y = np.array([lbl == "defect" for _, _, lbl in members])
    full = np.stack([full_decode(d) for _, d, _ in members])
    fast = np.stack([fast_decode(d) for _, d, _ in members])
    pixel_diff = float(np.abs(full.astype(np.int16) - fast.astype(np.int16)).mean())

    def scores(x: np.ndarray) -> dict[str, np.ndarray]:
        parts = [bundle.score(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]
        return {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}

    s_full, s_fast = scores(full), scores(fast)
    rows = {}
    # each detector's columns, then the fused anomaly_score the reducer leads with
    for name in [*bundle.detectors, None]:
        for col in COLUMNS[name] if name else [ANOMALY_SCORE]:
            if col.direction is None or col.name not in s_full:
                continue
            a, b = s_full[col.name].astype(np.float64), s_fast[col.name].astype(np.float64)
            if not np.isfinite(a).all():
                continue  # a column this bundle does not produce (ae_kl without a VAE)
            sign = 1.0 if col.direction == "high" else -1.0
            rows[col.name] = {
                "auc_full": float(roc_auc_score(y, sign * a)),
                "auc_fast": float(roc_auc_score(y, sign * b)),
                "mean_abs_diff": float(np.abs(a - b).mean()),
                "std": float(a.std()),
            }
    return {"pixel_diff": pixel_diff, "columns": rows, "n": len(members), "defects": int(y.sum()), "pixels": fast}


def ceiling(model: str, pixels: np.ndarray, batch_size: int, n: int = 2048) -> tuple[float, float]:
    """bundle.score on pre-decoded uint8 (n, 64, 64, 3) batches in this process: (images/s
    wall clock, CPU seconds per image of this process, every thread counted)."""
    from jobs.bundle import ModelBundle

    bundle = ModelBundle.load(model)
    x = np.concatenate([pixels] * (n // len(pixels) + 1))[:n]
    bundle.score(x[:batch_size])  # warm-up: graph tracing is start-up, not throughput
    t0, c0 = time.perf_counter(), time.process_time()
    for start in range(0, len(x), batch_size):
        bundle.score(x[start : start + batch_size])
    return len(x) / (time.perf_counter() - t0), (time.process_time() - c0) / len(x)


def _jobs(model: str, archive: Path, root: Path, batch_size: int, workers: int | None) -> None:
    """The job on the whole archive and on its first half: CPU-ms per image beyond start-up."""
    e2e = run_job(model, archive, root / "out", batch_size, workers, per_shard=PER_SHARD)
    print(f"  {e2e['summary']}\n  peak PSS per process:\n{e2e['breakdown']}", flush=True)
    half = run_job(model, _half_archive(archive, root / "half"), root / "out-half", batch_size, workers)
    print(f"  {half['summary']}", flush=True)
    marginal = (e2e["cpu_s"] - half["cpu_s"]) / (e2e["images"] - half["images"])
    print(
        f"job: {e2e['images']} images {e2e['cpu_s']:.1f} CPU-s ({e2e['cpu_s'] / e2e['images'] * 1000:.1f} CPU-ms per "
        f"image), {half['images']} images {half['cpu_s']:.1f} CPU-s; beyond start-up {marginal * 1000:.1f} CPU-ms "
        f"per image; {e2e['job_rate']:.1f} images/s whole job; peak PSS {e2e['peak_pss'] / 2**20:.0f} MiB; "
        f"load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )


def _half_archive(archive: Path, out: Path) -> Path:
    """``out``: hard links to the first half of ``archive``'s shards (no copy)."""
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shards = sorted(archive.glob("shard-*.tar"))
    for path in shards[: len(shards) // 2]:
        os.link(path, out / path.name)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=320)
    p.add_argument("--workdir", default="/tmp/imgscan-photos")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--per-size", type=int, default=24, help="images timed per megapixel size for the decode rates")
    p.add_argument(
        "--job-only",
        action="store_true",
        help="only the two jobs (whole and half archive): CPU per image and peak PSS, for a re-run on busy cores",
    )
    args = p.parse_args()
    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1

    t = time.monotonic()
    archive = make_archive(root, args.images)
    mb = sum(f.stat().st_size for f in archive.glob("*.tar")) / 1e6
    print(f"archive: {args.images} JPEGs, {mb:.0f} MB in {archive} ({time.monotonic() - t:.0f}s)", flush=True)
    t = time.monotonic()
    model = train_bundle(root, args.epochs)
    print(f"bundle: {model} ({time.monotonic() - t:.0f}s)", flush=True)
    if args.job_only:
        _jobs(model, archive, root, args.batch_size, args.workers)
        return
    members = _members(archive)

    rates = decode_rates(members, args.per_size)
    print("decode + resize, images/s per core (full, fast): " + json.dumps(rates), flush=True)
    agree = score_agreement(model, members, args.batch_size)
    pixels = agree.pop("pixels")
    print(f"scores: {json.dumps(agree)}", flush=True)
    ceil, ceil_cpu = ceiling(model, pixels, args.batch_size)
    print(f"ceiling: {ceil:.1f} images/s, {ceil_cpu * 1000:.2f} CPU-ms per image", flush=True)
    e2e = run_job(model, archive, root / "out", args.batch_size, args.workers, per_shard=PER_SHARD)
    print(f"end-to-end: {json.dumps({k: v for k, v in e2e.items() if k not in ('summary', 'breakdown')})}", flush=True)
    print(f"  {e2e['summary']}\n  peak PSS per process:\n{e2e['breakdown']}", flush=True)
    # the same job on the first half of the shards: the difference is the CPU of the images
    # alone, without Ray's and the actors' start-up (which dominates a few hundred images)
    half = _half_archive(archive, root / "half")
    e2e_half = run_job(model, half, root / "out-half", args.batch_size, args.workers, per_shard=PER_SHARD)
    marginal_cpu = (e2e["cpu_s"] - e2e_half["cpu_s"]) / (e2e["images"] - e2e_half["images"])
    print(f"half archive: {e2e_half['summary']}; CPU {e2e_half['cpu_s']:.1f} s vs {e2e['cpu_s']:.1f} s", flush=True)
    again, again_cpu = ceiling(model, pixels, args.batch_size)  # shared cores: the better of two
    ceil, ceil_cpu = max(ceil, again), min(ceil_cpu, again_cpu)
    decode_ceiling = rates["mix"][1] * cores
    bound = min(ceil, decode_ceiling)
    # Load-robust: CPU seconds per image do not depend on what else runs on the cores. On idle
    # cores the job can reach at most cores / its CPU per image, the models cores / theirs (two
    # actors), decoding cores / its own.
    dec_cpu = 1.0 / rates["mix"][1]
    job_cpu = e2e["cpu_s"] / e2e["images"]
    load = os.getloadavg()[0]

    print()
    title = f"decode + resize to {SIZE} px, one core (JPEG q90, 4:3)"
    print(f"{title:<60} {'full':>9} {'fast':>9} {'x':>7}")
    for mp in MEGAPIXELS:
        full, fast = rates[str(mp)]
        print(f"{f'{mp} MP':<60} {full:>9.1f} {fast:>9.1f} {fast / full:>7.1f}")
    print(f"{'archive mix (2/6/12/24 MP)':<60} {'':>9} {rates['mix'][1]:>9.1f}")
    print()
    title = f"scores, {agree['n']} images ({agree['defects']} defects)"
    print(f"{title:<36} {'AUC full':>9} {'AUC fast':>9} {'|dAUC|':>8} {'mean|ds|':>10} {'/ std':>7}")
    for col, r in agree["columns"].items():
        d = abs(r["auc_full"] - r["auc_fast"])
        rel = r["mean_abs_diff"] / r["std"] if r["std"] > 0 else float("nan")
        print(
            f"{col:<36} {r['auc_full']:>9.4f} {r['auc_fast']:>9.4f} {d:>8.4f} {r['mean_abs_diff']:>10.4g} {rel:>7.3f}"
        )
    print(f"{'mean |pixel difference| of the 64 px inputs (0..255)':<56} {agree['pixel_diff']:>8.2f}")
    print()
    title = f"throughput ({SIZE} px RGB, full bundle, batch {args.batch_size}, {cores} cores), wall clock"
    print(f"{title:<60} {'images/s':>9} {'x bound':>8}")
    rows = [
        ("ceiling: bundle.score on in-memory batches, 1 process", ceil),
        (f"decode ceiling: fast decode of the mix x {cores} cores", decode_ceiling),
        # no steady-state row: with few shards the parts are committed in bursts, and the
        # first..last part rate of bench/throughput.py measures the burst, not the job
        (f"imgscan score, {e2e['images']} images, whole job", e2e["job_rate"]),
    ]
    for name, rate in rows:
        print(f"{name:<60} {rate:>9.1f} {rate / bound:>8.2f}")
    print(f"(load average {load:.1f} at the end)")
    print()
    title = "CPU-ms per image (load-robust)"
    print(f"{title:<60} {'CPU-ms':>9} {'x job':>8}")
    rows = [
        ("models: bundle.score, 1 process", ceil_cpu),
        ("decode + resize: the archive's mix, 1 process", dec_cpu),
        ("models + decode", ceil_cpu + dec_cpu),
        ("imgscan score: whole job, every process of its tree", job_cpu),
        ("imgscan score: per image beyond start-up (all - half archive)", marginal_cpu),
    ]
    for name, c in rows:
        print(f"{name:<60} {c * 1000:>9.2f} {c / job_cpu:>8.2f}")
    # the goal, in CPU terms: job rate >= 0.8 x min(model ceiling, decode ceiling)
    # with each rate taken as cores / CPU per image (whole job, and beyond start-up)
    for what, c in (("whole job", job_cpu), ("beyond start-up", marginal_cpu)):
        print(f"{f'{what}: job / min(ceilings), as cores / CPU per image':<60} {max(ceil_cpu, dec_cpu) / c:>18.2f}")
        print(f"{f'{what}: job / (models + decode), same':<60} {(ceil_cpu + dec_cpu) / c:>18.2f}")
    print(f"{'peak memory (PSS, job process tree)':<60} {e2e['peak_pss'] / 2**20:>8.0f}M")


if __name__ == "__main__":
    main()
