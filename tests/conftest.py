"""Shared fixtures: small CoOp-format datasets cut from the embedded demo, manifests for them, and
a local S3-compatible server."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import settings
from shipyard.pipeline.manifest import Manifest, ModelSpec
from shipyard.pipeline.manifest_files import load_manifest
from shipyard.pipeline.models import ClipModel, load_clip
from shipyard.pipeline.text_encoder import PromptEncoder

from tests.write_guard import pytest_configure, pytest_sessionfinish  # noqa: F401  the session's hooks

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "fashion_demo"

# Property tests replay the same examples on every run and keep no example database on disk.
settings.register_profile("shipyard", database=None, derandomize=True, deadline=None)
settings.load_profile("shipyard")


@pytest.hookimpl(trylast=True)  # after -m / -k have deselected: start nothing they left out
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    """The crash-window tests go last and their two child processes start now, so the children
    (about two minutes, one thread each) run beside every other test instead of before them.
    While they run, this process keeps torch to one thread: two OpenMP threads on cores shared
    with other processes stall (12x measured)."""
    windows = [i for i in items if i.nodeid.startswith("tests/test_crash_windows.py")]
    if not windows:
        return
    items[:] = [i for i in items if i not in windows] + windows
    from tests.test_crash_windows import start_children

    work = Path(config._tmp_path_factory.mktemp("windows"))  # type: ignore[attr-defined]
    config._crash_children = start_children(work)  # type: ignore[attr-defined]
    torch.set_num_threads(1)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Children of an interrupted session do not outlive it."""
    for child in getattr(config, "_crash_children", []):
        if child.poll() is None:
            child.kill()
            child.communicate()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny tensors: one thread is as fast, and immune to the stalls of multi-threaded kernels
    when other processes share the cores (0.07 s vs 11 s measured for a training test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clip() -> ClipModel:
    return load_clip(ModelSpec(name="shipyard-tiny"), torch.device("cpu"))


@pytest.fixture(scope="module")
def encoder(clip: ClipModel) -> PromptEncoder:
    return PromptEncoder.from_clip(clip)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test gets its own stat cache, so no test sees another's hashes."""
    monkeypatch.setenv("SHIPYARD_CACHE_DIR", str(tmp_path / "cache"))


def demo_split() -> dict[str, list[list[Any]]]:
    data: dict[str, list[list[Any]]] = json.loads((DEMO / "split_zhou_FashionDemo.json").read_text())
    return data


@pytest.fixture
def small_demo(tmp_path: Path) -> Path:
    """A copy of part of the demo: per class 6 train, 2 val, 4 test images (120 files)."""
    return make_small_demo(tmp_path)


def make_small_demo(tmp_path: Path, train: int = 6, val: int = 2, test: int = 4) -> Path:
    """Per class `train`, `val` and `test` images of the demo, copied under tmp_path/data."""
    full = demo_split()
    per = {"train": train, "val": val, "test": test}
    split: dict[str, list[list[Any]]] = {}
    for name, n in per.items():
        taken: dict[int, int] = {}
        split[name] = []
        for path, label, cls in full[name]:
            if taken.get(label, 0) < n:
                taken[label] = taken.get(label, 0) + 1
                split[name].append([path, label, cls])
    root = tmp_path / "data"
    for rows in split.values():
        for path, _label, _cls in rows:
            dest = root / "images" / path
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(DEMO / "images" / path, dest)
    (root / "split.json").write_text(json.dumps(split))
    return root


def manifest_dict(data_root: Path, store: Path, **extraction: Any) -> dict[str, Any]:
    return {
        "store": str(store),
        "model": {"name": "shipyard-tiny", "pretrained": None},
        "extraction": {"views": 2, "views_for": "train", "batch_size": 16, "workers": 2,
                       "chunk_rows": 32, **extraction},
        "datasets": [{
            "name": "demo",
            "format": "coop",
            "root": str(data_root / "images"),
            "split_file": str(data_root / "split.json"),
            "templates": ["a photo of a {}."],
            "shots": 4,
            "seeds": [1, 2],
        }],
        "heads": {"methods": ["zero-shot"]},  # nothing to train unless a test asks for heads
    }


def write_manifest(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def make_manifest(tmp_path: Path, small_demo: Path) -> Callable[..., Manifest]:
    """Write a manifest for `small_demo` (store under tmp_path) and load it."""

    def make(store: str = "store.zarr", model: dict[str, Any] | None = None,
             ship: dict[str, Any] | None = None, **extraction: Any) -> Manifest:
        data = manifest_dict(small_demo, tmp_path / store, **extraction)
        if model:
            data["model"].update(model)
        if ship:
            data["ship"] = ship
        return load_manifest(write_manifest(tmp_path / f"{store}.yaml", data))

    return make


def run_stage(manifest: Manifest, stage: str, *, seeds: tuple[int, ...] = (),
              methods: tuple[str, ...] | None = None, strict: bool = False, force: bool = False,
              cluster: Any = None, **options: Any) -> dict[str, Any]:
    """One stage command from Python, on the CPU: what `shipyard <stage>` runs."""
    from shipyard.stages.commands import stage_command
    from shipyard.stages.runner import Request

    if methods is None and stage in ("extract", "train-generator", "synthesize"):
        methods = ()
    request = Request((), seeds, methods, {k: v for k, v in options.items() if v is not None})
    return stage_command(manifest, stage, request, device="cpu", strict=strict, force=force,
                         cluster=cluster)


def run_once(root: Path, manifest: Callable[[Path, Path], dict[str, Any]]) -> str:
    """`shipyard run --json` on a fresh small demo under `root` (its own stat cache); the stdout.
    For module-scoped fixtures whose tests each work on a copy (`copy_run`)."""
    from shipyard.cli import app
    from typer.testing import CliRunner

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHIPYARD_CACHE_DIR", str(root / "cache"))
        path = write_manifest(root / "m.yaml", manifest(make_small_demo(root), root / "s.zarr"))
        result = CliRunner().invoke(app, ["--manifest", str(path), "--device", "cpu", "run",
                                          "--json"])
    assert result.exit_code == 0, result.output
    return result.stdout


def copy_run(root: Path, stdout: str, tmp_path: Path,
             manifest: Callable[[Path, Path], dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """A test's own copy of a `run_once` store and reports, beside its own small demo (which
    the `small_demo` fixture made at tmp_path/data): the manifest path and the run's summary."""
    shutil.copytree(root / "s.zarr", tmp_path / "s.zarr")
    if (root / "reports").exists():
        shutil.copytree(root / "reports", tmp_path / "reports")
    path = write_manifest(tmp_path / "m.yaml", manifest(tmp_path / "data", tmp_path / "s.zarr"))
    return path, json.loads(stdout.replace(str(root), str(tmp_path)))


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A local S3-compatible server (moto on 127.0.0.1), its endpoint in the environment."""
    s3fs = pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    # The server's request log would land in the CLI's stderr beside its one-line errors.
    monkeypatch.setattr(logging.getLogger("werkzeug"), "level", logging.WARNING)
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


def checkpoint_epoch(store: Path, folder: str) -> int:
    """The epoch of the newest checkpoint a training in `<store>/<folder>/` has written (0: none
    yet), read while the training writes: for the kill-and-resume tests."""
    import warnings

    import zarr.storage

    # Polling races the writer by design: zarr warns about its in-flight temporary files.
    warnings.filterwarnings("ignore", message=".*partial is not recognized", category=UserWarning)
    try:
        root = zarr.open_group(zarr.storage.LocalStore(store, read_only=True), mode="r")
        for key in root[folder].group_keys():
            name = root[f"{folder}/{key}"].attrs.get("checkpoint")
            return int(str(name).removeprefix("checkpoint_")) if name else 0
    except Exception:  # not created yet: keep polling
        return 0
    return 0


def slow_checkpoints_child(call: str) -> str:
    """A child process's script for the kill-and-resume tests: `call` (a `run_stage(...)` on the
    manifest at argv[1]) at the parent's torch thread count (argv[2]; the resumed half runs in
    the parent), each checkpoint followed by 0.3 s so the parent can kill it between two."""
    return f"""
import sys, time
import torch
torch.set_num_threads(int(sys.argv[2]))
import shipyard.pipeline.checkpoints as checkpoints
real = checkpoints.save_checkpoint
def slow(group, state):
    real(group, state)
    time.sleep(0.3)
checkpoints.save_checkpoint = slow
from shipyard.pipeline.manifest_files import load_manifest
from tests.conftest import run_stage
{call}
"""
