"""Image sources and their shards.

A source is a URI (``file://``, ``s3://``, ``memory://``, or a local path) of one of:

* a folder/prefix of image files; class subfolders give a ``label``
  (Keras ``image_dataset_from_directory`` convention);
* WebDataset tar shards (``*.tar``, ``*.tar.gz``): members ``KEY.png|jpg|...``
  with optional ``KEY.cls`` / ``KEY.json`` (a ``label``/``cls`` field) labels;
* Parquet files with an image-bytes column (and optional id / label columns).

``list_items`` lists its inputs (archives or image files, with their versions);
``list_shards`` groups them into a manifest of ``Shard`` rows -- the unit of
work, of commit and of resume -- before any cluster work starts;
``read_shard`` yields one ``Record`` per input image of a shard, bytes included.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import posixpath
import tarfile
import time
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.images import MAX_BYTES, too_large
from jobs.storage import StorageError, StorageOptions, filesystem, list_files, qualify, redact, version_tag

IMAGE_EXTENSIONS = frozenset(
    {"png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm", "pbm", "pnm", "ico", "jp2"}
)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet", ".pq")
IMAGE_COLUMNS = ("image", "image_bytes", "bytes", "img", "jpg", "png", "content")
ID_COLUMNS = ("image_id", "id", "key", "__key__", "path", "filename")
LABEL_COLUMNS = ("label", "class", "cls", "target")
FILES_PER_SHARD = 1000
#: rows of a Parquet file decoded at once: the bytes of one such batch are held in memory
PARQUET_BATCH_ROWS = 256


class SourceError(ValueError):
    """The source cannot be used (missing, empty, unknown layout)."""


class TransientReadError(StorageError):
    """The store stopped answering while a shard was read, and kept silent for the whole
    retry budget. Not bad data: the shard must stay uncommitted (to be read again on
    resume), never become error rows."""


#: seconds a read keeps retrying a store that does not answer before the shard fails with
#: ``TransientReadError`` (env IMGSCAN_IO_RETRY_S overrides it, e.g. for tests)
IO_RETRY_S = 120.0
#: first pause between retries; doubled after each failure, up to IO_RETRY_MAX_PAUSE_S
IO_RETRY_PAUSE_S = 0.5
IO_RETRY_MAX_PAUSE_S = 8.0


def io_retry_s() -> float:
    return float(os.environ.get("IMGSCAN_IO_RETRY_S", IO_RETRY_S))


#: errors that say something about the object itself (gone, forbidden), not the store's health:
#: these are the object's result, never retried
OBJECT_ERRORS: tuple[type[BaseException], ...] = (FileNotFoundError, PermissionError, IsADirectoryError)


class _RetryingFile(io.RawIOBase):
    """A read-only file of a store that reopens itself at the same offset when the store
    stops answering, for up to ``io_retry_s()`` seconds in a row (then ``TransientReadError``).

    ``fs.open`` files of object stores read over the network; a connection refused or reset
    midway would otherwise surface inside tarfile or pyarrow as if the archive were corrupt.
    """

    def __init__(self, fs: Any, path: str, uri: str) -> None:
        super().__init__()
        self._fs, self._path, self._uri = fs, path, uri
        self._pos = 0
        self._f: Any = None
        self._f = self._retry(lambda: fs.open(path, "rb"))

    def _retry(self, op: Any) -> Any:
        deadline, pause = time.monotonic() + io_retry_s(), IO_RETRY_PAUSE_S
        while True:
            try:
                if self._f is None:
                    self._f = self._fs.open(self._path, "rb")
                    self._f.seek(self._pos)
                return op()
            except OBJECT_ERRORS:
                raise
            except Exception as e:
                if time.monotonic() + pause > deadline:
                    raise TransientReadError(
                        f"{self._uri}: the store stopped answering at byte {self._pos} and still did not answer "
                        f"after {io_retry_s():g}s of retries ({type(e).__name__}: {e})"
                    ) from e
                self._drop()
                time.sleep(pause)
                pause = min(2 * pause, IO_RETRY_MAX_PAUSE_S)

    def _drop(self) -> None:
        f, self._f = self._f, None
        if f is not None:
            # a file of a store that is gone may fail to close: it is dropped anyway
            with contextlib.suppress(Exception):
                f.close()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._retry(lambda: self._f.read(len(buffer)))
        n = len(data)
        buffer[:n] = data
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = 0) -> int:
        self._pos = int(self._retry(lambda: self._f.seek(offset, whence)))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def close(self) -> None:
        self._drop()
        super().close()


@dataclass(frozen=True)
class Shard:
    """One unit of work: a tar file, a Parquet file, or a group of image files."""

    shard_id: str  # stable, filename-safe: names the committed part file
    uri: str  # the tar/Parquet file, or the folder of a group of files
    kind: str  # "files" | "tar" | "parquet"
    size: int  # bytes
    version: str  # etag or mtime:size of the file(s)
    members: tuple[str, ...] = ()  # for "files": the file URIs of this group
    labels: tuple[str | None, ...] = ()  # for "files": their labels

    def to_row(self) -> dict[str, Any]:
        return {
            "shard_id": self.shard_id,
            "uri": self.uri,
            "kind": self.kind,
            "size": self.size,
            "version": self.version,
            "members": json.dumps(self.members),
            "labels": json.dumps(self.labels),
        }

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Shard:
        return cls(
            shard_id=str(row["shard_id"]),
            uri=str(row["uri"]),
            kind=str(row["kind"]),
            size=int(row["size"]),
            version=str(row["version"]),
            members=tuple(json.loads(row["members"])),
            labels=tuple(json.loads(row["labels"])),
        )


@dataclass
class Record:
    """One input image: its id, bytes (or a read error) and label."""

    image_id: str
    shard_id: str
    member: str
    data: bytes | None
    label: str | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _suffix_kind(name: str) -> str | None:
    low = name.lower()
    if low.endswith(TAR_SUFFIXES):
        return "tar"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if low.rsplit(".", 1)[-1] in IMAGE_EXTENSIONS:
        return "image"
    return None


def _shard_id(*parts: str) -> str:
    return hashlib.sha1("\x00".join(parts).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Item:
    """One input a source lists: an archive (tar or Parquet file) or one image file.

    What the nightly scan's ledger compares from night to night (uri + version).
    """

    uri: str
    kind: str  # "tar" | "parquet" | "image"
    size: int
    version: str  # etag, or mtime:size
    folder: str = ""  # image files: the URI of the folder whose images form shards together
    label: str | None = None  # image files: the class folder's name


def list_items(source: str, storage_options: StorageOptions | None = None) -> list[Item]:
    """Every input of a source, sorted by URI. Raises ``SourceError`` for a missing or
    empty source, or one that mixes archives with loose images, and ``StorageError`` (one
    line) for a store that cannot be reached."""
    try:
        return _list_items(source, storage_options)
    except (SourceError, StorageError):
        raise
    except Exception as e:  # botocore/aiohttp errors are no OSError: one line, not a traceback
        raise StorageError(f"Cannot list {source}: {type(e).__name__}: {e}") from e


def _list_items(source: str, storage_options: StorageOptions | None) -> list[Item]:
    fs, root = filesystem(source, storage_options)
    if fs.isfile(root):
        infos = [{**fs.info(root), "name": qualify(fs, root), "path": root}]
        root = posixpath.dirname(root)
    else:
        if not fs.exists(root):
            raise SourceError(f"Source not found: {source}")
        infos = list_files(source, storage_options)
    kinds: dict[str, list[dict[str, Any]]] = {"tar": [], "parquet": [], "image": []}
    for info in infos:
        kind = _suffix_kind(info["path"])
        if kind:
            kinds[kind].append(info)
    archives = kinds["tar"] + kinds["parquet"]
    if archives and kinds["image"]:
        # Silently scanning only one of the two would drop inputs.
        raise SourceError(
            f"Source {source} mixes {len(archives)} tar/Parquet file(s) with {len(kinds['image'])} loose "
            f"image file(s) (e.g. {kinds['image'][0]['name']}); point --source at a prefix that holds one kind."
        )
    if archives:
        return sorted(
            (
                Item(info["name"], _suffix_kind(info["path"]) or "", int(info.get("size") or 0), version_tag(info))
                for info in archives
            ),
            key=lambda i: i.uri,
        )
    if not kinds["image"]:
        seen = f"{len(infos)} files, none an image, tar or Parquet file" if infos else "no files"
        raise SourceError(f"Source is empty: {source} ({seen})")
    root_len = len(root.rstrip("/")) + 1
    items = []
    for info in kinds["image"]:
        rel = info["path"][root_len:]
        label = rel.split("/", 1)[0] if "/" in rel else None
        folder = qualify(fs, posixpath.join(root, label)) if label else qualify(fs, root)
        items.append(Item(info["name"], "image", int(info.get("size") or 0), version_tag(info), folder, label))
    return sorted(items, key=lambda i: i.uri)


def group_shards(items: Sequence[Item], *, files_per_shard: int = FILES_PER_SHARD) -> list[Shard]:
    """Items -> shards: an archive is a shard; image files form shards of up to
    ``files_per_shard`` in name order, per class folder."""
    shards = [
        Shard(shard_id=_shard_id(i.uri), uri=i.uri, kind=i.kind, size=i.size, version=i.version)
        for i in items
        if i.kind != "image"
    ]
    groups: dict[tuple[str, str | None], list[Item]] = {}
    for i in items:
        if i.kind == "image":
            groups.setdefault((i.folder, i.label), []).append(i)
    for (folder, label), members in sorted(groups.items(), key=lambda kv: (kv[0][1] or "", kv[0][0])):
        members = sorted(members, key=lambda i: i.uri)
        for start in range(0, len(members), files_per_shard):
            chunk = members[start : start + files_per_shard]
            names = tuple(m.uri for m in chunk)
            shards.append(
                Shard(
                    shard_id=_shard_id(*names),
                    uri=folder,
                    kind="files",
                    size=sum(m.size for m in chunk),
                    version=_shard_id(*(m.version for m in chunk)),
                    members=names,
                    labels=(label,) * len(chunk),
                )
            )
    return shards


def list_shards(
    source: str, storage_options: StorageOptions | None = None, *, files_per_shard: int = FILES_PER_SHARD
) -> list[Shard]:
    """The manifest of a source (``list_items`` grouped by ``group_shards``).

    Raises ``SourceError`` for a missing or empty source. A folder may hold tar
    shards, Parquet files or image files (not a mix of archive and loose images).
    """
    return group_shards(list_items(source, storage_options), files_per_shard=files_per_shard)


def read_shard(
    shard: Shard, storage_options: StorageOptions | None = None, *, max_bytes: int = MAX_BYTES
) -> Iterator[Record]:
    """Every input image of a shard, in a stable order; what is wrong with the data is a
    record with an ``error`` (undecodable, gone, over ``max_bytes``: such a member or file
    is not read into memory), but a store that stops answering is retried for
    ``io_retry_s()`` seconds and then raises ``TransientReadError``: that is not a result.

    Ids are unique within the shard: a member name that occurs again (a tar may
    hold the same name twice, a Parquet id column may repeat) gets ``@2``, ``@3``
    ... appended in reading order, so each input stays one row.
    """
    if shard.kind == "files":
        records = _read_files(shard, storage_options, max_bytes)
    elif shard.kind == "tar":
        records = _read_tar(shard, storage_options, max_bytes)
    elif shard.kind == "parquet":
        records = _read_parquet(shard, storage_options)
    else:
        raise SourceError(f"Unknown shard kind {shard.kind!r} for {shard.uri}")
    seen: dict[str, int] = {}
    for rec in records:
        if rec.error is not None:  # a store's message may quote what it was given
            rec.error = redact(rec.error, storage_options)
        k = seen.get(rec.image_id, 0) + 1
        seen[rec.image_id] = k
        if k > 1:
            rec.image_id, rec.member = f"{rec.image_id}@{k}", f"{rec.member}@{k}"
        yield rec


#: files fetched at once from one folder shard: s3fs fetches them concurrently,
#: and a chunk bounds the bytes held in memory
FETCH_CHUNK = 64


def _read_files(shard: Shard, storage_options: StorageOptions | None, max_bytes: int) -> Iterator[Record]:
    fs, _ = filesystem(shard.members[0] if shard.members else shard.uri, storage_options)
    labels: Sequence[str | None] = shard.labels or (None,) * len(shard.members)
    pairs = list(zip(shard.members, labels, strict=True))
    for start in range(0, len(pairs), FETCH_CHUNK):
        chunk = pairs[start : start + FETCH_CHUNK]
        paths = [filesystem(uri, storage_options)[1] for uri, _ in chunk]
        for (uri, label), data in zip(chunk, _fetch(fs, paths, max_bytes), strict=True):
            member = posixpath.basename(uri)
            if isinstance(data, BaseException):
                yield Record(uri, shard.shard_id, member, None, label, f"read failed: {type(data).__name__}: {data}")
            elif len(data) > max_bytes:  # one byte more than the limit was asked for: over it
                yield Record(uri, shard.shard_id, member, None, label, too_large(None, max_bytes))
            else:
                yield Record(uri, shard.shard_id, member, bytes(data), label)


def _fetch(fs: Any, paths: list[str], max_bytes: int) -> list[Any]:
    """The bytes of each path (at most ``max_bytes + 1``: a larger file is not read whole),
    or the object's own error (gone, forbidden); a store that does not answer is retried
    for ``io_retry_s()`` seconds, then ``TransientReadError``."""
    out: list[Any] = [None] * len(paths)
    todo = list(range(len(paths)))
    deadline, pause = time.monotonic() + io_retry_s(), IO_RETRY_PAUSE_S
    while True:
        try:
            # cat_ranges, not cat: concurrent GETs on object stores, results in order,
            # per-file errors returned, and no glob expansion of names like "a[1].png"
            got: list[Any] = fs.cat_ranges(
                [paths[i] for i in todo], [0] * len(todo), [max_bytes + 1] * len(todo), on_error="return"
            )
        except Exception as e:  # the whole call failed: each file is sorted below by its error
            got = [e] * len(todo)
        failed = []
        for i, value in zip(todo, got, strict=True):
            if isinstance(value, OSError) and value.errno == errno.EINVAL:
                # S3 answers a range of an empty object with 416 (s3fs: EINVAL): read it whole,
                # it holds nothing
                try:
                    value = fs.cat_file(paths[i])
                except Exception as e:
                    value = e
            if isinstance(value, BaseException) and not isinstance(value, OBJECT_ERRORS):
                failed.append((i, value))
            else:
                out[i] = value
        if not failed:
            return out
        if time.monotonic() + pause > deadline:
            i, err = failed[0]
            raise TransientReadError(
                f"{paths[i]} and {len(failed) - 1} other file(s): the store did not answer for "
                f"{io_retry_s():g}s of retries ({type(err).__name__}: {err})"
            ) from err
        todo = [i for i, _ in failed]
        time.sleep(pause)
        pause = min(2 * pause, IO_RETRY_MAX_PAUSE_S)


def _tar_label(files: dict[str, bytes]) -> str | None:
    if "cls" in files:
        return files["cls"].decode("utf-8", "replace").strip() or None
    if "json" in files:
        try:
            meta = json.loads(files["json"])
        except ValueError:
            return None
        if isinstance(meta, dict):
            for key in ("label", "cls", "class"):
                if meta.get(key) is not None:
                    return str(meta[key])
    return None


def _tar_refusal(info: tarfile.TarInfo, max_bytes: int) -> str | None:
    """Why an image-named tar member is not read (None: it is read). Members are read into
    memory, never extracted to disk, so ``../`` and absolute names reach no file."""
    if info.issym() or info.islnk():
        return f"tar member is a link to {info.linkname!r}, not an image: links are not followed"
    if not info.isfile():
        return "tar member is not a regular file"
    if info.size > max_bytes:
        return too_large(info.size, max_bytes)
    return None


def _read_tar(shard: Shard, storage_options: StorageOptions | None, max_bytes: int = MAX_BYTES) -> Iterator[Record]:
    """WebDataset convention: consecutive members sharing a key (the name up to
    the first dot of the basename) form one sample. Streaming: one sample in memory.

    Members with an image extension are inputs: each is one record, also when it cannot be
    read (a link, over ``max_bytes``); an archive inside the archive is one error record
    (it is not unpacked). Other members (``.cls``, ``.json``, ...) are labels or ignored."""
    fs, path = filesystem(shard.uri, storage_options)

    def emit(key: str, files: dict[str, bytes | None], names: dict[str, str]) -> Iterator[Record]:
        label = _tar_label({e: d for e, d in files.items() if d is not None})
        for ext, data in files.items():
            kind = _suffix_kind(f"x.{ext}")
            if kind in ("image", "tar", "parquet"):
                member = names[ext]
                error = refused.pop(member, None)
                if kind != "image":
                    error = "archive inside the archive: not unpacked (list it as a shard of its own)"
                yield Record(f"{shard.uri}#{member}", shard.shard_id, member, None if error else data, label, error)

    key: str | None = None
    last: str | None = None  # the last sample emitted, to say where a broken archive broke
    files: dict[str, bytes | None] = {}
    names: dict[str, str] = {}
    refused: dict[str, str] = {}  # member name -> why it was not read
    try:
        with _RetryingFile(fs, path, shard.uri) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                d, base = posixpath.split(info.name)
                if base.startswith(".") or info.isdir():
                    continue
                k, _, ext = base.partition(".")
                if not info.isfile() and _suffix_kind(base) != "image":
                    continue
                k = posixpath.join(d, k)
                if k != key:
                    if key is not None:
                        yield from emit(key, files, names)
                        last = key
                    key, files, names = k, {}, {}
                why = _tar_refusal(info, max_bytes) if _suffix_kind(base) == "image" else None
                if why is not None:
                    refused[info.name] = why
                    files[ext] = None
                else:
                    fobj = tar.extractfile(info) if info.isfile() else None
                    files[ext] = fobj.read() if fobj else b""
                names[ext] = info.name
            if key is not None:
                yield from emit(key, files, names)
                last, key, files = key, None, {}
            if path.lower().endswith(".tar") and not _has_end_marker(f):
                # tarfile takes a cut exactly at a block boundary for the end of the
                # archive: without this check the members after the cut vanish silently
                raise tarfile.ReadError("truncated (no end-of-archive marker)")
    except TransientReadError:
        raise  # not the archive's fault: the shard stays uncommitted and is read again
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        # The members read so far were yielded; the rest of a broken archive is one error row.
        if key is not None and files:
            yield from emit(key, files, names)
            last = key
        yield Record(
            f"{shard.uri}#<unreadable>",
            shard.shard_id,
            "<unreadable>",
            None,
            None,
            f"tar archive unreadable after {last or 'start'}: {e}",
        )


def _has_end_marker(f: Any) -> bool:
    """A POSIX tar ends with two zero blocks (then zero padding)."""
    size = f.seek(0, 2)
    if size < 1024:
        return False
    f.seek(size - 1024)
    return bool(f.read(1024) == bytes(1024))


def _pick(columns: Sequence[str], candidates: Sequence[str]) -> str | None:
    lower = {c.lower(): c for c in columns}
    return next((lower[c] for c in candidates if c in lower), None)


def _read_parquet(shard: Shard, storage_options: StorageOptions | None) -> Iterator[Record]:
    fs, path = filesystem(shard.uri, storage_options)
    try:
        with _RetryingFile(fs, path, shard.uri) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            image_col = _pick(names, IMAGE_COLUMNS)
            if image_col is None:
                binary = [
                    n
                    for n in names
                    if pa.types.is_binary(pf.schema_arrow.field(n).type)
                    or pa.types.is_large_binary(pf.schema_arrow.field(n).type)
                ]
                image_col = binary[0] if len(binary) == 1 else None
            if image_col is None:
                raise SourceError(
                    f"{shard.uri}: no image-bytes column found. Expected one of {list(IMAGE_COLUMNS)} "
                    f"or a single binary column. Received columns: {names}."
                )
            id_col, label_col = _pick(names, ID_COLUMNS), _pick(names, LABEL_COLUMNS)
            cols = [c for c in (image_col, id_col, label_col) if c]
            row = 0
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=cols):
                d = batch.to_pydict()
                for i, value in enumerate(d[image_col]):
                    if isinstance(value, dict):  # Hugging Face style {"bytes": ..., "path": ...}
                        value = value.get("bytes")
                    member = str(d[id_col][i]) if id_col and d[id_col][i] is not None else f"row{row}"
                    label = d[label_col][i] if label_col else None
                    error = None
                    if value is None:
                        error = f"no image: column {image_col!r} is null in this row"
                    elif not isinstance(value, bytes):
                        error = f"no image: column {image_col!r} holds {type(value).__name__}, not bytes"
                    yield Record(
                        f"{shard.uri}#{member}",
                        shard.shard_id,
                        member,
                        None if error else value,
                        None if label is None else str(label),
                        error,
                    )
                    row += 1
    except SourceError as e:
        yield Record(f"{shard.uri}#<unreadable>", shard.shard_id, "<unreadable>", None, None, str(e))
    except TransientReadError:
        raise  # not the file's fault: the shard stays uncommitted and is read again
    except (OSError, pa.ArrowException) as e:
        yield Record(
            f"{shard.uri}#<unreadable>", shard.shard_id, "<unreadable>", None, None, f"parquet file unreadable: {e}"
        )
