"""Row tables: rows keyed by 32-byte digests, appended chunk-aligned and committed by a row count.

Rows are buffered to whole chunks, written, and only then is the table's committed row count
(`attrs["rows"]`) advanced. Readers read only committed rows, so a killed writer leaves nothing
half-visible; the next writer overwrites whatever lies past the committed count.
"""

from __future__ import annotations

import numpy as np
import zarr

from .errors import StoreError, StoreReadOnlyError
from .zarr_nodes import attrs_of, child_array, read_array

KEY_BYTES = 32  # sha256 digest


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

    def check(self) -> int:
        """The committed row count, refused unless every array holds at least that many rows:
        a table whose count runs past its data is damaged, and nothing may be read from or
        written onto it as if it were not."""
        rows = self.rows
        for name in ["keys", *self.columns]:
            stored = self.array(name).shape[0]
            if not 0 <= rows <= stored:
                raise StoreError(f"{self.group.path}: {rows} rows committed but {name} holds "
                                 f"{stored}; the table is damaged (run `shipyard store verify`)")
        return rows

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
            rows = self.check()
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
        self.start = table.check()  # never append onto a table whose count is broken
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


class LayeredRows(RowTable):
    """One extractor table across a store's layers, read as one table: the working store's rows
    first, then each upstream's. A key held by several layers resolves to the first. Appends go
    to the working store's table only; a table no layer writes is read-only."""

    def __init__(self, tables: list[RowTable], writable: RowTable | None) -> None:
        if not tables:
            raise StoreError("a layered table needs at least one layer")
        if writable is not None and tables[0] is not writable:
            raise StoreError("the writable layer of a layered table must come first")
        columns = tables[0].columns
        for t in tables[1:]:
            if t.columns != columns:
                raise StoreError(f"{t.group.path}: columns {t.columns} differ from the working "
                                 f"layer's {columns}; the stores hold different table layouts")
        super().__init__(tables[0].group, writable is None)
        self.tables = tables
        self.writable = writable
        self._layered: tuple[tuple[int, ...], dict[bytes, int]] | None = None

    def _counts(self) -> tuple[int, ...]:
        return tuple(t.rows for t in self.tables)

    @property
    def rows(self) -> int:
        return sum(self._counts())

    def check(self) -> int:
        return sum(t.check() for t in self.tables)

    @property
    def chunk_rows(self) -> int:
        return (self.writable or self.tables[0]).chunk_rows

    @property
    def columns(self) -> list[str]:
        return self.tables[0].columns

    def keys(self) -> np.ndarray:
        return np.concatenate([t.keys() for t in self.tables])

    def index(self) -> dict[bytes, int]:
        counts = self._counts()
        if self._layered is None or self._layered[0] != counts:
            merged: dict[bytes, int] = {}
            offset = 0
            for table, n in zip(self.tables, counts, strict=True):
                for key, row in table.index().items():
                    merged.setdefault(key, offset + row)  # the first layer holding it wins
                offset += n
            self._layered = (counts, merged)
        return self._layered[1]

    def read(self, column: str, rows: np.ndarray | None = None) -> np.ndarray:
        if rows is None:
            return np.concatenate([t.read(column) for t in self.tables])
        rows = np.asarray(rows, dtype=np.int64)
        total = self.rows
        if rows.size and (rows.min() < 0 or rows.max() >= total):
            raise StoreError(f"{self.group.path}: row index out of the committed range "
                             f"[0, {total}) of its layers")
        first = self.tables[0].array(column)
        out = np.zeros((len(rows), *first.shape[1:]), dtype=first.dtype)
        offset = 0
        for table, n in zip(self.tables, self._counts(), strict=True):
            mine = (rows >= offset) & (rows < offset + n)
            if mine.any():
                out[mine] = table.read(column, rows[mine] - offset)
            offset += n
        return out

    def writer(self) -> RowWriter:
        if self.writable is None:
            raise StoreReadOnlyError(f"{self.group.path}: no layer of this table is writable "
                                     "(upstream stores are read-only)")
        return self.writable.writer()
