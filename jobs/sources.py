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

import hashlib
import json
import posixpath
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from jobs.storage import StorageOptions, filesystem, list_files, qualify, version_tag

IMAGE_EXTENSIONS = frozenset(
    {"png", "jpg", "jpeg", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm", "pbm", "pnm", "ico", "jp2"}
)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet", ".pq")
IMAGE_COLUMNS = ("image", "image_bytes", "bytes", "img", "jpg", "png", "content")
ID_COLUMNS = ("image_id", "id", "key", "__key__", "path", "filename")
LABEL_COLUMNS = ("label", "class", "cls", "target")
FILES_PER_SHARD = 1000


class SourceError(ValueError):
    """The source cannot be used (missing, empty, unknown layout)."""


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
    empty source, or one that mixes archives with loose images."""
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


def read_shard(shard: Shard, storage_options: StorageOptions | None = None) -> Iterator[Record]:
    """Every input image of a shard, in a stable order; read failures are records too.

    Ids are unique within the shard: a member name that occurs again (a tar may
    hold the same name twice, a Parquet id column may repeat) gets ``@2``, ``@3``
    ... appended in reading order, so each input stays one row.
    """
    if shard.kind == "files":
        records = _read_files(shard, storage_options)
    elif shard.kind == "tar":
        records = _read_tar(shard, storage_options)
    elif shard.kind == "parquet":
        records = _read_parquet(shard, storage_options)
    else:
        raise SourceError(f"Unknown shard kind {shard.kind!r} for {shard.uri}")
    seen: dict[str, int] = {}
    for rec in records:
        k = seen.get(rec.image_id, 0) + 1
        seen[rec.image_id] = k
        if k > 1:
            rec.image_id, rec.member = f"{rec.image_id}@{k}", f"{rec.member}@{k}"
        yield rec


#: files fetched at once from one folder shard: s3fs fetches them concurrently,
#: and a chunk bounds the bytes held in memory
FETCH_CHUNK = 64


def _read_files(shard: Shard, storage_options: StorageOptions | None) -> Iterator[Record]:
    fs, _ = filesystem(shard.members[0] if shard.members else shard.uri, storage_options)
    labels: Sequence[str | None] = shard.labels or (None,) * len(shard.members)
    pairs = list(zip(shard.members, labels, strict=True))
    for start in range(0, len(pairs), FETCH_CHUNK):
        chunk = pairs[start : start + FETCH_CHUNK]
        paths = [filesystem(uri, storage_options)[1] for uri, _ in chunk]
        try:
            # cat_ranges, not cat: concurrent GETs on object stores, results in order,
            # per-file errors returned, and no glob expansion of names like "a[1].png"
            fetched: list[Any] = fs.cat_ranges(paths, None, None, on_error="return")
        except OSError as e:
            fetched = [e] * len(paths)
        for (uri, label), data in zip(chunk, fetched, strict=True):
            if isinstance(data, BaseException):
                yield Record(uri, shard.shard_id, posixpath.basename(uri), None, label, f"read failed: {data!r}")
            else:
                yield Record(uri, shard.shard_id, posixpath.basename(uri), bytes(data), label)


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


def _read_tar(shard: Shard, storage_options: StorageOptions | None) -> Iterator[Record]:
    """WebDataset convention: consecutive members sharing a key (the name up to
    the first dot of the basename) form one sample. Streaming: one sample in memory."""
    fs, path = filesystem(shard.uri, storage_options)

    def emit(key: str, files: dict[str, bytes], names: dict[str, str]) -> Iterator[Record]:
        label = _tar_label(files)
        for ext, data in files.items():
            if ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS:
                member = names[ext]
                yield Record(f"{shard.uri}#{member}", shard.shard_id, member, data, label)

    key: str | None = None
    last: str | None = None  # the last sample emitted, to say where a broken archive broke
    files: dict[str, bytes] = {}
    names: dict[str, str] = {}
    try:
        with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                d, base = posixpath.split(info.name)
                if base.startswith("."):
                    continue
                k, _, ext = base.partition(".")
                k = posixpath.join(d, k)
                if k != key:
                    if key is not None:
                        yield from emit(key, files, names)
                        last = key
                    key, files, names = k, {}, {}
                fobj = tar.extractfile(info)
                files[ext] = fobj.read() if fobj else b""
                names[ext] = info.name
            if key is not None:
                yield from emit(key, files, names)
                last, key, files = key, None, {}
            if path.lower().endswith(".tar") and not _has_end_marker(f):
                # tarfile takes a cut exactly at a block boundary for the end of the
                # archive: without this check the members after the cut vanish silently
                raise tarfile.ReadError("truncated (no end-of-archive marker)")
    except (tarfile.TarError, OSError, EOFError) as e:
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
        with fs.open(path, "rb") as f:
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
            for batch in pf.iter_batches(batch_size=256, columns=cols):
                d = batch.to_pydict()
                for i, value in enumerate(d[image_col]):
                    if isinstance(value, dict):  # Hugging Face style {"bytes": ..., "path": ...}
                        value = value.get("bytes")
                    member = str(d[id_col][i]) if id_col and d[id_col][i] is not None else f"row{row}"
                    label = d[label_col][i] if label_col else None
                    yield Record(
                        f"{shard.uri}#{member}", shard.shard_id, member, value, None if label is None else str(label)
                    )
                    row += 1
    except SourceError as e:
        yield Record(f"{shard.uri}#<unreadable>", shard.shard_id, "<unreadable>", None, None, str(e))
    except (OSError, pa.ArrowException) as e:
        yield Record(
            f"{shard.uri}#<unreadable>", shard.shard_id, "<unreadable>", None, None, f"parquet file unreadable: {e}"
        )
