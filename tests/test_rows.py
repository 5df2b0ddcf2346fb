"""Row tables (pipeline/rows.py): what a reader sees under any interleaving of appends, flushes
and killed writers, and the rules each read and write keeps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from shipyard.pipeline.errors import StoreError, StoreReadOnlyError
from shipyard.pipeline.rows import KEY_BYTES, LayeredRows, RowTable

CHUNK = 4


def _keys(ids: np.ndarray) -> np.ndarray:
    """One distinct 32-byte key per id."""
    keys = np.zeros((len(ids), KEY_BYTES), np.uint8)
    keys[:, :8] = np.asarray(ids, dtype=np.int64).view(np.uint8).reshape(-1, 8)
    return keys


def _table(where: Path | None = None, chunk: int = CHUNK) -> RowTable:
    root = zarr.open_group(str(where), mode="w") if where else zarr.group()
    return RowTable.create(root, "t", {"x": ((2,), "float32"), "label": ((), "int64")}, chunk)


def _add(writer, ids: list[int]) -> None:  # type: ignore[no-untyped-def]
    a = np.asarray(ids, dtype=np.int64)
    writer.add(_keys(a), x=np.stack([a, -a], axis=1).astype("float32"), label=a * 10)


def _visible(table: RowTable) -> list[int]:
    """The ids a reader sees, checked column against column."""
    ids = table.keys()[:, :8].copy().view(np.int64).ravel().tolist()
    assert table.read("label").tolist() == [i * 10 for i in ids]
    assert table.read("x").tolist() == [[i, -i] for i in ids]
    assert table.index() == {_keys(np.array([i]))[0].tobytes(): r for r, i in enumerate(ids)}
    return ids


# ---- the commit protocol under random interleavings ------------------------------------------

OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 9)),
    st.tuples(st.just("flush"), st.just(0)),
    st.tuples(st.just("kill"), st.just(0)),  # the writer dies: its buffer is lost
    st.tuples(st.just("torn"), st.integers(1, 9)),  # it dies mid-write: rows past the count
), max_size=12)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(ops=OPS, chunk=st.sampled_from([1, 3, 4]))
def test_readers_see_exactly_the_committed_prefix_under_any_interleaving(
        ops: list[tuple[str, int]], chunk: int) -> None:
    """A model of the protocol: rows are committed in order, a whole number of chunks at a time
    until a flush; a killed writer loses only its uncommitted rows, and whatever it left past the
    committed count is never read and is overwritten by the next writer."""
    table = _table(chunk=chunk)
    writer = table.writer()
    committed: list[int] = []
    buffered: list[int] = []
    next_id = 0
    for op, n in ops:
        if op == "add":
            ids = list(range(next_id, next_id + n))
            next_id += n
            _add(writer, ids)
            buffered += ids
            aligned = (len(committed) + len(buffered)) // chunk * chunk
            take = max(0, aligned - len(committed))
            committed, buffered = committed + buffered[:take], buffered[take:]
        elif op == "flush":
            writer.flush()
            committed, buffered = committed + buffered, []
        else:
            if op == "torn":  # a write that reached the arrays but not the count
                stop = table.rows + n
                for name in ("keys", "x", "label"):
                    arr = table.array(name)
                    arr.resize((max(stop, arr.shape[0]), *arr.shape[1:]))
                    arr[table.rows:stop] = 7
                assert _visible(table) == committed  # what it left is never read
            writer = table.writer()
            buffered = []
        assert table.rows == len(committed)
        assert table.check() == len(committed)
        assert _visible(table) == committed
    writer.flush()
    assert _visible(table) == committed + buffered
    assert all(table.array(n).shape[0] == table.rows for n in ("keys", "x", "label"))


# ---- single rules ----------------------------------------------------------------------------

def test_create_records_the_layout(tmp_path: Path) -> None:
    table = _table(tmp_path / "s.zarr", chunk=5)
    assert dict(table.group.attrs) == {"rows": 0, "chunk_rows": 5, "columns": ["label", "x"]}
    assert table.rows == 0 and table.chunk_rows == 5 and table.columns == ["label", "x"]
    assert table.array("keys").shape == (0, 32) and table.array("keys").chunks == (5, 32)
    assert table.array("keys").dtype == np.uint8
    assert table.array("x").shape == (0, 2) and table.array("x").chunks == (5, 2)
    assert table.array("label").dtype == np.int64 and table.array("label").chunks == (5,)
    assert not table.read_only


def test_rows_reach_the_arrays_one_chunk_at_a_time(tmp_path: Path) -> None:
    table = _table(tmp_path / "s.zarr")
    writer = table.writer()
    _add(writer, [0, 1, 2])
    assert table.rows == 0 and table.array("keys").shape[0] == 0  # buffered, not written
    _add(writer, [3, 4, 5, 6, 7, 8])
    assert table.rows == 8 and table.array("keys").shape[0] == 8 and writer.written == 8
    writer.flush()
    assert table.rows == 9 and writer.written == 9
    writer.flush()  # nothing buffered: nothing written
    assert table.rows == 9 and writer.written == 9
    assert _visible(RowTable(table.group, read_only=True)) == list(range(9))


def test_a_new_writer_continues_after_the_committed_rows(tmp_path: Path) -> None:
    table = _table(tmp_path / "s.zarr")
    first = table.writer()
    _add(first, [0, 1, 2, 3, 4])
    first.flush()  # 5 rows: the second chunk is partial
    second = table.writer()
    assert second.start == 5
    _add(second, [5, 6, 7])  # fills the partial chunk: committed at once
    assert table.rows == 8
    assert _visible(table) == list(range(8))


def test_reads_by_row_in_any_order_with_repeats(tmp_path: Path) -> None:
    table = _table(tmp_path / "s.zarr")
    writer = table.writer()
    _add(writer, list(range(10)))
    writer.flush()
    assert table.read("label", np.array([7, 2, 2, 9, 0])).tolist() == [70, 20, 20, 90, 0]
    assert table.read("x", np.array([3])).tolist() == [[3.0, -3.0]]
    empty = table.read("x", np.array([], dtype=np.int64))
    assert empty.shape == (0, 2) and empty.dtype == np.float32


@pytest.mark.parametrize("rows", [[10], [-1], [0, 12]])
def test_a_row_outside_the_committed_range_is_refused(tmp_path: Path, rows: list[int]) -> None:
    table = _table(tmp_path / "s.zarr")
    writer = table.writer()
    _add(writer, list(range(12)))
    writer.flush()
    table.group.attrs["rows"] = 10  # two rows past the count, as a killed writer leaves them
    with pytest.raises(StoreError, match=r"row index out of the committed range \[0, 10\)"):
        table.read("label", np.array(rows))
    assert table.read("label", np.array([9])).tolist() == [90]


def test_the_index_follows_the_committed_count(tmp_path: Path) -> None:
    table = _table(tmp_path / "s.zarr")
    writer = table.writer()
    _add(writer, [0, 1, 2, 3])
    first = table.index()
    assert len(first) == 4 and table.index() is first  # built once per count
    _add(writer, [4, 5, 6, 7])
    assert len(table.index()) == 8 and table.index()[_keys(np.array([6]))[0].tobytes()] == 6


def test_appends_with_wrong_columns_or_lengths_are_refused(tmp_path: Path) -> None:
    table = _table(tmp_path / "s.zarr")
    writer = table.writer()
    with pytest.raises(StoreError, match=r"t: expected columns \['label', 'x'\]"):
        writer.add(_keys(np.arange(2)), x=np.zeros((2, 2), "float32"))
    with pytest.raises(StoreError, match="t: column x has 1 rows, keys have 2"):
        writer.add(_keys(np.arange(2)), x=np.zeros((1, 2), "float32"), label=np.zeros(2, "int64"))
    with pytest.raises(StoreError, match="t: column label has 3 rows, keys have 2"):
        writer.add(_keys(np.arange(2)), x=np.zeros((2, 2), "float32"), label=np.zeros(3, "int64"))
    writer.flush()
    assert table.rows == 0


def test_a_read_only_table_gives_no_writer(tmp_path: Path) -> None:
    table = RowTable(_table(tmp_path / "s.zarr").group, read_only=True)
    with pytest.raises(StoreReadOnlyError, match="t: store is opened read-only"):
        table.writer()


@pytest.mark.parametrize("column", ["keys", "label"])
def test_a_count_past_any_array_is_damage(tmp_path: Path, column: str) -> None:
    table = _table(tmp_path / "s.zarr")
    writer = table.writer()
    _add(writer, [0, 1, 2, 3])
    arr = table.array(column)
    arr.resize((3, *arr.shape[1:]))
    with pytest.raises(StoreError, match=f"t: 4 rows committed but {column} holds 3; the table is "
                                         "damaged"):
        table.check()
    table.group.attrs["rows"] = -1
    with pytest.raises(StoreError, match="-1 rows committed"):
        table.check()


# -- the layered table ---------------------------------------------------------------------------

def _layer(name: str, keys: list[int], chunk: int = 4) -> RowTable:
    root = zarr.open_group(zarr.storage.MemoryStore(), mode="w")
    table = RowTable.create(root, name, {"x": ((2,), "float32")}, chunk)
    w = table.writer()
    k = np.zeros((len(keys), 32), np.uint8)
    k[:, 0] = keys
    w.add(k, x=np.array([[v, v * 10] for v in keys], np.float32) + (100 if name == "up" else 0))
    w.flush()
    return table


def _layer_key(v: int) -> bytes:
    k = np.zeros(32, np.uint8)
    k[0] = v
    return k.tobytes()


def test_a_layered_table_reads_every_layer_and_the_first_layer_wins() -> None:
    own, up = _layer("own", [1, 2]), _layer("up", [2, 3, 4])
    layered = LayeredRows([own, up], own)
    assert layered.rows == 5
    index = layered.index()
    # key 2 is in both layers: the working layer's row wins
    assert index == {_layer_key(1): 0, _layer_key(2): 1, _layer_key(3): 3, _layer_key(4): 4}
    rows = np.array([4, 0, 3, 1, 4])
    np.testing.assert_array_equal(layered.read("x", rows)[:, 0], [104, 1, 103, 2, 104])
    np.testing.assert_array_equal(layered.read("x")[:, 0], [1, 2, 102, 103, 104])
    with pytest.raises(StoreError, match="out of the committed range"):
        layered.read("x", np.array([5]))


def test_a_layered_table_appends_to_the_working_layer_only() -> None:
    own, up = _layer("own", [1]), _layer("up", [2, 3])
    layered = LayeredRows([own, up], own)
    assert layered.index()[_layer_key(3)] == 2
    w = layered.writer()
    k = np.zeros((1, 32), np.uint8)
    k[0, 0] = 9
    w.add(k, x=np.array([[9, 90]], np.float32))
    w.flush()
    assert (own.rows, up.rows) == (2, 2)
    assert layered.index()[_layer_key(9)] == 1 and layered.index()[_layer_key(3)] == 3  # rebuilt on growth
    with pytest.raises(StoreReadOnlyError, match="upstream stores are read-only"):
        LayeredRows([up], None).writer()
    with pytest.raises(StoreError, match="must come first"):
        LayeredRows([up, own], own)


def test_a_layered_table_of_three_layers_offsets_each_layer_by_the_rows_before_it() -> None:
    own, mid, up = _layer("own", [1]), _layer("mid", [2, 3]), _layer("up", [4, 5])
    layered = LayeredRows([own, mid, up], own)
    assert layered.rows == layered.check() == 5
    assert layered.index() == {_layer_key(v): i for i, v in enumerate([1, 2, 3, 4, 5])}
    np.testing.assert_array_equal(layered.read("x", np.array([4, 3, 0, 2, 1]))[:, 0],
                                  [105, 104, 1, 3, 2])  # "up" rows carry +100
    np.testing.assert_array_equal(layered.keys()[:, 0], [1, 2, 3, 4, 5])
    assert layered.read("x", np.array([1, 2])).dtype == np.float32
    for bad in ([], [up, own]):
        with pytest.raises(StoreError, match="layered table"):
            LayeredRows(bad, None if not bad else own)
    with pytest.raises(StoreError, match="must come first"):
        LayeredRows([mid, up, own], own)
