"""store publish: an immutable copy for sharing, with committed rows only, complete artefacts only,
dimension names for xarray, shards, consolidated metadata, verified before it is marked."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from shipyard.cli import app
from shipyard.pipeline import publish as publish_module
from shipyard.pipeline.artifacts import ADAPTER, Ref
from shipyard.pipeline.errors import StoreError, StoreReadOnlyError
from shipyard.pipeline.manifest import Manifest
from shipyard.pipeline.publish import SHARD_BYTES, dimension_names, publish, shard_shape
from shipyard.pipeline.store import FeatureStore
from typer.testing import CliRunner

from tests.conftest import manifest_dict, run_stage, write_manifest

TORN = 5  # rows a killed writer left past the images table's committed count


def _source(make_manifest: Callable[..., Manifest]) -> tuple[str, str]:
    """An extracted demo store with what only killed writers leave: rows past the committed
    count, an artefact begun but never committed (in the group copied first), and an extractor
    whose layout was never finished. (store path, extractor)"""
    m = make_manifest()
    fp = run_stage(m, "extract")["extractor"]
    with FeatureStore.open(m.store, read_only=False) as store:
        images = store.extractor(fp).images
        n = images.rows
        for name in ["keys", *images.columns]:
            arr = images.array(name)
            arr.resize((n + TORN, *arr.shape[1:]))
            arr[n:] = np.ones((TORN, *arr.shape[1:]), dtype=arr.dtype)
        store.begin(Ref.of(ADAPTER, "f" * 64), {"job": "train-adapter", "key": "f" * 64})
        store.root["extractors"].create_group("e" * 64, attributes={"fp": "e" * 64,
                                                                    "fingerprint": {}})
    return m.store, fp


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def test_a_published_copy_holds_exactly_the_committed_content(
        tmp_path: Path, make_manifest: Callable[..., Manifest]) -> None:
    src, fp = _source(make_manifest)
    dst = str(tmp_path / "published.zarr")
    result = _invoke("store", "publish", src, dst, "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["left_out"] == [f"adapters/{'f' * 64}", f"extractors/{'e' * 64}"]
    assert out["published"]["rows"] == {f"extractors/{fp}/images": 120,
                                        f"extractors/{fp}/views": 60}
    assert (out["source"], out["store"]) == (src, dst)
    arrays = [a for _, a in zarr.open_group(dst, mode="r").members(max_depth=None)
              if isinstance(a, zarr.Array)]
    assert out["arrays"] == len(arrays) > 10
    assert out["bytes"] == sum(a.nbytes for a in arrays)
    source = zarr.open_group(src, mode="r")
    for a in arrays:  # digests and every other attribute travel with each array
        assert (dict(a.attrs), a.fill_value) == (dict(source[a.path].attrs),
                                                 source[a.path].fill_value), a.path
    assert any("sha256" in a.attrs for a in arrays)
    from shipyard.pipeline.locations import release_lock, take_lock

    release_lock(take_lock(dst))  # the publisher's lock was released
    with FeatureStore.open(src) as a, FeatureStore.open(dst) as b:
        assert a.extractor(fp).images.array("keys").shape[0] == 120 + TORN
        ea, eb = a.extractor(fp), b.extractor(fp)
        for table_a, table_b in ((ea.images, eb.images), (ea.view_table, eb.view_table)):
            assert table_b.rows == table_a.rows
            for name in ["keys", *table_a.columns]:  # trimmed: nothing past the committed rows
                assert table_b.array(name).shape[0] == table_a.rows
                np.testing.assert_array_equal(table_b.read(name), table_a.read(name))
        assert b.lookup(Ref.of(ADAPTER, "f" * 64)) is None and "f" * 64 not in b.root["adapters"]
        assert b.extractor_fps() == [fp] and "e" * 64 not in b.root["extractors"]
        assert b.dataset("demo").paths() == a.dataset("demo").paths()
        assert b.root.attrs["published"] == out["published"]
    verified = json.loads(_invoke("--store", dst, "store", "verify", "--json").stdout)
    assert verified["ok"] and verified["checked"]["rows"] == 180
    info = json.loads(_invoke("--store", dst, "store", "info", "--json").stdout)
    assert info["published"]["source"] == src and info["extractors"][0]["images"] == 120
    assert "published" in _invoke("--store", dst, "store", "info").stdout


def test_a_published_store_is_never_written_nor_published_over(
        tmp_path: Path, small_demo: Path, make_manifest: Callable[..., Manifest]) -> None:
    src, _ = _source(make_manifest)
    dst = str(tmp_path / "published.zarr")
    publish(src, dst)
    before = sorted(p.name for p in Path(dst).rglob("*"))
    with pytest.raises(StoreReadOnlyError, match="is a published store, which never changes"):
        FeatureStore.open(dst, read_only=False)
    again = _invoke("store", "publish", src, dst)
    assert again.exit_code == 1
    assert again.stderr.strip() == (f"error: {dst} exists: a published store never changes; "
                                    "publish to a new location")
    manifest = write_manifest(tmp_path / "onto.yaml", manifest_dict(small_demo, Path(dst)))
    extract = _invoke("--manifest", str(manifest), "extract")
    assert extract.exit_code == 1 and "is a published store" in extract.stderr
    assert sorted(p.name for p in Path(dst).rglob("*")) == before
    # A copy of a published store is published again, from it.
    second = str(tmp_path / "second.zarr")
    assert publish(dst, second)["published"]["source"] == dst


def test_xarray_zarr_and_dask_read_the_features_shipyard_reads(
        tmp_path: Path, make_manifest: Callable[..., Manifest]) -> None:
    xr = pytest.importorskip("xarray")
    import dask.array as da

    src, fp = _source(make_manifest)
    dst = str(tmp_path / "published.zarr")
    publish(src, dst)
    root = zarr.open_group(dst, mode="r")
    assert root.metadata.consolidated_metadata is not None  # one read opens the whole store
    groups = [path for path, node in root.members(max_depth=None)
              if isinstance(node, zarr.Group) and any(isinstance(c, zarr.Array)
                                                     for _, c in node.members())]
    assert f"extractors/{fp}/images" in groups and len(groups) >= 4
    for path in groups:
        ds = xr.open_zarr(dst, group=path, consolidated=False)
        arrays = [name for name, node in root[path].members() if isinstance(node, zarr.Array)]
        assert sorted(ds.variables) == sorted(arrays), path
    with FeatureStore.open(dst) as store:
        images = store.extractor(fp).images
        want = images.read("features")
        ds = xr.open_zarr(dst, group=f"extractors/{fp}/images")  # consolidated, as a user opens it
        assert ds["features"].dims == ("row", "feature") and ds["norms"].dims == ("row",)
        np.testing.assert_array_equal(ds["features"].values, want)
        np.testing.assert_array_equal(ds["norms"].values, images.read("norms"))
        views = xr.open_zarr(dst, group=f"extractors/{fp}/views", consolidated=False)
        assert views["features"].dims == ("row", "view", "feature")
        assert views["norms"].dims == ("row", "view")
        np.testing.assert_array_equal(
            da.from_zarr(dst, component=f"extractors/{fp}/images/features").compute(), want)
        arr = images.array("features")
        assert arr.shards == (128, arr.shape[1]) and arr.chunks == (32, arr.shape[1])


def test_a_copy_that_fails_verification_is_not_marked_published(
        tmp_path: Path, make_manifest: Callable[..., Manifest],
        monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = _source(make_manifest)
    dst = str(tmp_path / "published.zarr")
    monkeypatch.setattr(publish_module, "check_copy",
                        lambda *a: ["extractors/x/images/features: the copy differs"])
    with pytest.raises(StoreError, match=r"the copy failed verification and is not published "
                                         r"\(1 problems; first: extractors/x/images/features"):
        publish(src, dst)
    assert "published" not in zarr.open_group(dst, mode="r").attrs
    FeatureStore.open(dst, read_only=False).close()  # its lock was released
    # A copy of a published store that fails is not marked either (not even with the old mark).
    monkeypatch.undo()
    first = str(tmp_path / "first.zarr")
    publish(src, first)
    monkeypatch.setattr(publish_module, "check_copy", lambda *a: ["x: the copy differs"])
    with pytest.raises(StoreError, match="failed verification"):
        publish(first, str(tmp_path / "again.zarr"))
    assert "published" not in zarr.open_group(str(tmp_path / "again.zarr"), mode="r").attrs


def test_two_publishers_of_one_destination_exclude_each_other(
        tmp_path: Path, make_manifest: Callable[..., Manifest]) -> None:
    from shipyard.pipeline.errors import StoreLockedError
    from shipyard.pipeline.locations import release_lock, take_lock

    src, _ = _source(make_manifest)
    dst = str(tmp_path / "published.zarr")
    held = take_lock(dst)
    try:
        with pytest.raises(StoreLockedError, match="being written by another process"):
            publish(src, dst)
    finally:
        release_lock(held)
    publish(src, dst)
    publish(src, str(tmp_path / "other.zarr"))  # and the lock of the first was released
    FeatureStore.open(str(tmp_path / "other.zarr")).close()


def test_publishing_reports_progress_per_array(
        tmp_path: Path, make_manifest: Callable[..., Manifest]) -> None:
    src, _ = _source(make_manifest)
    seen: list[Any] = []

    class Recorder:
        def task(self, description: str, total: int | None, unit: str) -> Any:
            seen.append((description, total, unit))
            return self

        def advance(self, n: int = 1) -> None:
            seen.append(n)

        def note(self, text: str) -> None: ...

        def close(self) -> None:
            seen.append("closed")

    out = publish(src, str(tmp_path / "p.zarr"), progress=Recorder())
    assert seen[0][0] == "publish arrays" and seen[0][2] == "arr"
    assert seen[0][1] >= out["arrays"]  # every array of the source, left-out ones included
    assert seen[1:] == [1] * out["arrays"] + ["closed"]


def test_dimension_names_share_row_in_a_table_and_are_unique_elsewhere() -> None:
    assert dimension_names("keys", 2, True) == ("row", "key_byte")
    assert dimension_names("features", 2, True) == ("row", "feature")
    assert dimension_names("features", 3, True) == ("row", "view", "feature")
    assert dimension_names("norms", 1, True) == ("row",)
    assert dimension_names("norms", 2, True) == ("row", "view")
    assert dimension_names("labels", 1, True) == ("row",)
    assert dimension_names("labels", 3, True) == ("row", "labels_1", "labels_2")
    assert dimension_names("features", 4, True) == ("row", "features_1", "features_2", "features_3")
    assert dimension_names("norms", 3, True) == ("row", "norms_1", "norms_2")
    assert dimension_names("weight", 2, False) == ("weight_0", "weight_1")
    assert dimension_names("scale", 0, False) == ()


def test_shards_gather_whole_chunks_up_to_the_target_size() -> None:
    assert shard_shape((32, 8), (32, 8), 2) is None  # one chunk: nothing to gather
    assert shard_shape((120, 8), (32, 8), 2) == (128, 8)  # the whole array, in whole chunks
    rows = SHARD_BYTES // (512 * 2)  # rows of 512 float16 values in one shard
    assert shard_shape((10 * rows, 512), (1024, 512), 2) == (rows, 512)
    assert shard_shape((10 * rows, 512), (1024, 512), 4) == (rows // 2, 512)
    assert shard_shape((10, 1 << 26), (1, 1 << 26), 4) == (1, 1 << 26)  # a chunk past the target
    assert shard_shape((1 << 30,), (1,), 1) == (SHARD_BYTES,)  # one-byte chunks
    shape = shard_shape((10 * rows, 512), (1024, 512), 2)
    assert shape is not None and all(type(v) is int for v in shape)  # zarr takes whole numbers


def test_publish_streams_each_array_one_shard_of_rows_at_a_time(
        tmp_path: Path, make_manifest: Callable[..., Manifest],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With shards of one chunk, no read of the source returns more rows than one shard holds
    (the copy is written shard by shard, never whole; verification reads in blocks of its own),
    and the copy still equals the source's committed rows."""
    src, fp = _source(make_manifest)
    monkeypatch.setattr(publish_module, "SHARD_BYTES", 4096)
    largest: dict[str, int] = {}
    getitem = zarr.Array.__getitem__

    def spy(self: zarr.Array, selection: Any) -> Any:
        out = getitem(self, selection)
        from_source = str(getattr(self.store_path.store, "root", "")) == src
        if from_source and isinstance(out, np.ndarray) and out.ndim and self.ndim > 1:
            largest[self.path] = max(largest.get(self.path, 0), out.shape[0])
        return out

    monkeypatch.setattr(zarr.Array, "__getitem__", spy)
    dst = str(tmp_path / "published.zarr")
    publish(src, dst)
    monkeypatch.setattr(zarr.Array, "__getitem__", getitem)
    features = f"extractors/{fp}/images/features"
    pub = zarr.open_group(dst, mode="r")
    rows_per_shard = pub[features].shards[0]
    assert rows_per_shard == 4096 // (32 * pub[features].shape[1] * 2) * 32 < 120
    assert largest[features] == rows_per_shard  # block by block, never all 120 rows
    assert largest[f"extractors/{fp}/views/features"] <= pub[f"extractors/{fp}/views/features"] \
        .shards[0]
    with FeatureStore.open(src) as a, FeatureStore.open(dst) as b:
        for name in ("keys", "features", "norms"):
            np.testing.assert_array_equal(b.extractor(fp).images.read(name),
                                          a.extractor(fp).images.read(name))
