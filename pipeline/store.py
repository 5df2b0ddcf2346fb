"""The feature store: one Zarr v3 group, content-addressed, append-only, safe to kill.

Row tables (`rows.py`) hold image features and augmented views; every other output is an
artefact (`artifacts.py`) committed by its `complete` marker. One process writes a store at a
time (its lock beside it: a file lock beside a local store, a lock object made by a conditional
write beside one on S3; `locations.py`); any number may read it, locally or through an fsspec URL.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
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
from .records import Extractor, LayeredExtractor, StoredDataset, view_table_name
from .rows import RowTable
from .zarr_nodes import attrs_of, child_group, utcnow, write_sealed

STORE_FORMAT = 1
TOP_GROUPS = ("extractors", "datasets")


class FeatureStore:
    """A shipyard store at a local path or fsspec URL, opened read-only or for writing.

    A working store may sit on read-only upstream stores (another team's, a published copy):
    every lookup goes through the layers, the working store first; every write goes to the
    working store. Content keys make this safe: one key is one content in whichever layer."""

    def __init__(self, root: zarr.Group, location: str, read_only: bool,
                 lock_file: Any | None = None, upstreams: Sequence[FeatureStore] = (),
                 options: dict[str, Any] | None = None) -> None:
        self.root = root
        self.location = location
        self.read_only = read_only
        self._lock_file = lock_file
        self.upstreams: tuple[FeatureStore, ...] = tuple(upstreams)
        self.options = options or {}
        # Temporary files of a killed writer's metadata writes removed when this writer opened
        # the store: (path in the store, bytes), what `store gc` reports among its removals.
        self.swept: list[tuple[str, int]] = []

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, location: str, *, read_only: bool = True, create: bool = False,
             options: dict[str, Any] | None = None,
             upstreams: Sequence[tuple[str, dict[str, Any]]] = (),
             empty_if_missing: bool = False) -> FeatureStore:
        """Open a store. Writers take the store's lock; `create` makes a new store if none.
        `upstreams`: (location, fsspec options) of read-only stores read below this one.
        `empty_if_missing` (read-only, with upstreams): a working store not written yet reads as
        an empty layer over them, as `status`, `store info` and dry runs see it."""
        below = open_upstreams(upstreams)  # first: an unreachable upstream creates nothing here
        try:
            try:
                store = cls._open_one(location, read_only, create, options)
            except StoreMissingError:
                if not (empty_if_missing and read_only and below):
                    raise
                store = cls._empty(location)
        except BaseException:
            for up in below:
                up.close()
            raise
        store.upstreams = below
        return store

    @classmethod
    def _empty(cls, location: str) -> FeatureStore:
        """A read-only, in-memory stand-in for a working store that does not exist yet."""
        root = zarr.open_group(zarr.storage.MemoryStore(), mode="w",
                               attributes={"shipyard_format": STORE_FORMAT})
        for name in TOP_GROUPS:
            root.create_group(name)
        return cls(root, location, True)

    @classmethod
    def _open_one(cls, location: str, read_only: bool, create: bool,
                  options: dict[str, Any] | None) -> FeatureStore:
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
        swept: list[tuple[str, int]] = []
        try:
            zstore = zarr_store(location, read_only, options)
            if exists:
                if lock is not None:
                    swept = sweep_partials(location)
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
        store = cls(root, location, read_only, lock, options=options)
        store.swept = swept
        return store

    def close(self) -> None:
        release_lock(self._lock_file)
        self._lock_file = None
        for up in self.upstreams:
            up.close()

    @property
    def layers(self) -> tuple[FeatureStore, ...]:
        """This store, then its upstreams: the order every lookup follows."""
        return (self.own(), *self.upstreams)

    def own(self) -> FeatureStore:
        """This store alone, without its upstreams (what `store info` and `verify` read)."""
        if not self.upstreams:
            return self
        return FeatureStore(self.root, self.location, self.read_only, options=self.options)

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
        """The committed artefact in the first layer that holds it."""
        for layer in (self, *self.upstreams):
            found = artifacts.lookup(layer.root, ref)
            if found is not None:
                return found
        return None

    def begin(self, ref: Ref, record: dict[str, Any], resume: bool = True) -> Draft:
        return artifacts.begin(self.root, ref, record, self.read_only, resume)

    def commit(self, draft: Draft, attrs: dict[str, Any], device: str | None = None) -> None:
        artifacts.commit(self.root, draft, attrs, device)

    # -- extractors ------------------------------------------------------------------------------
    def extractor_fps(self) -> list[str]:
        """Extractors whose layout is complete (a layout killed half-way is not one yet), in
        any layer."""
        return sorted({fp for layer in self.layers for fp in layer._own_fps()})

    def _own_fps(self) -> list[str]:
        groups = self._group("extractors")
        return [fp for fp in groups.group_keys()
                if attrs_of(child_group(groups, fp)).get("complete_layout")]

    def _own_extractor(self, fp: str) -> Extractor | None:
        groups = self._group("extractors")
        if fp not in groups or not attrs_of(child_group(groups, fp)).get("complete_layout"):
            return None
        return Extractor(self.root, child_group(groups, fp), self.read_only)

    def extractor(self, fp: str) -> Extractor:
        """The extractor's features in every layer that holds some, read as one."""
        own = self._own_extractor(fp)
        parts = [e for e in [own, *(u._own_extractor(fp) for u in self.upstreams)] if e]
        if not parts:
            known = ", ".join(f[:12] for f in self.extractor_fps()) or "none"
            where = self.location + (f" (and its {len(self.upstreams)} upstream stores)"
                                     if self.upstreams else "")
            raise ExtractorMismatchError(f"{where} has no features of extractor {fp[:12]} "
                                         f"(it has: {known}); run `shipyard extract`")
        if len(parts) == 1 and parts[0] is own:
            return own
        return LayeredExtractor(parts, own if own is not None and not self.read_only else None)

    def has_extractor(self, fp: str) -> bool:
        return any(layer._own_extractor(fp) is not None for layer in self.layers)

    def create_extractor(self, fp: str, description: dict[str, Any], dim: int, views: int,
                         chunk_rows: int) -> Extractor:
        """Create an extractor group, or return the existing one with this fingerprint."""
        self._check_writable()
        if fingerprint(description) != fp:
            raise StoreError("extractor fingerprint does not match its description")
        if self._own_extractor(fp) is not None:
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
        return self.extractor(fp)

    def create_view_table(self, ex: Extractor, recipe: str, description: dict[str, Any],
                          chunk_rows: int) -> RowTable:
        """The view table of a named recipe in extractor `ex`, created when absent: the same
        layout as the primary views (unit vectors and norms, V per image)."""
        self._check_writable()
        own = self._own_extractor(ex.fp)
        if own is None:
            raise StoreError(f"extractor {ex.fp[:12]}: create it in {self.location} first")
        if own.views_of(recipe) is None:
            if fingerprint(description) != recipe:
                raise StoreError("view recipe key does not match its description")
            name = view_table_name(recipe)
            refuse_links(self.root, f"extractors/{ex.fp}/{name}")
            if name in own.group:  # a creation killed half-way: rebuilt (no committed rows)
                del own.group[name]
            table = RowTable.create(own.group, name, {"features": ((ex.views, ex.dim), "float16"),
                                                      "norms": ((ex.views,), "float32")},
                                    max(1, chunk_rows // ex.views))
            table.group.attrs.update({"recipe": description, "complete_layout": True})
        found = self.extractor(ex.fp).views_of(recipe)  # with the upstreams' rows of the recipe
        assert found is not None  # the working store's table exists now
        return found

    # -- datasets --------------------------------------------------------------------------------
    def dataset_names(self) -> list[str]:
        """Datasets with a committed records version (one still being written is not one yet),
        in any layer."""
        return sorted({n for layer in self.layers for n in layer._group("datasets").group_keys()
                       if layer._own_version(n) is not None})

    def dataset_version(self, name: str) -> str | None:
        """The current records version: the working store's, else the first upstream's."""
        for layer in self.layers:
            version = layer._own_version(name)
            if version is not None:
                return version
        return None

    def _own_version(self, name: str) -> str | None:
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


def open_upstreams(upstreams: Sequence[tuple[str, dict[str, Any]]]) -> tuple[FeatureStore, ...]:
    """Every upstream store, read-only (no lock is taken, nothing is ever written there)."""
    opened: list[FeatureStore] = []
    try:
        for location, options in upstreams:
            try:
                opened.append(FeatureStore._open_one(location, True, False, options))
            except StoreMissingError:
                raise StoreError(f"upstream store {location}: no shipyard store there") from None
            except StoreError as exc:
                raise StoreError(f"upstream store {location}: {exc}") from None
    except BaseException:
        for store in opened:
            store.close()
        raise
    return tuple(opened)


def _record_chunks(value: np.ndarray) -> tuple[int, ...]:
    rows = max(1, min(len(value), 1 << 18))
    return (rows, *value.shape[1:])
