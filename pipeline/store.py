"""The feature store: one Zarr v3 group, content-addressed, append-only, safe to kill.

Row tables (image features, augmented views) follow one protocol: rows are buffered to whole
chunks, written, and only then is the table's committed row count (`attrs["rows"]`) advanced.
Readers read only committed rows, so a killed writer leaves nothing half-visible; the next writer
overwrites whatever lies past the committed count. One process writes a store at a time (a lock
file beside local stores); any number may read it, locally or through an fsspec URL.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import os
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import zarr
import zarr.storage

from pipeline.errors import (
    ExtractorMismatchError,
    StoreError,
    StoreLockedError,
    StoreReadOnlyError,
)
from pipeline.fingerprint import fingerprint
from pipeline.manifest import is_url

STORE_FORMAT = 1
KEY_BYTES = 32  # sha256 digest


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


# Typed access to zarr nodes: zarr's own annotations are unions of every JSON and node type.
def attrs_of(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    return dict(node.attrs.asdict())


def child_array(group: zarr.Group, name: str) -> zarr.Array:
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{group.path}/{name}: expected an array")
    return node


def child_group(group: zarr.Group, name: str) -> zarr.Group:
    node = group[name]
    if not isinstance(node, zarr.Group):
        raise StoreError(f"{group.path}/{name}: expected a group")
    return node


def read_array(arr: zarr.Array, start: int = 0, stop: int | None = None) -> np.ndarray:
    return np.asarray(arr[start:stop])


class RowTable:
    """Rows keyed by 32-byte digests: `keys` (N, 32) uint8 plus columns of shape (N, ...)."""

    def __init__(self, group: zarr.Group, read_only: bool) -> None:
        self.group = group
        self.read_only = read_only
        self._index: tuple[int, dict[bytes, int]] | None = None  # (rows, key -> row)

    @classmethod
    def create(cls, parent: zarr.Group, name: str, columns: dict[str, tuple[tuple[int, ...], str]],
               chunk_rows: int) -> RowTable:
        group = parent.create_group(name, attributes={"rows": 0, "chunk_rows": chunk_rows,
                                                      "columns": sorted(columns)})
        group.create_array("keys", shape=(0, KEY_BYTES), chunks=(chunk_rows, KEY_BYTES),
                           dtype="uint8")
        for col, (tail, dtype) in columns.items():
            group.create_array(col, shape=(0, *tail), chunks=(chunk_rows, *tail), dtype=dtype)
        return cls(group, read_only=False)

    @property
    def rows(self) -> int:
        """Committed rows: the only rows a reader may trust."""
        return int(attrs_of(self.group)["rows"])

    @property
    def chunk_rows(self) -> int:
        return int(attrs_of(self.group)["chunk_rows"])

    @property
    def columns(self) -> list[str]:
        return list(attrs_of(self.group)["columns"])

    def array(self, name: str) -> zarr.Array:
        return child_array(self.group, name)

    def keys(self) -> np.ndarray:
        return read_array(self.array("keys"), 0, self.rows)

    def index(self) -> dict[bytes, int]:
        """key -> row for every committed row. Built once per committed row count and shared:
        callers must not modify it."""
        rows = self.rows
        if self._index is None or self._index[0] != rows:
            keys = read_array(self.array("keys"), 0, rows)
            self._index = (rows, {keys[i].tobytes(): i for i in range(len(keys))})
        return self._index[1]

    def read(self, column: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Committed rows of a column: all, or the given row indices (any order, repeats ok)."""
        arr = self.array(column)
        n = self.rows
        if rows is None:
            return read_array(arr, 0, n)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            raise StoreError(f"{self.group.path}: row index out of the committed range [0, {n})")
        if rows.size == 0:
            return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
        # Read the covering block once, then gather: far fewer chunk reads than point selection.
        lo, hi = int(rows.min()), int(rows.max()) + 1
        return read_array(arr, lo, hi)[rows - lo]

    def writer(self) -> RowWriter:
        if self.read_only:
            raise StoreReadOnlyError(f"{self.group.path}: store is opened read-only")
        return RowWriter(self)


class RowWriter:
    """Buffers appended rows and writes them chunk-aligned, committing after every write."""

    def __init__(self, table: RowTable) -> None:
        self.table = table
        self.chunk = table.chunk_rows
        self.start = table.rows
        self.written = 0
        self._buffers: dict[str, list[np.ndarray]] = {}
        self._buffered = 0
        # Rows past the committed count are leftovers of a killed writer: drop them.
        for name in ["keys", *table.columns]:
            arr = table.array(name)
            if arr.shape[0] != self.start:
                arr.resize((self.start, *arr.shape[1:]))

    def add(self, keys: np.ndarray, **columns: np.ndarray) -> None:
        """Append rows. `keys` (B, 32) uint8; every column (B, ...)."""
        if set(columns) != set(self.table.columns):
            raise StoreError(f"{self.table.group.path}: expected columns {self.table.columns}")
        for name, value in [("keys", keys), *columns.items()]:
            if len(value) != len(keys):
                raise StoreError(f"{self.table.group.path}: column {name} has {len(value)} rows, "
                                 f"keys have {len(keys)}")
            self._buffers.setdefault(name, []).append(np.asarray(value))
        self._buffered += len(keys)
        end = self.start + self._buffered
        aligned = (end // self.chunk) * self.chunk
        if aligned > self.start:
            self._write(aligned - self.start)

    def flush(self) -> None:
        """Write and commit whatever is buffered (the last chunk may be partial)."""
        if self._buffered:
            self._write(self._buffered)

    def _write(self, n: int) -> None:
        merged = {name: np.concatenate(parts) for name, parts in self._buffers.items()}
        stop = self.start + n
        for name, data in merged.items():
            arr = self.table.array(name)
            if arr.shape[0] < stop:
                arr.resize((stop, *arr.shape[1:]))
            arr[self.start : stop] = data[:n]
        self.table.group.attrs["rows"] = stop  # the commit: readers now see these rows
        self._buffers = {name: [data[n:]] for name, data in merged.items()}
        self._buffered -= n
        self.written += n
        self.start = stop


@dataclass(frozen=True)
class TextFeatures:
    template: str
    classnames: tuple[str, ...]
    features: np.ndarray  # (C, D) float16, L2-normalized per template


class Extractor:
    """One extractor group: every feature computed with one model + preprocessing recipe."""

    def __init__(self, group: zarr.Group, read_only: bool) -> None:
        self.group = group
        self.read_only = read_only

    @property
    def fp(self) -> str:
        return str(attrs_of(self.group)["fp"])

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(attrs_of(self.group)["fingerprint"])

    @property
    def dim(self) -> int:
        return int(attrs_of(self.group)["dim"])

    @property
    def views(self) -> int:
        return int(attrs_of(self.group)["views"])

    @cached_property
    def images(self) -> RowTable:
        return RowTable(self._sub("images"), self.read_only)

    @cached_property
    def view_table(self) -> RowTable:
        if self.views == 0:
            raise ExtractorMismatchError(f"extractor {self.fp[:12]} was built without "
                                         "augmented views (extraction.views: 0)")
        return RowTable(self._sub("views"), self.read_only)

    def _sub(self, name: str) -> zarr.Group:
        return child_group(self.group, name)

    def text_key(self, template: str, classnames: tuple[str, ...]) -> str:
        return fingerprint({"template": template, "classnames": list(classnames)})

    def texts(self, template: str, classnames: tuple[str, ...]) -> TextFeatures | None:
        key = self.text_key(template, classnames)
        texts = self._sub("texts")
        if key not in texts or not attrs_of(child_group(texts, key)).get("complete"):
            return None
        arr = child_array(child_group(texts, key), "features")
        return TextFeatures(template, classnames, read_array(arr))

    def text_groups(self) -> list[str]:
        return sorted(self._sub("texts").group_keys())

    def write_texts(self, template: str, classnames: tuple[str, ...], features: np.ndarray) -> str:
        if self.read_only:
            raise StoreReadOnlyError(f"{self.group.path}: store is opened read-only")
        key = self.text_key(template, classnames)
        texts = self._sub("texts")
        sub = texts.create_group(key, overwrite=True,
                                 attributes={"template": template, "classnames": list(classnames)})
        sub.create_array("features", data=features.astype(np.float16),
                         chunks=(max(1, len(features)), features.shape[1]))
        sub.attrs["complete"] = True  # written last: readers skip a group without it
        return key


class StoredDataset:
    """One version of a dataset's records: path -> image key, label, split; few-shot subsets."""

    def __init__(self, group: zarr.Group, version: str) -> None:
        self.group = group
        self.version = version
        self.attrs = attrs_of(group)

    def __len__(self) -> int:
        return int(self.array("labels").shape[0])

    def array(self, name: str) -> np.ndarray:
        return read_array(child_array(self.group, name))

    @property
    def classnames(self) -> tuple[str, ...]:
        return tuple(self.attrs["classnames"])

    @property
    def base_labels(self) -> list[int]:
        return list(self.attrs["base_labels"])

    @property
    def new_labels(self) -> list[int]:
        return list(self.attrs["new_labels"])

    @property
    def failures(self) -> list[dict[str, str]]:
        return list(self.attrs.get("failures", []))

    def keys(self) -> np.ndarray:
        return self.array("keys")  # (R, 32) uint8

    def labels(self) -> np.ndarray:
        return self.array("labels")

    def splits(self) -> np.ndarray:
        return self.array("splits")

    def paths(self) -> list[str]:
        blob, offsets = self.array("paths").tobytes(), self.array("path_offsets")
        return [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]

    def fewshot(self, shots: int, seed: int) -> np.ndarray:
        name = f"fewshot_k{shots}_seed{seed}"
        if name not in self.group:
            raise StoreError(f"dataset {self.attrs['name']}: no {shots}-shot subset for seed {seed} "
                             f"(stored: shots {self.attrs['shots']}, seeds {self.attrs['seeds']})")
        return self.array(name)


class FeatureStore:
    """A shipyard store at a local path or fsspec URL, opened read-only or for writing."""

    def __init__(self, root: zarr.Group, location: str, read_only: bool,
                 lock_file: Any | None = None) -> None:
        self.root = root
        self.location = location
        self.read_only = read_only
        self._lock_file = lock_file

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, location: str, *, read_only: bool = True, create: bool = False,
             options: dict[str, Any] | None = None) -> FeatureStore:
        """Open a store. Writers take the store's lock; `create` makes a new store if none."""
        try:
            exists = _store_exists(location, options)
        except StoreError:
            raise
        except Exception as exc:  # network, credentials, permissions: one line, not a traceback
            raise StoreError(f"cannot reach store {location}: {_first_line(exc)}") from None
        if not exists and not create:
            raise StoreError(f"no shipyard store at {location} (run `shipyard extract` first)")
        lock = None if read_only else _take_lock(location)
        try:
            zstore = _zarr_store(location, read_only, options)
            if exists:
                if lock is not None:
                    _sweep_partials(Path(location.removeprefix("file://")))
                root = zarr.open_group(zstore, mode="r" if read_only else "r+")
                fmt = root.attrs.get("shipyard_format")
                if fmt is None:
                    raise StoreError(f"{location} is a Zarr group but not a shipyard store")
                if fmt != STORE_FORMAT:
                    raise StoreError(f"{location}: store format {fmt}, this shipyard reads "
                                     f"{STORE_FORMAT}")
            else:
                root = zarr.open_group(zstore, mode="w-",
                                       attributes={"shipyard_format": STORE_FORMAT,
                                                   "created": utcnow()})
                for name in ("extractors", "datasets"):
                    root.create_group(name)
        except BaseException:
            _release_lock(lock)
            raise
        return cls(root, location, read_only, lock)

    def close(self) -> None:
        _release_lock(self._lock_file)
        self._lock_file = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreReadOnlyError(f"{self.location} is opened read-only")

    def _group(self, path: str) -> zarr.Group:
        return child_group(self.root, path)

    # -- extractors ------------------------------------------------------------------------------
    def extractor_fps(self) -> list[str]:
        return sorted(self._group("extractors").group_keys())

    def extractor(self, fp: str) -> Extractor:
        groups = self._group("extractors")
        if fp not in groups:
            known = ", ".join(f[:12] for f in self.extractor_fps()) or "none"
            raise ExtractorMismatchError(f"{self.location} has no extractor {fp[:12]} "
                                         f"(it has: {known})")
        return Extractor(child_group(groups, fp), self.read_only)

    def has_extractor(self, fp: str) -> bool:
        return fp in self._group("extractors")

    def create_extractor(self, fp: str, description: dict[str, Any], dim: int, views: int,
                         chunk_rows: int) -> Extractor:
        """Create an extractor group, or return the existing one with this fingerprint."""
        self._check_writable()
        if fingerprint(description) != fp:
            raise StoreError("extractor fingerprint does not match its description")
        groups = self._group("extractors")
        if fp in groups and attrs_of(child_group(groups, fp)).get("complete_layout"):
            return self.extractor(fp)
        group = groups.create_group(fp, overwrite=True, attributes={
            "fp": fp, "fingerprint": description, "dim": dim, "views": views, "created": utcnow()})
        RowTable.create(group, "images", {"features": ((dim,), "float16")}, chunk_rows)
        if views > 0:  # (M, V, D); chunks hold about as many values as an images chunk
            RowTable.create(group, "views", {"features": ((views, dim), "float16")},
                            max(1, chunk_rows // views))
        group.create_group("texts")
        group.attrs["complete_layout"] = True  # a layout killed half-way is simply rebuilt
        return Extractor(group, read_only=False)

    # -- datasets --------------------------------------------------------------------------------
    def dataset_names(self) -> list[str]:
        return sorted(self._group("datasets").group_keys())

    def dataset_version(self, name: str) -> str | None:
        groups = self._group("datasets")
        if name not in groups:
            return None
        current = attrs_of(child_group(groups, name)).get("current")
        return None if current is None else str(current)

    def dataset(self, name: str) -> StoredDataset:
        version = self.dataset_version(name)
        if version is None:
            raise StoreError(f"{self.location} has no dataset {name!r} (run `shipyard extract`)")
        holder = self._group(f"datasets/{name}")
        if version not in holder:
            raise StoreError(f"{self.location}: dataset {name!r} points at records {version[:12]} "
                             "that are not in the store (run `shipyard extract` to rewrite them)")
        return StoredDataset(child_group(holder, version), version)

    def write_dataset(self, name: str, version: str, arrays: dict[str, np.ndarray],
                      attrs: dict[str, Any]) -> bool:
        """Store one version of a dataset's records and make it current. False if already so."""
        self._check_writable()
        groups = self._group("datasets")
        holder = child_group(groups, name) if name in groups else groups.create_group(name)
        if attrs_of(holder).get("current") == version:
            return False
        sub = holder.create_group(version, overwrite=True, attributes=attrs)
        for key, value in arrays.items():
            sub.create_array(key, data=value, chunks=_record_chunks(value))
        holder.attrs["current"] = version  # the commit: readers switch to the new version here
        return True

    # -- artefacts: generators, synthetic sets, adapters, caches, runs ----------------------------
    def artifact(self, kind: str, fp: str, complete: bool = True) -> zarr.Group | None:
        """The group `<kind>/<fp>`, or None. With `complete`, only a finished one."""
        if kind not in self.root or fp not in child_group(self.root, kind):
            return None
        group = child_group(child_group(self.root, kind), fp)
        if complete and not attrs_of(group).get("complete"):
            return None
        return group

    def artifact_fps(self, kind: str) -> list[str]:
        return sorted(child_group(self.root, kind).group_keys()) if kind in self.root else []

    def create_artifact(self, kind: str, fp: str, description: dict[str, Any]) -> zarr.Group:
        """A fresh, incomplete `<kind>/<fp>` group; callers set attrs['complete'] last."""
        self._check_writable()
        if fingerprint(description) != fp:
            raise StoreError(f"{kind} fingerprint does not match its description")
        holder = child_group(self.root, kind) if kind in self.root else self.root.create_group(kind)
        return holder.create_group(fp, overwrite=True, attributes={
            "fp": fp, "fingerprint": description, "created": utcnow(), "complete": False})

    def walk_arrays(self) -> Iterator[tuple[str, zarr.Array]]:
        for path, node in self.root.members(max_depth=None):
            if isinstance(node, zarr.Array):
                yield path, node


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _record_chunks(value: np.ndarray) -> tuple[int, ...]:
    rows = max(1, min(len(value), 1 << 18))
    return (rows, *value.shape[1:])


def _zarr_store(location: str, read_only: bool, options: dict[str, Any] | None) -> Any:
    if is_url(location):
        if location.startswith("file://"):
            return zarr.storage.LocalStore(location.removeprefix("file://"), read_only=read_only)
        try:
            return zarr.storage.FsspecStore.from_url(location, read_only=read_only,
                                                     storage_options=options or {})
        except ImportError as exc:
            raise StoreError(f"{location}: the fsspec backend is not installed ({exc}); "
                             "for s3:// install shipyard[s3]") from None
    return zarr.storage.LocalStore(location, read_only=read_only)


def _store_exists(location: str, options: dict[str, Any] | None) -> bool:
    if is_url(location) and not location.startswith("file://"):
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(location, **(options or {}))
            return bool(fs.exists(f"{path.rstrip('/')}/zarr.json"))
        except ImportError as exc:
            raise StoreError(f"{location}: the fsspec backend is not installed ({exc}); "
                             "for s3:// install shipyard[s3]") from None
    return (Path(location.removeprefix("file://")) / "zarr.json").is_file()


def _sweep_partials(root: Path) -> None:
    """Remove the temporary files of metadata writes a killed writer left in group folders.
    Safe only under the writer lock; chunk folders (`c/`) are not walked, so this stays cheap."""
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d != "c"]
        for name in files:
            if name.endswith(".partial"):
                with suppress(OSError):
                    os.remove(os.path.join(folder, name))


def _take_lock(location: str) -> Any | None:
    """An exclusive flock on `<store>.lock` for local stores; object stores rely on one writer."""
    if is_url(location) and not location.startswith("file://"):
        return None
    path = Path(location.removeprefix("file://"))
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(f"{path}.lock", "a+")  # noqa: SIM115 - held for the store's lifetime
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise StoreLockedError(f"{location} is being written by another process "
                               f"(lock {path}.lock)") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _release_lock(lock: Any | None) -> None:
    if lock is not None:
        with suppress(OSError):
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
        lock.close()
