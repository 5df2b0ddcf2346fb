"""Published stores: immutable copies of a store for sharing, locally or on object storage.

A published copy holds what the source has committed and nothing else: row tables trimmed to
their committed rows, complete artefacts only (an incomplete one, or an extractor whose layout was
killed half-way, is left out). Every array names its dimensions, so xarray opens any group; arrays
of more than one chunk are sharded into objects of about `SHARD_BYTES`, so a reader on object
storage fetches few, large objects; the metadata is consolidated into the root, so opening the
store reads one object (a published copy never changes, so that metadata cannot go stale). The
copy is verified against the source before it is marked `published`, the last write: a copy
without the mark is an interrupted publish, never a published store.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zarr

from . import __version__
from .audit import verify
from .errors import StoreError
from .locations import release_lock, store_exists, take_lock, zarr_store
from .progress import Progress, Silent
from .store import FeatureStore
from .zarr_nodes import attrs_of, child_array, digest, digest_blocks, row_blocks, utcnow

SHARD_BYTES = 64 << 20  # one object on object storage: large enough to amortise a request
ROW = "row"


@dataclass
class Copied:
    """What a publish wrote: the committed rows of each row table, and each array's digest."""

    rows: dict[str, int] = field(default_factory=dict)  # row-table path -> rows
    digests: dict[str, str] = field(default_factory=dict)  # array path -> digest of its content
    arrays: int = 0
    bytes: int = 0
    left_out: list[str] = field(default_factory=list)  # incomplete groups, not published


def is_row_table(attrs: dict[str, Any]) -> bool:
    return "rows" in attrs and "columns" in attrs and "chunk_rows" in attrs


def is_incomplete(attrs: dict[str, Any]) -> bool:
    """An artefact group before its commit, or an extractor whose layout was never finished."""
    if "record" in attrs and "kind" in attrs:
        return not attrs.get("complete")
    return "fingerprint" in attrs and "fp" in attrs and not attrs.get("complete_layout")


def dimension_names(name: str, ndim: int, row_table: bool) -> tuple[str, ...]:
    """Names for xarray. In a row table every array's first axis is the shared `row`; feature
    columns end in `feature` (D) after `view` (V) when they hold views, keys in `key_byte`.
    Elsewhere each axis is named after its array, so no two arrays of a group clash."""
    if not row_table:
        return tuple(f"{name}_{i}" for i in range(ndim))
    tails = {"keys": ("key_byte",), "features": ("view", "feature"), "norms": ("view",)}
    tail = tails.get(name)
    if tail is None or len(tail) < ndim - 1:
        return (ROW, *(f"{name}_{i}" for i in range(1, ndim)))
    return (ROW, *tail[len(tail) - (ndim - 1):])  # the last ndim - 1 names


def shard_shape(shape: tuple[int, ...], chunks: tuple[int, ...],
                itemsize: int) -> tuple[int, ...] | None:
    """Whole chunks along the first axis, about SHARD_BYTES per shard and no more than the array
    needs; None when the array fits in one chunk (nothing to gather)."""
    if not shape or shape[0] <= chunks[0]:
        return None
    chunk_bytes = itemsize * math.prod(chunks)
    per_shard = max(1, SHARD_BYTES // max(1, chunk_bytes))
    per_shard = min(per_shard, -(-shape[0] // chunks[0]))
    return (chunks[0] * per_shard, *chunks[1:])


def _walk(group: zarr.Group, path: str = "") -> Iterator[tuple[str, zarr.Group | zarr.Array]]:
    """Every node under `group`, each group before its members, in name order."""
    for name, node in sorted(group.members(), key=lambda m: m[0]):
        sub = f"{path}/{name}" if path else name
        yield sub, node
        if isinstance(node, zarr.Group):
            yield from _walk(node, sub)


def copy_committed(src: zarr.Group, dst: zarr.Group, progress: Progress) -> Copied:
    """Copy `src`'s committed content into the empty group `dst` (attributes included)."""
    out = Copied()
    group_attrs: dict[str, dict[str, Any]] = {"": attrs_of(src)}
    nodes = list(_walk(src))
    task = progress.task("publish arrays", sum(isinstance(n, zarr.Array) for _, n in nodes), "arr")
    for path, node in nodes:
        parent = path.rpartition("/")[0]
        if parent not in group_attrs:  # under a group left out
            continue
        if isinstance(node, zarr.Group):
            attrs = attrs_of(node)
            if is_incomplete(attrs):
                out.left_out.append(path)
                continue
            dst.create_group(path, attributes=attrs)
            group_attrs[path] = attrs
            continue
        parent_attrs = group_attrs[parent]
        row_table = is_row_table(parent_attrs)
        name = path.rpartition("/")[2]
        if row_table:
            stop = int(parent_attrs["rows"])
            if node.shape[0] < stop:
                raise StoreError(f"{path}: {stop} rows committed but only {node.shape[0]} "
                                 "stored; the source is damaged (run `shipyard store verify`)")
        shape = ((stop if row_table else node.shape[0]), *node.shape[1:]) if node.ndim else ()
        chunks = tuple(node.chunks) if node.ndim else ()
        if chunks and shape and chunks[0] > max(1, shape[0]):
            chunks = (max(1, shape[0]), *chunks[1:])  # no chunk larger than the array
        shards = shard_shape(shape, chunks, node.dtype.itemsize) if chunks else None
        arr = dst.create_array(path, shape=shape, dtype=node.dtype,
                               chunks=chunks if chunks else "auto", shards=shards,
                               dimension_names=dimension_names(name, len(shape), row_table),
                               attributes=attrs_of(node), fill_value=node.fill_value)
        out.digests[path] = _copy_blocks(node, arr, shape, shards or chunks)
        out.arrays += 1
        out.bytes += math.prod(shape) * node.dtype.itemsize
        if row_table and name == "keys":
            out.rows[parent] = stop
        task.advance()
    task.close()
    return out


def _copy_blocks(src: zarr.Array, dst: zarr.Array, shape: tuple[int, ...],
                 block: tuple[int, ...]) -> str:
    """Copy `shape` of `src` into `dst` one whole shard (or chunk) of rows at a time, so memory
    holds one object's worth, never the array; the digest of what was copied."""
    if not shape:
        data = np.asarray(src[()])
        dst[()] = data
        return digest(data)

    def blocks() -> Iterator[np.ndarray]:
        for start, data in row_blocks(src, shape[0], block[0]):
            if data.size:
                dst[start:start + len(data)] = data
            yield data

    return digest_blocks(src.dtype, shape, blocks())


def _read_digest(arr: zarr.Array) -> str:
    """The digest of a stored array, read one shard (or chunk) of rows at a time."""
    if not arr.ndim:
        return digest(np.asarray(arr[()]))
    step = (arr.shards or arr.chunks)[0]
    return digest_blocks(arr.dtype, arr.shape, (b for _, b in row_blocks(arr, arr.shape[0], step)))


def check_copy(location: str, options: dict[str, Any] | None, copied: Copied) -> list[str]:
    """Problems of the copy at `location`: shipyard's own verification, and every array's content
    against what was read from the source."""
    with FeatureStore.open(location, read_only=True, options=options) as store:
        problems = list(verify(store).problems)
        for path, want in copied.digests.items():
            if _read_digest(child_array(store.root, path)) != want:
                problems.append(f"{path}: the copy differs from the source")
    return problems


def publish(src_location: str, dst_location: str, *, src_options: dict[str, Any] | None = None,
            dst_options: dict[str, Any] | None = None, progress: Progress | None = None,
            ) -> dict[str, Any]:
    """Publish the store at `src_location` to `dst_location`, which must not exist yet."""
    progress = progress or Silent()
    if store_exists(dst_location, dst_options):
        raise StoreError(f"{dst_location} exists: a published store never changes; publish to a "
                         "new location")
    with FeatureStore.open(src_location, read_only=True, options=src_options) as src:
        source_attrs = attrs_of(src.root)
        if "published" in source_attrs:
            source_attrs.pop("published")  # a copy of a copy: published again, from here
        lock = take_lock(dst_location, dst_options)
        try:
            root = zarr.open_group(zarr_store(dst_location, False, dst_options), mode="w-",
                                   attributes=source_attrs)
            copied = copy_committed(src.root, root, progress)
            problems = check_copy(dst_location, dst_options, copied)
            if problems:
                raise StoreError(f"{dst_location}: the copy failed verification and is not "
                                 f"published ({len(problems)} problems; first: {problems[0]})")
            mark: dict[str, Any] = {"source": src_location, "time": utcnow(),
                                    "rows": copied.rows, "shipyard": __version__}
            root.attrs["published"] = mark  # the commit: a copy without it is not published
            with warnings.catch_warnings():  # zarr 3 warns: not in the v3 spec yet
                warnings.simplefilter("ignore")
                zarr.consolidate_metadata(root.store)
        finally:
            release_lock(lock)
    return {"source": src_location, "store": dst_location, "published": mark,
            "arrays": copied.arrays, "bytes": copied.bytes, "left_out": copied.left_out}
