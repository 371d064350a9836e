"""Storage through fsspec URIs only: local paths, ``file://``, ``memory://``, ``s3://``.

Every function takes a URI plus ``storage_options`` that go straight to fsspec
(credentials and endpoints otherwise come the way every AWS tool takes them:
environment, profiles, ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import posixpath
import re
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


# -- credentials: never printed, never stored ------------------------------------------------------

#: what stands in for a credential in every message and stored text
REDACTED = "***"
#: ``scheme://user:password@host``: the user-info part of a URI (RFC 3986), which ends at the
#: first "@" before any "/" of the path
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
#: storage-option keys whose values are credentials (s3fs, gcsfs, adlfs, botocore client kwargs)
SECRET_KEYS = frozenset(
    {
        "key",
        "secret",
        "token",
        "password",
        "session_token",
        "aws_access_key_id",
        "aws_secret_access_key",
        "aws_session_token",
        "account_key",
        "sas_token",
        "client_secret",
        "connection_string",
        "access_token",
        "refresh_token",
    }
)
#: environment variables whose values are credentials (every AWS tool reads them)
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
#: shorter values are not masked: a short word ("testing", moto's default key) would be masked
#: wherever it occurs in a message; real keys and tokens are 16 characters and more
MIN_SECRET = 8
#: credentials seen in storage options this process was given (``remember_secrets``)
_secrets: set[str] = set()


def secret_values(storage_options: StorageOptions | None) -> set[str]:
    """Every credential in storage options, nested dicts included (``client_kwargs``, ...)."""
    found: set[str] = set()
    for k, v in (storage_options or {}).items():
        if isinstance(v, Mapping):
            found |= secret_values(v)
        elif isinstance(v, str) and str(k).lower() in SECRET_KEYS and len(v) >= MIN_SECRET:
            found.add(v)
    return found


def remember_secrets(storage_options: StorageOptions | None) -> None:
    """Make ``redact`` mask these storage options' credentials from now on (in this process)."""
    _secrets.update(secret_values(storage_options))


def redact(text: object, storage_options: StorageOptions | None = None) -> str:
    """``text`` with every credential replaced by ``***``: the user-info of URIs
    (``s3://KEY:SECRET@bucket`` -> ``s3://***@bucket``), the values of ``storage_options``'
    and remembered storage options' secret keys, and of the AWS_* credential variables.

    For everything that is printed or stored: log lines, error messages, ``_run.json``."""
    out = _USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", str(text))
    values = secret_values(storage_options) | _secrets
    values |= {v for name in SECRET_ENV if len(v := os.environ.get(name, "")) >= MIN_SECRET}
    for value in sorted(values, key=len, reverse=True):  # longest first: one may contain another
        out = out.replace(value, REDACTED)
    return out


def check_no_credentials(uri: str) -> str:
    """Refuse a URI that carries credentials (``s3://KEY:SECRET@bucket``): it would be copied
    into every image id, result row and log line. Returns the URI."""
    if _USERINFO.match(uri):
        raise StorageError(
            f"Credentials in a URI are not accepted ({redact(uri)}): they would be written into every result "
            "row and log line. Pass them in --storage-options or in AWS_* environment variables instead."
        )
    return uri


def filesystem(uri: str, storage_options: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path within it) for a URI; a URI with credentials in it is refused."""
    check_no_credentials(uri)
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
    tmp = None
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
        if tmp is not None:  # a file system that filled up keeps no half-written temporary
            with contextlib.suppress(OSError):
                fs.rm_file(tmp)
        raise StorageError(f"Cannot write {uri}: {e}") from e


def check_writable(uri: str, storage_options: StorageOptions | None = None) -> None:
    """Raise ``StorageError`` (one line) unless an object can be written below ``uri``: an
    empty hidden object is written there and deleted. For a job's output, before any work:
    a bucket that is missing or refuses writes must not be found after the first shard."""
    probe = join(uri, f".imgscan-write-check-{uuid.uuid4().hex}")
    try:
        write_bytes(probe, b"", storage_options)
    except StorageError as e:
        cause = e.__cause__ or e
        raise StorageError(f"Cannot write to {uri} ({type(cause).__name__}: {cause})") from e
    # a store that lets us write but not delete keeps a hidden, empty probe: no listing shows it
    with contextlib.suppress(OSError):
        remove(probe, storage_options)


def as_stored(obj: Any, storage_options: StorageOptions | None = None) -> Any:
    """``obj`` as ``write_json`` stores it and ``read_json`` gives it back: JSON types, every
    string (keys too) with its credentials masked (``redact``).

    String by string, before JSON escapes them: masking the JSON text missed a secret holding a
    quote, a backslash or a non-ASCII character (stored escaped: ``\"``, ``\u00e4``). And what a
    stored record is compared with (a resume's source URI) goes through this too, so that a
    secret that also occurs in a URI, a common word say, masks both sides alike."""
    plain = json.loads(json.dumps(obj, default=str))

    def walk(x: Any) -> Any:
        if isinstance(x, str):
            return redact(x, storage_options)
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            return {redact(k, storage_options): walk(v) for k, v in x.items()}
        return x

    return walk(plain)


def write_json(uri: str, obj: Any, storage_options: StorageOptions | None = None) -> None:
    """``obj`` as JSON, credentials masked (``as_stored``): _run.json, summaries and the like
    are read by people who need not hold the keys of the store they describe."""
    text = json.dumps(as_stored(obj, storage_options), indent=2, sort_keys=True)
    write_bytes(uri, text.encode(), storage_options)


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
