"""Fetch and decode a few images by ``image_id`` (for the report's gallery).

An ``image_id`` is the source URI plus the member (``jobs.sources``):

* a file of a folder source: the file's URI (``file:///x/3/img000001.png``, ``s3://b/p/x.png``);
* a member of a tar shard: ``<tar uri>#<member name>``;
* a row of a Parquet shard: ``<parquet uri>#<id or rowN>``.

Ids are grouped by shard, and each tar or Parquet shard is read once, in
order, through ``jobs.sources.read_shard`` (the reader the scoring job uses),
stopping as soon as every wanted member is seen; files of one folder are read
together as a shard of files, by the same reader. So a store that stops answering
is retried here as in the scoring job. A failure is a reason per image, never an
exception.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from jobs.images import decode_image
from jobs.sources import PARQUET_SUFFIXES, TAR_SUFFIXES, Shard, SourceError, read_shard
from jobs.storage import StorageError, StorageOptions


@dataclass(frozen=True)
class Fetched:
    """One image: ``pixels`` uint8 (h, w, c) with c in {1, 3}, or why not."""

    image_id: str
    pixels: np.ndarray | None
    error: str | None


def locate(image_id: str) -> tuple[str, str, str]:
    """image_id -> (kind "tar" | "parquet" | "file", shard or file URI, member)."""
    base, sep, member = image_id.rpartition("#")
    if sep and base.lower().endswith(TAR_SUFFIXES):
        return "tar", base, member
    if sep and base.lower().endswith(PARQUET_SUFFIXES):
        return "parquet", base, member
    return "file", image_id, posixpath.basename(image_id)


def fetch_images(image_ids: Iterable[str], storage_options: StorageOptions | None = None) -> dict[str, Fetched]:
    """image_id -> Fetched, for every id given (duplicates fetched once)."""
    groups: dict[tuple[str, str], set[str]] = {}
    for image_id in dict.fromkeys(image_ids):
        kind, uri, _ = locate(image_id)
        # the files of one folder are one shard of files: fetched together, as scoring does
        groups.setdefault((kind, posixpath.dirname(uri) if kind == "file" else uri), set()).add(image_id)
    out: dict[str, Fetched] = {}
    for (kind, uri), wanted in groups.items():
        out.update(_fetch_from_shard(kind, uri, wanted, storage_options))
    return out


def _decoded(image_id: str, data: bytes | None) -> Fetched:
    dec = decode_image(data)
    return Fetched(image_id, dec.pixels, dec.error)


def _fetch_from_shard(
    kind: str, uri: str, wanted: set[str], storage_options: StorageOptions | None
) -> dict[str, Fetched]:
    """The wanted ids of one tar or Parquet shard (``uri``), or of files of one folder."""
    out: dict[str, Fetched] = {}
    if kind == "file":
        members = tuple(sorted(wanted))
        shard = Shard("fetch", uri, "files", 0, "", members=members, labels=(None,) * len(members))
    else:
        shard = Shard(shard_id="fetch", uri=uri, kind=kind, size=0, version="")
    try:
        for rec in read_shard(shard, storage_options):
            if rec.image_id in wanted:
                out[rec.image_id] = (
                    Fetched(rec.image_id, None, rec.error) if rec.error else _decoded(rec.image_id, rec.data)
                )
                if len(out) == len(wanted):
                    break  # every wanted member seen: stop reading the shard
            elif rec.error and rec.member == "<unreadable>":
                return out | {i: Fetched(i, None, rec.error) for i in wanted - set(out)}
    except (StorageError, SourceError, OSError, ValueError) as e:
        return out | {i: Fetched(i, None, f"cannot read {uri}: {e}") for i in wanted - set(out)}
    return out | {i: Fetched(i, None, f"not found in {uri}") for i in wanted - set(out)}
