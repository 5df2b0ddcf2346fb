"""Sharing: a store written locally, copied to an S3-compatible server (moto on 127.0.0.1), is
read back read-only through its s3:// URL with identical features; a store written on S3 has one
writer at a time, through a lock object created by a conditional write."""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shipyard.cli import app
from shipyard.pipeline.errors import StoreError, StoreLockedError, StoreReadOnlyError
from shipyard.pipeline.locations import ObjectLock
from shipyard.pipeline.manifest import Manifest
from shipyard.pipeline.store import FeatureStore
from typer.testing import CliRunner

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

from tests.conftest import manifest_dict, run_stage, write_manifest  # noqa: E402


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


# -- one writer per store on object storage ---------------------------------------------------

LOCK_FIELDS = {"host", "pid", "since", "token"}


def _s3_manifest(tmp_path: Path, small_demo: Path, url: str) -> Path:
    return write_manifest(tmp_path / "shipyard.yaml", manifest_dict(small_demo, url))  # type: ignore[arg-type]  # a URL, not a path


def _one_line(result: Any) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_second_writer_of_an_s3_store_is_refused_in_one_line(
        tmp_path: Path, small_demo: Path, s3_endpoint: str) -> None:
    """The writer lock of a store on S3 is an object beside it, created with If-None-Match: *;
    a second writer is refused naming the holder, and the first writer's lock is left alone."""
    fs = s3fs.S3FileSystem(**_options(s3_endpoint))
    fs.mkdir("work")
    url = "s3://work/features.zarr"
    path = _s3_manifest(tmp_path, small_demo, url)
    with FeatureStore.open(url, read_only=False, create=True, options=_options(s3_endpoint)):
        holder = json.loads(fs.cat_file("work/features.zarr.lock"))
        assert set(holder) == LOCK_FIELDS and holder["pid"] == os.getpid()
        result = CliRunner().invoke(app, ["--manifest", str(path), "extract"])
        assert result.exit_code == 1
        assert _one_line(result) == (
            f"error: {url} is being written by another process (lock {url}.lock, "
            f"{holder['host']} pid {holder['pid']} since {holder['since']}); if that writer is "
            f"gone, `shipyard --store {url} store unlock` removes the lock")
        assert json.loads(fs.cat_file("work/features.zarr.lock")) == holder
        with pytest.raises(StoreLockedError):
            FeatureStore.open(url, read_only=False, options=_options(s3_endpoint))
        with FeatureStore.open(url, options=_options(s3_endpoint)) as reader:  # readers never wait
            assert reader.read_only
    assert not fs.exists("work/features.zarr.lock")  # released on closing

    result = CliRunner().invoke(app, ["--manifest", str(path), "extract", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["extracted"] == 120
    assert not fs.exists("work/features.zarr.lock")
    with FeatureStore.open(url, options=_options(s3_endpoint)) as shared:
        assert shared.extractor(shared.extractor_fps()[0]).images.rows == 120


def test_a_lock_left_by_a_killed_writer_is_named_and_removed_by_store_unlock(
        s3_endpoint: str) -> None:
    fs = s3fs.S3FileSystem(**_options(s3_endpoint))
    fs.mkdir("stale")
    url = "s3://stale/features.zarr"
    FeatureStore.open(url, read_only=False, create=True, options=_options(s3_endpoint)).close()
    left = ObjectLock.take(url, _options(s3_endpoint))  # a writer killed before releasing it
    holder = json.loads(fs.cat_file("stale/features.zarr.lock"))
    with pytest.raises(StoreLockedError, match=r"store unlock` removes the lock$"):
        FeatureStore.open(url, read_only=False, options=_options(s3_endpoint))

    result = CliRunner().invoke(app, ["--store", url, "store", "unlock", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"store": url, "lock": f"{url}.lock", "removed": True,
                                         "holder": holder}
    assert not fs.exists("stale/features.zarr.lock")
    with FeatureStore.open(url, read_only=False, options=_options(s3_endpoint)):
        left.release()  # the killed writer's release leaves the new writer's lock alone
        assert json.loads(fs.cat_file("stale/features.zarr.lock"))["token"] != holder["token"]
    assert not fs.exists("stale/features.zarr.lock")
    result = CliRunner().invoke(app, ["--store", url, "store", "unlock"])
    assert result.exit_code == 0 and result.stdout.strip() == f"{url}: no writer lock"


def test_a_backend_that_ignores_conditional_writes_is_not_written(
        monkeypatch: pytest.MonkeyPatch, s3_endpoint: str) -> None:
    """Some S3-compatible servers accept If-None-Match and ignore it: a second conditional create
    of the lock then succeeds, so the writer refuses, removes its lock and writes nothing."""
    original = s3fs.S3FileSystem._pipe_file

    async def ignoring(self: Any, path: str, data: bytes, mode: str = "overwrite", **kw: Any) -> Any:
        return await original(self, path, data, **kw)

    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", ignoring)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(**_options(s3_endpoint))
    fs.mkdir("lax")
    url = "s3://lax/features.zarr"
    with pytest.raises(StoreError, match=r"^s3://lax/features.zarr: the object store ignored a "
                                         r"conditional write \(If-None-Match\)"):
        FeatureStore.open(url, read_only=False, create=True, options=_options(s3_endpoint))
    assert fs.find("lax") == []  # neither the lock nor a store


def test_a_denied_lock_is_one_line_before_anything_is_computed(
        tmp_path: Path, small_demo: Path, monkeypatch: pytest.MonkeyPatch, s3_endpoint: str) -> None:
    """Read-only credentials: creating the lock object is denied, and the command says so in one
    line, exit 1, before it encodes anything."""
    async def denied(self: Any, path: str, data: bytes, **kw: Any) -> Any:
        raise PermissionError("Access Denied")

    fs = s3fs.S3FileSystem(**_options(s3_endpoint))
    fs.mkdir("theirs")
    monkeypatch.setattr(s3fs.S3FileSystem, "_pipe_file", denied)
    s3fs.S3FileSystem.clear_instance_cache()
    url = "s3://theirs/features.zarr"
    path = _s3_manifest(tmp_path, small_demo, url)
    result = CliRunner().invoke(app, ["--manifest", str(path), "extract"])
    assert result.exit_code == 1
    assert _one_line(result) == (f"error: {url}: cannot take the writer lock {url}.lock: "
                                 "PermissionError: Access Denied")
    assert fs.find("theirs") == []


def test_stores_where_no_lock_can_be_taken_are_read_only(tmp_path: Path) -> None:
    """memory:// (and any backend without an atomic conditional create) is never written."""
    with pytest.raises(StoreError, match=r"^memory://x.zarr: no writer lock can be taken on "
                                         r"memory:// \(.*s3://\); open it read-only"):
        FeatureStore.open("memory://x.zarr", read_only=False, create=True)


def test_a_store_published_to_s3_reads_back_identical_and_is_never_written(
        make_manifest: Callable[..., Manifest], s3_endpoint: str) -> None:
    m = make_manifest()
    fp = run_stage(m, "extract")["extractor"]
    fs = s3fs.S3FileSystem(**_options(s3_endpoint))
    fs.mkdir("team-a")
    url = "s3://team-a/features.zarr"
    result = CliRunner().invoke(app, ["store", "publish", m.store, url, "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["published"]["rows"][f"extractors/{fp}/images"] == 120
    assert not fs.exists("team-a/features.zarr.lock")  # the publisher's lock is gone
    with FeatureStore.open(m.store) as local, \
            FeatureStore.open(url, options=_options(s3_endpoint)) as shared:
        assert shared.root.attrs["published"]["source"] == m.store
        a, b = local.extractor(fp), shared.extractor(fp)
        np.testing.assert_array_equal(a.images.read("features"), b.images.read("features"))
        np.testing.assert_array_equal(a.view_table.read("norms"), b.view_table.read("norms"))
    verify = CliRunner().invoke(app, ["--store", url, "store", "verify", "--json"])
    assert verify.exit_code == 0 and json.loads(verify.stdout)["ok"]
    with pytest.raises(StoreReadOnlyError, match="is a published store"):
        FeatureStore.open(url, read_only=False, options=_options(s3_endpoint))
    assert not fs.exists("team-a/features.zarr.lock")


# -- two teams: one publishes, the other builds on it with read-only credentials ---------------

class _Requests(logging.Handler):
    """The server's request log lines ("PUT /bucket/key HTTP/1.1" 200)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def writes_to(self, bucket: str) -> list[str]:
        # A refused request's line is coloured: "\x1b[31m\x1b[1mPUT /bucket/key ...".
        return [line for line in self.lines
                if re.search(rf"(?<![A-Z])(PUT|POST|DELETE) /{bucket}[/ ?]", line)]


def _read_only_key(endpoint: str, bucket: str) -> dict[str, str]:
    """An IAM user allowed to list and read one bucket, nothing else: its access key."""
    import boto3

    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    iam.create_user(UserName="team-b")
    iam.put_user_policy(UserName="team-b", PolicyName="read-only", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{
            "Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket", "s3:GetBucketLocation"],
            "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}))
    key = iam.create_access_key(UserName="team-b")["AccessKey"]
    return {"key": key["AccessKeyId"], "secret": key["SecretAccessKey"]}


BUCKET = "team-a-shares"  # moto's buckets live as long as the process: one name per test


def test_team_b_builds_on_team_as_published_store_with_read_only_credentials(
        tmp_path: Path, small_demo: Path, s3_endpoint: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import moto.iam.access_control
    import moto.settings

    def manifest(store: Path, upstream: list[Any] | None = None) -> Path:
        d = manifest_dict(small_demo, store)
        d["ship"] = {"epochs": 3, "synthesize": {"per_class": 4}}
        d["heads"] = {"methods": ["zero-shot", "coop+ship", "tip-adapter+ship"],
                      "overrides": {"coop": {"epochs": 3}}}
        d["datasets"][0]["seeds"] = [1]
        if upstream:
            d["upstream"] = upstream
        return write_manifest(tmp_path / f"{store.stem}.yaml", d)

    def cli(path: Path, *args: str) -> dict[str, Any]:
        result = CliRunner().invoke(app, ["--manifest", str(path), "--device", "cpu", *args,
                                          "--json"])
        assert result.exit_code == 0, result.output
        return dict(json.loads(result.stdout))

    a = manifest(tmp_path / "a.zarr")
    for stage in ("extract", "train-generator", "synthesize"):
        cli(a, stage)
    s3fs.S3FileSystem(**_options(s3_endpoint)).mkdir(BUCKET)
    url = f"s3://{BUCKET}/features.zarr"
    published = CliRunner().invoke(app, ["store", "publish", str(tmp_path / "a.zarr"), url])
    assert published.exit_code == 0, published.output

    key = _read_only_key(s3_endpoint, BUCKET)
    requests = _Requests()
    log = logging.getLogger("werkzeug")
    monkeypatch.setattr(log, "level", logging.INFO)
    monkeypatch.setattr(log, "propagate", False)
    log.addHandler(requests)
    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)  # IAM enforced now
    # moto recomputes request signatures from a decoded query string and so rejects every
    # listing whose prefix holds a "/"; the policy is what is under test, the signing is not.
    monkeypatch.setattr(moto.iam.access_control.IAMRequestBase, "check_signature",
                        lambda self: None)
    try:
        options = {**key, "client_kwargs": {"endpoint_url": s3_endpoint}}
        b = manifest(tmp_path / "b.zarr", [{"location": url, "options": options}])
        trained = cli(b, "train-adapter", "--method", "coop", "--synthetic", "auto")
        cached = cli(b, "build-cache", "--synthetic", "auto")
        b_eval = cli(b, "evaluate")
        b_run = cli(b, "run")
        with pytest.raises(PermissionError):  # the credentials are read-only indeed
            s3fs.S3FileSystem(**options).pipe_file(f"{BUCKET}/probe", b"x")
        for _ in range(50):  # the server logs a request once its answer is sent
            if requests.writes_to(BUCKET):
                break
            time.sleep(0.05)
        forbidden = requests.writes_to(BUCKET)
    finally:
        log.removeHandler(requests)
    assert [line for line in forbidden if "probe" not in line] == []  # shipyard wrote nothing
    assert len(forbidden) == 1  # the probe was seen, so writes are counted
    assert sum(f'"GET /{BUCKET}/' in line for line in requests.lines) > 0  # it was read
    assert {j["status"] for j in b_run["jobs"] if not j["id"].startswith("report")} == \
        {"up to date"}

    a_eval = cli(a, "run")["stages"]["evaluate"]  # team A's own run on the same manifest
    assert [d["table"] for d in b_eval["datasets"]] == [d["table"] for d in a_eval["datasets"]]
    with FeatureStore.open(str(tmp_path / "b.zarr")) as own:
        assert own.extractor_fps() == [] and own.dataset_names() == []  # no image features
    assert (trained["stage"], cached["stage"]) == ("train-adapter", "build-cache")



def test_gc_of_a_working_store_on_s3_removes_and_sizes_what_a_dry_run_lists(
        make_manifest: Callable[..., Manifest], s3_endpoint: str) -> None:
    from shipyard.pipeline.artifacts import ADAPTER, Ref

    m = make_manifest()
    run_stage(m, "extract")
    with FeatureStore.open(m.store, read_only=False) as s:  # a killed head, a killed append
        s.begin(Ref.of(ADAPTER, "1" * 64), {"job": "adapter:x", "kind": "adapter",
                                            "key": "1" * 64, "params": {}, "inputs": {}})
        s.root[f"adapters/{'1' * 64}"].create_array("w", data=np.ones(64, np.float32))
        keys = s.extractor(s.extractor_fps()[0]).images.array("keys")
        rows = keys.shape[0]
        keys.resize((rows + 64, 32))
        keys[rows:] = 3
    fs = s3fs.S3FileSystem(**_options(s3_endpoint))
    fs.mkdir("gc-bucket")
    fs.put(m.store, "gc-bucket/w.zarr", recursive=True)
    url = "s3://gc-bucket/w.zarr"
    before = fs.du("gc-bucket/w.zarr")
    args = ["--manifest", str(m.path), "--store", url, "--device", "cpu", "store", "gc",
            "--grace", "0", "--json"]
    dry = CliRunner().invoke(app, [*args, "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert fs.du("gc-bucket/w.zarr") == before
    real = CliRunner().invoke(app, args)
    assert real.exit_code == 0, real.output
    out = json.loads(real.stdout)
    assert out["removed"] == json.loads(dry.stdout)["removed"]
    assert [(r["reason"], r["path"].split("/")[0]) for r in out["removed"]] == [
        ("incomplete", "adapters"), ("past-rows", "extractors")]
    fs.invalidate_cache()
    assert before - fs.du("gc-bucket/w.zarr") == out["bytes_freed"] > 0
    assert not fs.exists(f"gc-bucket/w.zarr/adapters/{'1' * 64}")
    assert not fs.exists("gc-bucket/w.zarr.lock")  # the writer lock was taken and released


def test_publish_takes_the_destinations_fsspec_options_on_the_command_line(
        make_manifest: Callable[..., Manifest], s3_endpoint: str,
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    m = make_manifest()
    run_stage(m, "extract")
    s3fs.S3FileSystem(**_options(s3_endpoint)).mkdir("options-bucket")
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var)  # nothing in the environment: the options are all there is
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    s3fs.S3FileSystem.clear_instance_cache()
    url = "s3://options-bucket/published.zarr"
    bare = CliRunner().invoke(app, ["store", "publish", m.store, url])
    assert bare.exit_code == 1 and bare.stderr.count("\n") == 1, bare.output
    given = CliRunner().invoke(app, ["store", "publish", m.store, url, "--destination-options",
                                     json.dumps(_options(s3_endpoint)), "--json"])
    assert given.exit_code == 0, given.output
    assert json.loads(given.stdout)["store"] == url
    with FeatureStore.open(url, options=_options(s3_endpoint)) as shared, \
            FeatureStore.open(m.store) as local:
        assert shared.root.attrs["published"]["source"] == m.store
        fp = local.extractor_fps()[0]
        np.testing.assert_array_equal(shared.extractor(fp).images.read("features"),
                                      local.extractor(fp).images.read("features"))
    for bad, says in (("{not json", "--source-options: not JSON"),
                      ("[1, 2]", "--source-options: expected a JSON object")):
        result = CliRunner().invoke(app, ["store", "publish", m.store, url + "2",
                                          "--source-options", bad])
        assert result.exit_code == 2 and says in result.stderr, result.output


def test_a_lock_broken_and_retaken_while_its_writer_releases_it_is_left_alone(
        s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The release reads the holder, then deletes: between the two another writer may have
    broken the lock (`store unlock`) and taken its own. The delete is conditional on the ETag
    read first, so the other writer's lock survives."""
    from shipyard.pipeline import locations

    fs = s3fs.S3FileSystem(**_options(s3_endpoint))
    fs.mkdir("race")
    url = "s3://race/features.zarr"
    mine = ObjectLock.take(url, _options(s3_endpoint))
    taken: list[ObjectLock] = []
    read = locations.read_holder

    def then_retaken(fs_: Any, path: str) -> dict[str, Any]:
        holder = read(fs_, path)  # still mine when read ...
        if not taken:  # ... then broken and taken by another writer before the delete
            fs_.rm_file(path)
            taken.append(ObjectLock.take(url, _options(s3_endpoint)))
        return holder

    monkeypatch.setattr(locations, "read_holder", then_retaken)
    mine.release()
    monkeypatch.setattr(locations, "read_holder", read)
    fs.invalidate_cache()
    assert json.loads(fs.cat_file("race/features.zarr.lock"))["token"] == taken[0].token
    taken[0].release()
    fs.invalidate_cache()
    assert not fs.exists("race/features.zarr.lock")
