"""Sharing: a store written locally, copied to an S3-compatible server (moto on 127.0.0.1), is
read back read-only through its s3:// URL with identical features."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from shipyard.cli import app
from shipyard.pipeline.errors import StoreReadOnlyError
from shipyard.pipeline.manifest import Manifest
from shipyard.pipeline.store import FeatureStore
from typer.testing import CliRunner

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from tests.conftest import run_stage  # noqa: E402


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    s3fs.S3FileSystem.clear_instance_cache()  # cached clients would keep an older endpoint
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for var, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(var, value)
        yield endpoint
    finally:
        server.stop()


def _options(endpoint: str) -> dict[str, object]:
    return {"key": "testing", "secret": "testing", "client_kwargs": {"endpoint_url": endpoint}}


def test_store_copied_to_s3_reads_back_identical(make_manifest: Callable[..., Manifest],
                                                 s3_endpoint: str) -> None:
    m = make_manifest()
    out = run_stage(m, "extract")
    fs = s3fs.S3FileSystem(**_options(s3_endpoint))
    fs.mkdir("team-bucket")
    fs.put(m.store, "team-bucket/features.zarr", recursive=True)
    url = "s3://team-bucket/features.zarr"

    with FeatureStore.open(m.store) as local, \
            FeatureStore.open(url, options=_options(s3_endpoint)) as shared:
        assert shared.read_only
        assert shared.extractor_fps() == local.extractor_fps() == [out["extractor"]]
        a, b = local.extractor(out["extractor"]), shared.extractor(out["extractor"])
        np.testing.assert_array_equal(a.images.keys(), b.images.keys())
        np.testing.assert_array_equal(a.images.read("features"), b.images.read("features"))
        np.testing.assert_array_equal(a.view_table.read("features"), b.view_table.read("features"))
        ta = a.texts("a photo of a {}.", local.dataset("demo").classnames)
        tb = b.texts("a photo of a {}.", shared.dataset("demo").classnames)
        assert ta is not None and tb is not None
        np.testing.assert_array_equal(ta.features, tb.features)
        np.testing.assert_array_equal(local.dataset("demo").keys(), shared.dataset("demo").keys())
        assert local.dataset("demo").paths() == shared.dataset("demo").paths()
        with pytest.raises(StoreReadOnlyError):
            b.images.writer()

    # The CLI reads the same URL (endpoint and credentials from the environment).
    result = CliRunner().invoke(app, ["--store", url, "store", "verify", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["ok"] and report["checked"]["rows"] == 180
    listing = fs.find("team-bucket/features.zarr")
    assert all(not p.endswith(".lock") for p in listing)  # writers' lock stays local


def test_missing_s3_store_is_a_clear_error(s3_endpoint: str) -> None:
    fs = s3fs.S3FileSystem(**_options(s3_endpoint))
    fs.mkdir("empty-bucket")
    result = CliRunner().invoke(app, ["--store", "s3://empty-bucket/none.zarr", "store", "info"])
    assert result.exit_code == 1
    assert "no shipyard store at s3://empty-bucket/none.zarr" in result.stderr


def test_unreachable_s3_store_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    result = CliRunner().invoke(app, ["--store", "s3://b/x.zarr", "store", "info"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot reach store s3://b/x.zarr")
