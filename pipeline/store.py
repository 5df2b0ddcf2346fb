"""The feature store: one Zarr v3 group, content-addressed, append-only, safe to kill.

Row tables (`rows.py`) hold image features and augmented views; every other output is an
artefact (`artifacts.py`) committed by its `complete` marker. One process writes a store at a
time (its lock beside it: a file lock beside a local store, a lock object made by a conditional
write beside one on S3; `locations.py`); any number may read it, locally or through an fsspec URL.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import zarr

from . import artifacts
from .artifacts import Draft, Ref
from .errors import ExtractorMismatchError, StoreError, StoreMissingError, StoreReadOnlyError
from .fingerprint import fingerprint
from .locations import (
    first_line,
    refuse_links,
    release_lock,
    store_exists,
    sweep_partials,
    take_lock,
    zarr_store,
)
from .records import Extractor, StoredDataset, view_table_name
from .rows import RowTable
from .zarr_nodes import attrs_of, child_group, utcnow, write_sealed

STORE_FORMAT = 1
TOP_GROUPS = ("extractors", "datasets")


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
            exists = store_exists(location, options)
        except StoreError:
            raise
        except Exception as exc:  # network, credentials, permissions: one line, not a traceback
            raise StoreError(f"cannot reach store {location}: {first_line(exc)}") from None
        if not exists and not create:
            raise StoreMissingError(f"no shipyard store at {location} (run `shipyard extract` "
                                    "first)")
        lock = None if read_only else take_lock(location, options)
        try:
            zstore = zarr_store(location, read_only, options)
            if exists:
                if lock is not None:
                    sweep_partials(location)
                root = zarr.open_group(zstore, mode="r" if read_only else "r+")
                fmt = root.attrs.get("shipyard_format")
                if fmt is None:
                    raise StoreError(f"{location} is a Zarr group but not a shipyard store")
                if fmt != STORE_FORMAT:
                    raise StoreError(f"{location}: store format {fmt}, this shipyard reads "
                                     f"{STORE_FORMAT}")
                if not read_only and "published" in root.attrs:
                    raise StoreReadOnlyError(f"{location} is a published store, which never "
                                             "changes: write a working store of your own")
            else:
                root = zarr.open_group(zstore, mode="w-",
                                       attributes={"shipyard_format": STORE_FORMAT,
                                                   "created": utcnow()})
            if not read_only:  # a store created by a writer killed half-way is completed
                for name in TOP_GROUPS:
                    if name not in root:
                        root.create_group(name)
        except BaseException:
            release_lock(lock)
            raise
        return cls(root, location, read_only, lock)

    def close(self) -> None:
        release_lock(self._lock_file)
        self._lock_file = None

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_writable(self) -> None:
        if self.read_only:
            raise StoreReadOnlyError(f"{self.location} is opened read-only")

    def _group(self, path: str) -> zarr.Group:
        if path in TOP_GROUPS and path not in self.root:  # read-only view of a half-made store
            return zarr.create_group(zarr.storage.MemoryStore())
        return child_group(self.root, path)

    # -- artefacts ---------------------------------------------------------------------------------
    def lookup(self, ref: Ref) -> zarr.Group | None:
        return artifacts.lookup(self.root, ref)

    def begin(self, ref: Ref, record: dict[str, Any], resume: bool = True) -> Draft:
        return artifacts.begin(self.root, ref, record, self.read_only, resume)

    def commit(self, draft: Draft, attrs: dict[str, Any], device: str | None = None) -> None:
        artifacts.commit(self.root, draft, attrs, device)

    # -- extractors ------------------------------------------------------------------------------
    def extractor_fps(self) -> list[str]:
        """Extractors whose layout is complete (a layout killed half-way is not one yet)."""
        groups = self._group("extractors")
        return sorted(fp for fp in groups.group_keys()
                      if attrs_of(child_group(groups, fp)).get("complete_layout"))

    def extractor(self, fp: str) -> Extractor:
        if not self.has_extractor(fp):
            known = ", ".join(f[:12] for f in self.extractor_fps()) or "none"
            raise ExtractorMismatchError(f"{self.location} has no features of extractor {fp[:12]} "
                                         f"(it has: {known}); run `shipyard extract`")
        return Extractor(self.root, child_group(self._group("extractors"), fp), self.read_only)

    def has_extractor(self, fp: str) -> bool:
        groups = self._group("extractors")
        return fp in groups and bool(attrs_of(child_group(groups, fp)).get("complete_layout"))

    def create_extractor(self, fp: str, description: dict[str, Any], dim: int, views: int,
                         chunk_rows: int) -> Extractor:
        """Create an extractor group, or return the existing one with this fingerprint."""
        self._check_writable()
        if fingerprint(description) != fp:
            raise StoreError("extractor fingerprint does not match its description")
        if self.has_extractor(fp):
            return self.extractor(fp)
        groups = self._group("extractors")
        refuse_links(self.root, f"extractors/{fp}")
        group = groups.create_group(fp, overwrite=True, attributes={
            "fp": fp, "fingerprint": description, "dim": dim, "views": views, "created": utcnow()})
        # Unit vectors (float16) and each row's norm (float32): the raw feature is their product.
        RowTable.create(group, "images", {"features": ((dim,), "float16"),
                                          "norms": ((), "float32")}, chunk_rows)
        if views > 0:  # (M, V, D); chunks hold about as many values as an images chunk
            RowTable.create(group, "views", {"features": ((views, dim), "float16"),
                                             "norms": ((views,), "float32")},
                            max(1, chunk_rows // views))
        group.create_group("texts")
        group.attrs["complete_layout"] = True  # a layout killed half-way is simply rebuilt
        return Extractor(self.root, group, read_only=False)

    def create_view_table(self, ex: Extractor, recipe: str, description: dict[str, Any],
                          chunk_rows: int) -> RowTable:
        """The view table of a named recipe in extractor `ex`, created when absent: the same
        layout as the primary views (unit vectors and norms, V per image)."""
        self._check_writable()
        found = ex.views_of(recipe)
        if found is not None:
            return found
        if fingerprint(description) != recipe:
            raise StoreError("view recipe key does not match its description")
        name = view_table_name(recipe)
        refuse_links(self.root, f"extractors/{ex.fp}/{name}")
        if name in ex.group:  # a creation killed half-way: rebuilt (it held no committed rows)
            del ex.group[name]
        table = RowTable.create(ex.group, name, {"features": ((ex.views, ex.dim), "float16"),
                                                 "norms": ((ex.views,), "float32")},
                                max(1, chunk_rows // ex.views))
        table.group.attrs.update({"recipe": description, "complete_layout": True})
        return table

    # -- datasets --------------------------------------------------------------------------------
    def dataset_names(self) -> list[str]:
        """Datasets with a committed records version (one still being written is not one yet)."""
        return sorted(n for n in self._group("datasets").group_keys()
                      if self.dataset_version(n) is not None)

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
        group = self.lookup(Ref.records(name, version))
        if group is None:
            raise StoreError(f"{self.location}: dataset {name!r} points at records {version[:12]} "
                             "that are not in the store (run `shipyard extract` to rewrite them)")
        return StoredDataset(group, version)

    def write_dataset(self, name: str, version: str, arrays: dict[str, np.ndarray],
                      attrs: dict[str, Any], record: dict[str, Any]) -> bool:
        """Store one version of a dataset's records and make it current. False if already so."""
        self._check_writable()
        ref = Ref.records(name, version)
        if self.dataset_version(name) == version and self.lookup(ref) is not None:
            return False
        draft = self.begin(ref, record)
        for key, value in arrays.items():
            write_sealed(draft.group, key, value, chunks=_record_chunks(value))
        self.commit(draft, attrs)  # moves datasets/<name>.current to this version, last
        return True

    def walk_arrays(self) -> Iterator[tuple[str, zarr.Array]]:
        for path, node in self.root.members(max_depth=None):
            if isinstance(node, zarr.Array):
                yield path, node


def _record_chunks(value: np.ndarray) -> tuple[int, ...]:
    rows = max(1, min(len(value), 1 << 18))
    return (rows, *value.shape[1:])
