"""Row-table protocol: chunk-aligned writes, committed count last, read-only opens, one writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from shipyard.pipeline.errors import StoreError, StoreLockedError, StoreReadOnlyError
from shipyard.pipeline.fingerprint import fingerprint
from shipyard.pipeline.rows import RowTable
from shipyard.pipeline.store import FeatureStore


def _rows(n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    keys = np.zeros((n, 32), np.uint8)
    keys[:, :8] = np.arange(start, start + n, dtype=np.int64).view(np.uint8).reshape(n, 8)
    values = np.arange(start, start + n, dtype=np.float16)[:, None] * np.ones((1, 4), np.float16)
    return keys, values


def _add(writer, n: int, start: int = 0) -> None:  # type: ignore[no-untyped-def]
    keys, values = _rows(n, start)
    writer.add(keys, features=values)


def _table(tmp_path: Path) -> tuple[FeatureStore, RowTable]:
    store = FeatureStore.open(str(tmp_path / "s.zarr"), read_only=False, create=True)
    table = RowTable.create(store.root, "t", {"features": ((4,), "float16")}, chunk_rows=8)
    return store, table


def test_rows_are_committed_only_at_chunk_boundaries_until_flush(tmp_path: Path) -> None:
    store, table = _table(tmp_path)
    writer = table.writer()
    _add(writer, 5)
    assert table.rows == 0  # buffered, not visible
    _add(writer, 6, start=5)
    assert table.rows == 8  # one whole chunk written and committed
    writer.flush()
    assert table.rows == 11
    np.testing.assert_array_equal(table.read("features"), np.concatenate([_rows(5)[1],
                                                                          _rows(6, 5)[1]]))
    assert len(table.index()) == 11
    store.close()


def test_uncommitted_rows_are_invisible_and_dropped_by_the_next_writer(tmp_path: Path) -> None:
    store, table = _table(tmp_path)
    writer = table.writer()
    _add(writer, 8)
    # A killed writer may leave rows past the committed count; simulate that.
    for name in ("keys", "features"):
        arr = table.array(name)
        arr.resize((12, *arr.shape[1:]))
    assert table.rows == 8 and len(table.keys()) == 8
    writer2 = table.writer()
    assert table.array("keys").shape[0] == 8
    _add(writer2, 2, start=8)
    writer2.flush()
    assert table.rows == 10
    store.close()


def test_read_only_store_refuses_writes(tmp_path: Path) -> None:
    store, _ = _table(tmp_path)
    store.close()
    ro = FeatureStore.open(str(tmp_path / "s.zarr"))
    assert ro.read_only
    with pytest.raises(StoreReadOnlyError):
        RowTable(ro.root["t"], read_only=True).writer()
    with pytest.raises(StoreReadOnlyError):
        ro.write_dataset("x", "v", {}, {}, {"key": "v"})
    with pytest.raises(StoreReadOnlyError):
        ro.create_extractor(fingerprint({}), {}, 4, 0, 8)


def test_one_writer_at_a_time(tmp_path: Path) -> None:
    first = FeatureStore.open(str(tmp_path / "s.zarr"), read_only=False, create=True)
    with pytest.raises(StoreLockedError, match="being written by another process"):
        FeatureStore.open(str(tmp_path / "s.zarr"), read_only=False)
    FeatureStore.open(str(tmp_path / "s.zarr")).close()  # readers are never blocked
    first.close()
    FeatureStore.open(str(tmp_path / "s.zarr"), read_only=False).close()


def test_store_unlock_on_a_local_store_refuses_a_live_writer_and_finds_no_other_lock(
        tmp_path: Path) -> None:
    """A local store's lock dies with its writer: unlock never removes one, and says so."""
    from shipyard.cli import app
    from typer.testing import CliRunner

    path = str(tmp_path / "s.zarr")
    with FeatureStore.open(path, read_only=False, create=True):
        held = CliRunner().invoke(app, ["--store", path, "store", "unlock"])
        assert held.exit_code == 1
        assert held.stderr.strip() == (f"error: {path} is being written by another process "
                                       f"(lock {path}.lock)")
    free = CliRunner().invoke(app, ["--store", path, "store", "unlock", "--json"])
    assert free.exit_code == 0, free.output
    assert json.loads(free.stdout) == {"store": path, "lock": f"{path}.lock", "removed": False,
                                       "holder": None}
    FeatureStore.open(path, read_only=False).close()  # and the store is still writable
    missing = CliRunner().invoke(app, ["--store", str(tmp_path / "none.zarr"), "store", "unlock"])
    assert missing.exit_code == 1
    assert missing.stderr.strip() == f"error: no shipyard store at {tmp_path / 'none.zarr'}"
    assert not (tmp_path / "none.zarr.lock").exists()


def test_one_writer_whichever_path_names_the_store(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    real = tmp_path / "real" / "s.zarr"
    first = FeatureStore.open(str(real), read_only=False, create=True)
    (tmp_path / "link.zarr").symlink_to(real, target_is_directory=True)
    (tmp_path / "linked_parent").symlink_to(tmp_path / "real", target_is_directory=True)
    monkeypatch.chdir(tmp_path / "real")
    for other in (tmp_path / "link.zarr", tmp_path / "linked_parent" / "s.zarr", Path("s.zarr"),
                  Path("../real/./s.zarr")):
        with pytest.raises(StoreLockedError, match="being written by another process"):
            FeatureStore.open(str(other), read_only=False)
    first.close()
    FeatureStore.open(str(tmp_path / "link.zarr"), read_only=False).close()
    assert not (tmp_path / "link.zarr.lock").exists()  # the lock sits beside the real store


def test_missing_or_foreign_store(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no shipyard store"):
        FeatureStore.open(str(tmp_path / "none.zarr"))
    import zarr

    zarr.open_group(str(tmp_path / "other.zarr"), mode="w")
    with pytest.raises(StoreError, match="not a shipyard store"):
        FeatureStore.open(str(tmp_path / "other.zarr"))


def test_extractor_group_is_named_by_its_description(tmp_path: Path) -> None:
    store = FeatureStore.open(str(tmp_path / "s.zarr"), read_only=False, create=True)
    desc = {"model": "m", "views": 2}
    with pytest.raises(StoreError, match="does not match"):
        store.create_extractor("0" * 64, desc, 4, 2, 8)
    ex = store.create_extractor(fingerprint(desc), desc, 4, 2, 8)
    assert ex.fp == fingerprint(desc) and ex.dim == 4 and ex.views == 2
    assert ex.view_table.chunk_rows == 4  # about as many values per chunk as the images table
    assert store.create_extractor(fingerprint(desc), desc, 4, 2, 8).fp == ex.fp  # reopened
    store.close()


def test_a_count_past_the_data_is_refused_not_written_onto(tmp_path: Path) -> None:
    store, table = _table(tmp_path)
    writer = table.writer()
    writer.add(np.ones((8, 32), np.uint8), features=np.ones((8, 4), np.float16))
    writer.flush()
    table.group.attrs["rows"] = 9  # one row more than the arrays hold
    with pytest.raises(StoreError, match=r"9 rows committed but keys holds 8.*store verify"):
        table.writer()
    with pytest.raises(StoreError, match="damaged"):
        table.index()
    assert table.array("keys").shape[0] == 8  # nothing was written
    store.close()
