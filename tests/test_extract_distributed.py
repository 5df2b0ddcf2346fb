"""`extract` on dask workers: the workers encode, the driver commits in order, and the store is
the one a sequential run writes, bit for bit (keys in order, features, views, norms, failures);
a killed worker's blocks are run again; a killed driver resumes; a worker with another extractor
fingerprint is refused in one line; `--scheduler` and $DASK_SCHEDULER_ADDRESS reach a cluster
started apart. The sequential runs use one torch thread, as each worker does."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
import zarr.storage

from tests.conftest import manifest_dict, write_manifest
from tests.test_sync_clip_fs import invoke

distributed = pytest.importorskip("distributed")
ROOT = Path(__file__).resolve().parent.parent
TABLES = ("images", "views")


def _manifest(tmp_path: Path, demo: Path, name: str) -> Path:
    data = manifest_dict(demo, tmp_path / f"{name}.zarr", chunk_rows=16, batch_size=16)
    return write_manifest(tmp_path / f"{name}.yaml", data)


def _extract(path: Path, *args: str) -> dict[str, Any]:
    result = invoke("--manifest", str(path), "--device", "cpu", "extract", "--json", *args)
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def _tables(store: Path) -> dict[str, dict[str, np.ndarray]]:
    root = zarr.open_group(zarr.storage.LocalStore(store, read_only=True), mode="r")
    (fp,) = list(root["extractors"].group_keys())
    out = {}
    for name in TABLES:
        group = root[f"extractors/{fp}/{name}"]
        rows = int(group.attrs["rows"])  # type: ignore[arg-type]
        out[name] = {c: np.asarray(group[c][:rows]) for c in ("keys", "features", "norms")}  # type: ignore[index]
    return out


def _assert_same_store(got: Path, want: Path) -> None:
    a, b = _tables(got), _tables(want)
    for name in TABLES:
        for column in ("keys", "features", "norms"):
            assert np.array_equal(a[name][column], b[name][column]), (name, column)


@pytest.fixture
def broken_demo(small_demo: Path) -> Path:
    """The small demo with one training image that does not decode: a failure to report."""
    split = json.loads((small_demo / "split.json").read_text())
    (small_demo / "images" / split["train"][3][0]).write_bytes(b"not an image")
    return small_demo


def test_two_local_workers_write_the_sequential_store(tmp_path: Path, broken_demo: Path,
                                                      one_thread: None) -> None:
    sequential = _extract(_manifest(tmp_path, broken_demo, "seq"))
    spread = _extract(_manifest(tmp_path, broken_demo, "w2"), "--workers", "2")
    assert spread["extractor"] == sequential["extractor"]
    for key in ("extracted", "failed", "failures", "views_extracted", "images"):
        assert spread[key] == sequential[key], key
    assert sequential["failed"] == 1 and "not a recognised image" in sequential["failures"][0]["reason"]
    _assert_same_store(tmp_path / "w2.zarr", tmp_path / "seq.zarr")


@pytest.fixture
def cluster() -> Any:
    """A cluster started apart from the command (it leaves the environment as it found it)."""
    before = dict(os.environ)
    try:
        with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                      dashboard_address=None, silence_logs=40) as c:
            yield c
    finally:
        os.environ.clear()
        os.environ.update(before)


def test_an_existing_cluster_by_address_and_by_environment(
        tmp_path: Path, small_demo: Path, cluster: Any, monkeypatch: pytest.MonkeyPatch,
        one_thread: None) -> None:
    _extract(_manifest(tmp_path, small_demo, "seq"))
    _extract(_manifest(tmp_path, small_demo, "flag"), "--scheduler", cluster.scheduler_address)
    _assert_same_store(tmp_path / "flag.zarr", tmp_path / "seq.zarr")
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.scheduler_address)
    _extract(_manifest(tmp_path, small_demo, "env"))
    _assert_same_store(tmp_path / "env.zarr", tmp_path / "seq.zarr")
    with distributed.Client(cluster.scheduler_address) as client:  # the workers did the encoding
        loaded = client.run(lambda: len(__import__("shipyard.pipeline.cluster",
                                                   fromlist=["_MODELS"])._MODELS))
    assert sum(loaded.values()) >= 1


def _other_weights() -> int:
    """On a worker: cache a model with other random weights under the manifest's model."""
    import torch
    from shipyard.pipeline import cluster as c
    from shipyard.pipeline.manifest import ModelSpec
    from shipyard.pipeline.models import load_clip

    spec = {"name": "shipyard-tiny", "pretrained": None}
    clip = load_clip(ModelSpec(**spec, init_seed=12345), torch.device("cpu"))
    c._MODELS[c.model_key(ModelSpec(**spec).model_dump(mode="json"), "cpu")] = clip
    return len(c._MODELS)


def test_a_worker_with_another_fingerprint_is_refused_in_one_line(
        tmp_path: Path, small_demo: Path, cluster: Any) -> None:
    with distributed.Client(cluster.scheduler_address) as client:
        client.run(_other_weights)
    path = _manifest(tmp_path, small_demo, "other")
    result = invoke("--manifest", str(path), "--device", "cpu", "extract", "--scheduler",
                    cluster.scheduler_address)
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: a dask worker (pid ")
    assert "not the driver's" in lines[0] and "its block is refused" in lines[0]
    assert int(_tables_rows(tmp_path / "other.zarr")) == 0  # nothing of it was committed


def _tables_rows(store: Path) -> int:
    root = zarr.open_group(zarr.storage.LocalStore(store, read_only=True), mode="r")
    (fp,) = list(root["extractors"].group_keys())
    return int(root[f"extractors/{fp}/images"].attrs["rows"])  # type: ignore[arg-type]


def _slow_blocks() -> None:
    """On a worker: every block takes 0.4 s longer (a worker started later is not slowed)."""
    import time as t

    from shipyard.pipeline import cluster as c

    real = c.encode_block

    def slow(*args: Any) -> Any:
        t.sleep(0.4)
        return real(*args)

    c.encode_block = slow


@pytest.mark.slow
def test_a_killed_worker_s_blocks_run_again_and_the_store_is_whole(
        tmp_path: Path, small_demo: Path, cluster: Any, one_thread: None) -> None:
    _extract(_manifest(tmp_path, small_demo, "seq"))
    with distributed.Client(cluster.scheduler_address) as client:
        client.run(_slow_blocks)
        pids = list(client.run(os.getpid).values())
    path = _manifest(tmp_path, small_demo, "killed")
    out: dict[str, Any] = {}
    runner = threading.Thread(target=lambda: out.update(
        _extract(path, "--scheduler", cluster.scheduler_address)))
    runner.start()
    deadline = time.monotonic() + 120
    while _committed(tmp_path / "killed.zarr") < 16 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(pids[0], signal.SIGKILL)  # mid-run: the scheduler gives its blocks to the other
    runner.join(timeout=240)
    assert not runner.is_alive() and out["extracted"] == 120
    _assert_same_store(tmp_path / "killed.zarr", tmp_path / "seq.zarr")


def _committed(store: Path) -> int:
    warnings.filterwarnings("ignore", message=".*partial is not recognized", category=UserWarning)
    try:
        return _tables_rows(store)
    except Exception:  # not created yet: keep polling
        return 0


# The driver slows each committed block, so the parent can kill it mid-run.
DRIVER = """
import sys, time
import shipyard.pipeline.cluster as c
real = c._decoded
def slow(result):
    time.sleep(0.3)
    return real(result)
c._decoded = slow
from shipyard.pipeline.cluster import ClusterSpec
from shipyard.pipeline.manifest_files import load_manifest
from tests.conftest import run_stage
if __name__ == "__main__":
    run_stage(load_manifest(sys.argv[1]), "extract", cluster=ClusterSpec(workers=2))
"""


@pytest.mark.slow
def test_a_killed_driver_resumes_to_the_sequential_store(tmp_path: Path, small_demo: Path,
                                                         one_thread: None) -> None:
    import psutil

    _extract(_manifest(tmp_path, small_demo, "seq"))
    path = _manifest(tmp_path, small_demo, "driver")
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, str(script), str(path)], env=env, cwd=ROOT)
    workers: list[Any] = []
    try:
        deadline = time.monotonic() + 180
        while _committed(tmp_path / "driver.zarr") < 16 and time.monotonic() < deadline:
            assert child.poll() is None, "extraction finished before it could be killed"
            time.sleep(0.05)
        workers = psutil.Process(child.pid).children(recursive=True)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
        for w in workers:  # the killed driver's cluster processes go with it
            with contextlib.suppress(psutil.NoSuchProcess):
                w.kill()
    at_kill = _committed(tmp_path / "driver.zarr")
    assert 16 <= at_kill < 120
    again = _extract(path, "--workers", "2")
    assert again["reused"] == at_kill and again["extracted"] == 120 - at_kill
    _assert_same_store(tmp_path / "driver.zarr", tmp_path / "seq.zarr")


def test_bad_cluster_choices_are_one_line(tmp_path: Path, small_demo: Path) -> None:
    path = _manifest(tmp_path, small_demo, "bad")
    both = invoke("--manifest", str(path), "extract", "--workers", "2", "--scheduler",
                  "tcp://127.0.0.1:1")
    assert both.exit_code == 2 and "give one of them" in both.output
    unreachable = invoke("--manifest", str(path), "--device", "cpu", "extract", "--scheduler",
                         "tcp://127.0.0.1:9")
    assert unreachable.exit_code == 2
    assert "cannot reach the dask scheduler at tcp://127.0.0.1:9" in unreachable.output


def test_the_cluster_choice_flags_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from shipyard.pipeline.cluster import ClusterSpec

    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    assert ClusterSpec.resolve(None, None) is None  # in-process
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://10.0.0.1:8786")
    assert ClusterSpec.resolve(None, None) == ClusterSpec(scheduler="tcp://10.0.0.1:8786")
    assert ClusterSpec.resolve(3, None) == ClusterSpec(workers=3)
    assert ClusterSpec.resolve(None, "tcp://h:1") == ClusterSpec(scheduler="tcp://h:1")
