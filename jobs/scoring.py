"""The pure core of ``imgscan score`` (no Ray): shard records -> model-input rows -> result rows.

Two steps, each a function of Arrow tables so that Ray Data can move them
between processes without copying:

* ``decode_records``: the records of one shard -> tables of the bookkeeping
  columns plus the decoded, resized pixels (``_pixels``, fixed-size binary of
  ``size * size * channels`` bytes) and two internal columns: ``_seq`` (the
  record's position in its shard, for a stable row order) and ``_shard_n``
  (the shard's input count, known only once the shard has been read, so it is
  set on the rows of the last table and -1 before).
* ``score_table``: such a table -> the columns of ``RESULT_SCHEMA`` (plus the
  two internal ones): ok rows are scored by the bundle in one call, error rows
  pass through with null scores.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from detectors.preprocessing import resize_uint8
from jobs.bundle import ModelBundle
from jobs.images import DRAFT_MARGIN, MAX_BYTES, MAX_PIXELS, decode_image
from jobs.schema import BOOKKEEPING, RESULT_SCHEMA, TRAILER
from jobs.sources import Record

PIXELS = "_pixels"
SEQ = "_seq"
SHARD_N = "_shard_n"
INTERNAL = (SEQ, SHARD_N)

#: rows per decoded table: bounds the memory of a shard in flight whatever the shard's size
DECODE_CHUNK = 256

SCORE_FIELDS: tuple[pa.Field, ...] = tuple(
    f for f in RESULT_SCHEMA if f.name not in BOOKKEEPING.names and f.name not in TRAILER.names
)


def decoded_schema(size: int, channels: int) -> pa.Schema:
    """Bookkeeping columns + ``_pixels`` (uint8 (size, size, channels) as bytes) + ``_seq``, ``_shard_n``."""
    return pa.schema(
        [
            *BOOKKEEPING,
            pa.field(PIXELS, pa.binary(size * size * channels), nullable=False),
            pa.field(SEQ, pa.int64(), nullable=False),
            pa.field(SHARD_N, pa.int64(), nullable=False),
        ]
    )


def decode_record(
    rec: Record, size: int, channels: int, *, max_pixels: int = MAX_PIXELS, max_bytes: int = MAX_BYTES
) -> dict[str, Any]:
    """One record -> {status, error, width, height, pixels}; pixels is uint8
    (size, size, channels) for status "ok", None for "error".

    A JPEG is decoded at the DCT scale that still leaves ``DRAFT_MARGIN * size`` pixels
    on its short side (and as luma alone for a gray model), then resized as any image.
    """
    if rec.error is not None:
        return {"status": "error", "error": rec.error, "width": None, "height": None, "pixels": None}
    dec = decode_image(
        rec.data, max_pixels=max_pixels, max_bytes=max_bytes, min_size=DRAFT_MARGIN * size, gray=channels == 1
    )
    if dec.pixels is None:
        return {"status": "error", "error": dec.error, "width": dec.width, "height": dec.height, "pixels": None}
    try:
        pixels = resize_uint8(dec.pixels, size, channels)
    except ValueError as e:  # e.g. a 1-pixel-wide image PIL opened but cannot resample
        return {"status": "error", "error": f"cannot resize: {e}", "width": dec.width, "height": dec.height}
    return {"status": "ok", "error": None, "width": dec.width, "height": dec.height, "pixels": pixels}


def decode_records(
    records: Iterable[Record],
    shard_uri: str,
    size: int,
    channels: int,
    *,
    chunk_rows: int = DECODE_CHUNK,
    max_pixels: int = MAX_PIXELS,
    max_bytes: int = MAX_BYTES,
) -> Iterator[pa.Table]:
    """The records of ONE shard -> tables of ``decoded_schema(size, channels)``
    with at most ``chunk_rows`` rows each, in record order.

    Streaming: only one chunk of decoded pixels is held at a time. The rows of
    the last table carry the shard's input count in ``_shard_n``; a shard
    without records yields nothing.
    """
    schema = decoded_schema(size, channels)
    blank = bytes(size * size * channels)
    rows: list[dict[str, Any]] = []
    seq = 0
    for rec in records:
        if len(rows) == chunk_rows:  # more follow: this chunk does not end the shard
            yield _decoded_table(rows, schema, blank, -1)
            rows = []
        d = decode_record(rec, size, channels, max_pixels=max_pixels, max_bytes=max_bytes)
        rows.append(
            {
                "image_id": rec.image_id,
                "shard": shard_uri,
                "shard_id": rec.shard_id,
                "member": rec.member,
                "label": rec.label,
                "status": d["status"],
                "error": d["error"],
                "width": d["width"],
                "height": d["height"],
                PIXELS: d.get("pixels"),
                SEQ: seq,
            }
        )
        seq += 1
    if rows:
        yield _decoded_table(rows, schema, blank, seq)


def _decoded_table(rows: list[dict[str, Any]], schema: pa.Schema, blank: bytes, shard_n: int) -> pa.Table:
    cols: dict[str, Any] = {f.name: [r.get(f.name) for r in rows] for f in BOOKKEEPING}
    # error rows get zero pixels (never read) so that the column stays one flat buffer
    cols[PIXELS] = [blank if r[PIXELS] is None else r[PIXELS].tobytes() for r in rows]
    cols[SEQ] = [r[SEQ] for r in rows]
    cols[SHARD_N] = [shard_n] * len(rows)
    return pa.Table.from_pydict(cols, schema=schema)


def pixels_of(table: pa.Table, size: int, channels: int) -> np.ndarray:
    """The ``_pixels`` column as uint8 (n, size, size, channels), without a copy when possible."""
    col = table.column(PIXELS)
    arr = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    width = size * size * channels
    n = len(arr)
    if n == 0:
        return np.zeros((0, size, size, channels), np.uint8)
    buf = arr.buffers()[1]
    flat = np.frombuffer(buf, dtype=np.uint8, count=n * width, offset=arr.offset * width)
    return flat.reshape(n, size, size, channels)


def score_table(bundle: ModelBundle, table: pa.Table, *, run_id: str, scored_at: dt.datetime | None = None) -> pa.Table:
    """A decoded table -> RESULT_SCHEMA columns + ``_seq``, ``_shard_n``.

    ``bundle.score`` is called once on the uint8 (n_ok, s, s, c) pixels of the
    ok rows; a detector absent from the bundle leaves its columns null, and so
    do error rows.
    """
    n = table.num_rows
    ok = np.asarray(table.column("status").to_numpy(zero_copy_only=False) == "ok", dtype=bool)
    idx = np.flatnonzero(ok)
    scores: dict[str, Any] = {}
    if len(idx):
        pixels = pixels_of(table, bundle.input_size, bundle.channels)
        scores = bundle.score(pixels[idx] if len(idx) < n else pixels)
    columns: dict[str, pa.Array | pa.ChunkedArray] = {f.name: table.column(f.name) for f in BOOKKEEPING}
    for f in SCORE_FIELDS:
        columns[f.name] = _scatter(scores.get(f.name), idx, n, f.type) if f.name in scores else pa.nulls(n, f.type)
    when = scored_at or dt.datetime.now(dt.UTC)
    columns["model_version"] = pa.array([bundle.version] * n, pa.string())
    columns["run_id"] = pa.array([run_id] * n, pa.string())
    columns["scored_at"] = pa.array([when] * n, pa.timestamp("us", tz="UTC"))
    for name in INTERNAL:
        columns[name] = table.column(name)
    fields = [*RESULT_SCHEMA, *(table.schema.field(name) for name in INTERNAL)]
    return pa.Table.from_pydict(columns, schema=pa.schema(fields))


def _scatter(values: Any, idx: np.ndarray, n: int, type_: pa.DataType) -> pa.Array:
    """Values of the ok rows (positions ``idx``) -> an array of length n, null elsewhere."""
    mask = np.ones(n, dtype=bool)
    mask[idx] = False
    if pa.types.is_list(type_):
        maps = np.asarray(values, dtype=np.float32).reshape(len(idx), -1)  # (n_ok, h*w)
        lengths = np.zeros(n, dtype=np.int32)
        lengths[idx] = maps.shape[1]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
        return pa.ListArray.from_arrays(
            pa.array(offsets), pa.array(maps.reshape(-1), pa.float32()), mask=pa.array(mask), type=type_
        )
    if pa.types.is_string(type_):
        out: list[str | None] = [None] * n
        for i, v in zip(idx, values, strict=True):
            out[i] = None if v is None else str(v)
        return pa.array(out, type_)
    full = np.zeros(n, dtype=type_.to_pandas_dtype())
    full[idx] = np.asarray(values, dtype=full.dtype)
    return pa.array(full, type_, mask=mask)


def finish_part(tables: list[pa.Table]) -> pa.Table:
    """Scored tables of one shard -> its part: rows in record order, exactly RESULT_SCHEMA."""
    table = pa.concat_tables(tables).sort_by(SEQ) if tables else RESULT_SCHEMA.empty_table()
    return table.select(RESULT_SCHEMA.names).cast(RESULT_SCHEMA)
