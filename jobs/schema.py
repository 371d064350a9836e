"""The one Parquet schema of scoring results, declared here and nowhere else.

Bookkeeping columns, then every score column every detector declares (a
detector absent from a bundle leaves its columns null), so results of all runs
share one schema and a reader never has to guess.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from detectors.base import Direction
from detectors.columns import ANOMALY_SCORE, COLUMNS
from detectors.fusion import DIRECTIONS

_ARROW_TYPES: dict[str, pa.DataType] = {
    "float32": pa.float32(),
    "float64": pa.float64(),
    "int32": pa.int32(),
    "string": pa.string(),
    "list<float32>": pa.list_(pa.float32()),
}

BOOKKEEPING = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),  # source URI + member: unique and stable
        pa.field("shard", pa.string(), nullable=False),  # the shard's URI
        pa.field("shard_id", pa.string(), nullable=False),
        pa.field("member", pa.string(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("status", pa.string(), nullable=False),  # "ok" | "error"
        pa.field("error", pa.string()),  # the reason, for status="error"
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
    ]
)

TRAILER = pa.schema(
    [
        pa.field("model_version", pa.string(), nullable=False),
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("scored_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


def _score_fields() -> list[pa.Field]:
    """The fused ``anomaly_score`` first (what a reader should look at), then each detector's columns."""
    groups = [("fusion", (ANOMALY_SCORE,)), *COLUMNS.items()]
    return [
        pa.field(
            col.name,
            _ARROW_TYPES[col.dtype],
            metadata={"detector": detector, "direction": col.direction or "", "description": col.description},
        )
        for detector, columns in groups
        for col in columns
    ]


RESULT_SCHEMA: pa.Schema = pa.schema([*BOOKKEEPING, *_score_fields(), *TRAILER])

#: score column -> the side that is anomalous ("high" or "low")
SCORE_DIRECTIONS: dict[str, Direction] = {ANOMALY_SCORE.name: "high", **DIRECTIONS}


def to_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows (dicts with any subset of the schema's columns) -> a table of RESULT_SCHEMA."""
    columns = {name: [r.get(name) for r in rows] for name in RESULT_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=RESULT_SCHEMA)
