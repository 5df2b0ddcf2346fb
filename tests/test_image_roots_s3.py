"""Image roots on object storage: a dataset whose images and split file live on an S3-compatible
server (moto on 127.0.0.1) extracts to the same store as the same images on disk, the stat
cache vouches for unchanged objects by URL, size and ETag, an object rewritten in place is
hashed again, and an unreachable bucket or a missing prefix is one line, exit 1."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
import zarr.storage
from shipyard.cli import app
from typer.testing import CliRunner

from tests.conftest import manifest_dict, write_manifest
from tests.test_sharing_s3 import _options, s3fs
from tests.test_sync_clip_fs import _synthetic_folder


def _upload(endpoint: str, local: Path, bucket: str, prefix: str) -> None:
    fs = s3fs.S3FileSystem(**_options(endpoint))
    if not fs.exists(bucket):
        fs.mkdir(bucket)
    for f in sorted(local.rglob("*")):
        if f.is_file():
            fs.pipe(f"{bucket}/{prefix}/{f.relative_to(local).as_posix()}", f.read_bytes())


def _manifest(tmp_path: Path, demo: Path, name: str, endpoint: str | None = None,
              url: str | None = None) -> Path:
    """The demo (CoOp split) and a synthetic domain (an image folder), on disk or under `url`."""
    data = manifest_dict(demo, tmp_path / f"{name}.zarr")
    syn = {"name": "demo-syn", "format": "imagefolder", "domain": "synthetic",
           "pairs_with": "demo", "root": str(tmp_path / "syn")}
    data["datasets"].append(syn)
    if url is not None:
        entry = data["datasets"][0]
        entry["root"], entry["split_file"] = f"{url}/images", f"{url}/split.json"
        entry["root_options"] = syn["root_options"] = _options(endpoint or "")
        syn["root"] = f"{url}/syn"
    return write_manifest(tmp_path / f"{name}.yaml", data)


def _invoke(path: Path, *args: str) -> Any:
    return CliRunner().invoke(app, ["--manifest", str(path), "--device", "cpu", *args])


def _arrays(store: Path) -> dict[str, np.ndarray]:
    root = zarr.open_group(zarr.storage.LocalStore(store, read_only=True), mode="r")
    (fp,) = list(root["extractors"].group_keys())
    out = {}
    for table in ("images", "views"):
        group = root[f"extractors/{fp}/{table}"]
        rows = int(group.attrs["rows"])  # type: ignore[arg-type]
        for column in ("keys", "features", "norms"):
            out[f"{table}/{column}"] = np.asarray(group[column][:rows])  # type: ignore[index]
    for dataset in ("demo", "demo-syn"):
        version = root[f"datasets/{dataset}"].attrs["current"]
        for column in ("keys", "labels", "splits", "paths"):
            out[f"{dataset}/{column}"] = np.asarray(root[f"datasets/{dataset}/{version}/{column}"][:])  # type: ignore[index]
    return out


def test_a_root_on_s3_extracts_to_the_store_of_the_same_images_on_disk(
        tmp_path: Path, small_demo: Path, s3_endpoint: str, one_thread: None) -> None:
    _upload(s3_endpoint, small_demo, "images-bucket", "demo")
    _upload(s3_endpoint, _synthetic_folder(tmp_path), "images-bucket", "demo/syn")
    local = _invoke(_manifest(tmp_path, small_demo, "disk"), "extract", "--json")
    assert local.exit_code == 0, local.output
    path = _manifest(tmp_path, small_demo, "s3", s3_endpoint, "s3://images-bucket/demo")
    remote = _invoke(path, "extract", "--json")
    assert remote.exit_code == 0, remote.output
    a, b = json.loads(local.stdout), json.loads(remote.stdout)
    assert a["extractor"] == b["extractor"] and b["extracted"] == a["extracted"] == 140
    assert sorted(b["datasets"]) == ["demo", "demo-syn"]
    got, want = _arrays(tmp_path / "s3.zarr"), _arrays(tmp_path / "disk.zarr")
    for name, value in want.items():
        assert np.array_equal(got[name], value), name
    again = _invoke(path, "extract", "--json")  # nothing left to encode
    assert again.exit_code == 0 and json.loads(again.stdout)["extracted"] == 0
    status_run = _invoke(path, "status", "--json")
    status = json.loads(status_run.stdout)
    assert "datasets" in status, status_run.output
    status = {d["name"]: d for d in status["datasets"]}["demo"]
    assert status["missing_features"] == 0 and status["records_current"]


def test_an_object_rewritten_in_place_is_hashed_again(tmp_path: Path, small_demo: Path,
                                                      s3_endpoint: str) -> None:
    from shipyard.pipeline.hashing import StatCache, hash_files
    from shipyard.pipeline.remote_paths import RemotePath

    fs = s3fs.S3FileSystem(**_options(s3_endpoint))
    fs.mkdir("rewrite-bucket")
    fs.pipe("rewrite-bucket/a.png", b"first bytes")
    cache = StatCache(tmp_path / "stat.sqlite")
    obj = RemotePath("s3://rewrite-bucket/a.png", _options(s3_endpoint))
    first = hash_files([obj], cache)
    assert first.read == 1 and hash_files([obj], cache).read == 0  # cached by URL, size, ETag
    fs.pipe("rewrite-bucket/a.png", b"other bytes")  # same size, new ETag
    third = hash_files([obj], cache)
    assert third.read == 1 and third.keys[obj] != first.keys[obj]
    missing = hash_files([RemotePath("s3://rewrite-bucket/none.png", _options(s3_endpoint))], cache)
    assert list(missing.errors.values()) == ["file not found"]


def test_a_missing_prefix_or_an_unreachable_bucket_is_one_line(
        tmp_path: Path, small_demo: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _upload(s3_endpoint, small_demo, "there-bucket", "demo")
    data = manifest_dict(small_demo, tmp_path / "m.zarr")
    entry = data["datasets"][0]
    entry.update({"format": "imagefolder", "root": "s3://there-bucket/nothing-here",
                  "root_options": _options(s3_endpoint)})
    entry.pop("split_file")
    missing = CliRunner().invoke(app, ["--manifest", str(write_manifest(tmp_path / "m.yaml", data)),
                                       "extract"])
    assert missing.exit_code == 1, missing.output
    lines = missing.stderr.strip().splitlines()
    assert len(lines) == 1 and "image root s3://there-bucket/nothing-here is not a folder" in lines[0]
    entry["root_options"] = {"key": "testing", "secret": "testing",
                             "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
                             "config_kwargs": {"retries": {"max_attempts": 1}}}
    s3fs.S3FileSystem.clear_instance_cache()
    down = CliRunner().invoke(app, ["--manifest", str(write_manifest(tmp_path / "d.yaml", data)),
                                    "extract"])
    assert down.exit_code == 1
    lines = down.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: dataset demo: cannot list image root s3://there-bucket/"), lines


@pytest.mark.slow
def test_with_workers_the_driver_reads_no_image_object_to_hash_or_encode(
        tmp_path: Path, small_demo: Path, s3_endpoint: str, monkeypatch: pytest.MonkeyPatch,
        one_thread: None) -> None:
    pytest.importorskip("distributed")
    from shipyard.pipeline.remote_paths import RemotePath

    _upload(s3_endpoint, small_demo, "workers-bucket", "demo")
    _upload(s3_endpoint, _synthetic_folder(tmp_path), "workers-bucket", "demo/syn")
    assert _invoke(_manifest(tmp_path, small_demo, "disk"), "extract").exit_code == 0
    real = RemotePath.read_bytes

    def driver_read(self: RemotePath) -> bytes:  # the workers are other processes: unpatched
        if self.url.endswith(".png"):
            raise AssertionError(f"the driver read {self.url}")
        return real(self)  # the split file is the driver's to read

    monkeypatch.setattr(RemotePath, "read_bytes", driver_read)
    path = _manifest(tmp_path, small_demo, "s3", s3_endpoint, "s3://workers-bucket/demo")
    result = _invoke(path, "extract", "--json", "--workers", "2")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["extracted"] == 140 and out["failed"] == 0  # hashed and encoded on the workers
    got, want = _arrays(tmp_path / "s3.zarr"), _arrays(tmp_path / "disk.zarr")
    for name, value in want.items():
        assert np.array_equal(got[name], value), name
