"""Storage through fsspec URIs only: local paths, ``file://``, ``memory://``, ``s3://``.

Every function takes a URI plus ``storage_options`` that go straight to fsspec
(credentials and endpoints otherwise come the way every AWS tool takes them:
environment, profiles, ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from collections.abc import Mapping
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.core import url_to_fs

StorageOptions = Mapping[str, Any]


class StorageError(OSError):
    """A URI could not be read or written; the message says which and why."""


def filesystem(uri: str, storage_options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URI."""
    try:
        return url_to_fs(uri, **dict(storage_options or {}))
    except (ImportError, ValueError) as e:
        raise StorageError(f"Cannot open {uri!r}: {e}") from e


def qualify(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The full URI of a path on ``fs`` (``file:///abs``, ``s3://b/k``, ``memory:///p``)."""
    return str(fs.unstrip_protocol(path))


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a URI without touching the scheme."""
    out = uri.rstrip("/")
    for p in parts:
        out = posixpath.join(out, p.strip("/"))
    return out


def exists(uri: str, storage_options: StorageOptions | None = None) -> bool:
    fs, path = filesystem(uri, storage_options)
    return bool(fs.exists(path))


def read_bytes(uri: str, storage_options: StorageOptions | None = None) -> bytes:
    fs, path = filesystem(uri, storage_options)
    try:
        return bytes(fs.cat_file(path))
    except FileNotFoundError as e:
        raise StorageError(f"No such file: {uri}") from e
    except OSError as e:
        raise StorageError(f"Cannot read {uri}: {e}") from e


def read_json(uri: str, storage_options: StorageOptions | None = None) -> Any:
    return json.loads(read_bytes(uri, storage_options))


def write_bytes(uri: str, data: bytes, storage_options: StorageOptions | None = None) -> None:
    """Write a whole object so that readers see the old state or the new, never half.

    Object stores (s3, gcs, memory) make a single put atomic. On a local or
    other file system the data goes to a hidden temporary name in the same
    folder first and is then renamed over the target (atomic on POSIX).
    """
    fs, path = filesystem(uri, storage_options)
    parent = posixpath.dirname(path)
    try:
        if _is_local(fs):
            fs.makedirs(parent, exist_ok=True)
            tmp = posixpath.join(parent, f".tmp-{uuid.uuid4().hex}-{posixpath.basename(path)}")
            with fs.open(tmp, "wb") as f:
                f.write(data)
            fs.mv(tmp, path)
        else:
            if parent and not _is_object_store(fs):
                fs.makedirs(parent, exist_ok=True)
            fs.pipe_file(path, data)
    except OSError as e:
        raise StorageError(f"Cannot write {uri}: {e}") from e


def write_json(uri: str, obj: Any, storage_options: StorageOptions | None = None) -> None:
    write_bytes(uri, json.dumps(obj, indent=2, sort_keys=True, default=str).encode(), storage_options)


def list_files(uri: str, storage_options: StorageOptions | None = None) -> list[dict[str, Any]]:
    """Every file below a prefix, recursively, sorted by name: fsspec info dicts
    with ``name`` replaced by the full URI. Hidden files (``.x``) are skipped."""
    fs, path = filesystem(uri, storage_options)
    try:
        found = fs.find(path, detail=True)
    except FileNotFoundError:
        return []
    out = []
    for p, info in sorted(found.items()):
        if info.get("type") == "directory" or posixpath.basename(p).startswith("."):
            continue
        out.append({**info, "name": qualify(fs, p), "path": p})
    return out


def version_tag(info: Mapping[str, Any]) -> str:
    """What identifies one version of a file: etag on object stores, mtime+size else."""
    for key in ("ETag", "etag", "md5"):
        if info.get(key):
            return str(info[key]).strip('"')
    mtime = info.get("mtime") or info.get("LastModified") or info.get("created") or ""
    return f"{mtime}:{info.get('size', '')}"


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in _protocols(fs)


def _is_object_store(fs: fsspec.AbstractFileSystem) -> bool:
    return bool(_protocols(fs) & {"s3", "s3a", "gs", "gcs", "abfs", "az", "memory"})


def _protocols(fs: fsspec.AbstractFileSystem) -> set[str]:
    p = fs.protocol
    return set(p) if isinstance(p, tuple | list) else {p}


def write_parquet(uri: str, table: pa.Table, storage_options: StorageOptions | None = None) -> None:
    """A table as one Parquet object, written whole (``write_bytes``)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(uri, buf.getvalue(), storage_options)


def read_parquet(uri: str, storage_options: StorageOptions | None = None) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(uri, storage_options)))


def remove(uri: str, storage_options: StorageOptions | None = None) -> None:
    """Delete one file; a file already gone is fine (callers are idempotent)."""
    fs, path = filesystem(uri, storage_options)
    try:
        fs.rm_file(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StorageError(f"Cannot delete {uri}: {e}") from e
