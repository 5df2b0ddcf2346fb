"""Crash windows, run as a child process: `python -m tests.crash_harness WORKDIR`.

For each stage in pipeline order, on the store the previous stages left: run the stage once to
count its store writes (every set, delete or move a zarr LocalStore performs) and to take the
reference result; then for every k, on a fresh copy, die at write k: write k and every later
write never reach the store, as if the process were killed there (finally blocks run, but cannot
write). Then run the stage again, normally, compare the store with the reference and verify it.
Prints one JSON object: per stage, the write count and what went wrong at which kill point.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
import zarr
import zarr.storage
from shipyard.pipeline.audit import verify
from shipyard.pipeline.manifest import Manifest
from shipyard.pipeline.manifest_files import load_manifest
from shipyard.pipeline.store import FeatureStore

from tests.conftest import make_small_demo, manifest_dict, run_stage, write_manifest

WRITES = ("set", "set_if_not_exists", "delete", "delete_dir", "move", "clear", "set_sync",
          "delete_sync")
STAGES = ("extract", "train-generator", "synthesize", "train-adapter", "build-cache", "evaluate")
VOLATILE = {"provenance", "created", "seconds"}  # when and how long, not what


class Killed(BaseException):
    """The simulated death of the process at a store write."""


class Fuse:
    """Counts store writes; from write `at` on, every write raises (the process is gone)."""

    def __init__(self) -> None:
        self.count = 0
        self.at: int | None = None

    def hit(self) -> None:
        self.count += 1
        if self.at is not None and self.count >= self.at:
            raise Killed(f"killed at write {self.count}")


FUSE = Fuse()


def _wrap(name: str) -> None:
    original = getattr(zarr.storage.LocalStore, name)
    if not inspect.iscoroutinefunction(original):
        @functools.wraps(original)
        def sync(self: Any, *a: Any, **k: Any) -> Any:
            FUSE.hit()
            return original(self, *a, **k)
        setattr(zarr.storage.LocalStore, name, sync)
        return

    @functools.wraps(original)
    async def wrapper(self: Any, *a: Any, **k: Any) -> Any:
        FUSE.hit()
        return await original(self, *a, **k)
    setattr(zarr.storage.LocalStore, name, wrapper)


def manifest_for(root: Path) -> Manifest:
    data = manifest_dict(root / "data", root / "s.zarr")
    data["ship"] = {"epochs": 3, "batch_size": 64, "checkpoint_every": 1,
                    "synthesize": {"per_class": 3}}
    data["heads"] = {"methods": ["zero-shot", "coop+ship", "tip-adapter", "tip-adapter-f"],
                     "overrides": {"coop": {"epochs": 2}, "tip-adapter-f": {"epochs": 2}}}
    data["datasets"][0]["seeds"] = [1]
    return load_manifest(write_manifest(root / "m.yaml", data))


def copy_case(base: Path, dest: Path) -> Manifest:
    """A copy of the store (the data folder is only read, so it is shared)."""
    dest.mkdir(parents=True, exist_ok=True)
    if (base / "s.zarr").exists():  # before extract there is no store yet
        shutil.copytree(base / "s.zarr", dest / "s.zarr")
    data = yaml.safe_load((base / "m.yaml").read_text())
    data["store"] = str(dest / "s.zarr")
    return load_manifest(write_manifest(dest / "m.yaml", data))


def snapshot(location: str) -> dict[str, Any]:
    """What readers of the store can see, without timestamps and timings."""
    root = zarr.open_group(zarr.storage.LocalStore(location, read_only=True), mode="r")
    out: dict[str, Any] = {}
    for path, node in sorted(root.members(max_depth=None), key=lambda m: m[0]):
        if isinstance(node, zarr.Group):
            out[path] = _clean(dict(node.attrs.asdict()))
        else:
            data = np.asarray(node[...])
            out[path] = [list(data.shape), str(data.dtype),
                         hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()]
    for path, attrs in list(out.items()):  # row tables: only committed rows count
        if isinstance(attrs, dict) and "rows" in attrs and "columns" in attrs:
            for col in ["keys", *attrs["columns"]]:
                arr = root[f"{path}/{col}"]
                assert isinstance(arr, zarr.Array)
                rows = np.asarray(arr[: attrs["rows"]])
                out[f"{path}/{col}"] = hashlib.sha256(rows.tobytes()).hexdigest()
    return out


def _clean(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _stage(m: Manifest, stage: str) -> None:
    run_stage(m, stage)


def _small_and_shared() -> None:
    """Speed, not semantics: the frozen CLIP model is loaded once for all trials (it is never
    written), and the SHIP generator is narrow (the same tensors, so the same write sequence,
    at a thousandth of the bytes)."""
    import shipyard.pipeline.models as models
    import shipyard.pipeline.registry as registry
    from shipyard.pipeline.configs import ShipConfig

    models.load_clip = functools.lru_cache(maxsize=None)(models.load_clip)
    variants = registry.ship_variants()
    small = ShipConfig(latent_dim=16, encoder_hidden=32, generator_hidden=32)
    variants["default"] = replace(variants["default"], config=small)


def main(work: Path, stages: list[str]) -> dict[str, Any]:
    torch.set_num_threads(1)
    _small_and_shared()
    for name in WRITES:
        if hasattr(zarr.storage.LocalStore, name):
            _wrap(name)
    base = work / "base"
    make_small_demo(base, train=2, val=1, test=1)
    m = manifest_for(base)
    out = {}
    for stage in STAGES[: STAGES.index(stages[-1]) + 1]:
        if stage in stages:
            started = time.perf_counter()
            out[stage] = windows(stage, base, work / stage)
            out[stage]["seconds"] = round(time.perf_counter() - started, 1)
        _stage(m, stage)  # the next stage starts from this one's result
    return out


def windows(stage: str, base: Path, work: Path) -> dict[str, Any]:
    ref = copy_case(base, work / "reference")
    FUSE.count = 0
    _stage(ref, stage)
    total = FUSE.count
    want = snapshot(ref.store)
    failures: dict[int, str] = {}
    points = list(range(1, total + 1))
    for k in points:
        case = copy_case(base, work / f"k{k}")
        FUSE.count, FUSE.at = 0, k
        try:
            _stage(case, stage)
            failures[k] = "the stage finished without reaching its kill point"
        except Killed:
            pass  # the expected end of this run: it died at write k
        finally:
            FUSE.at = None
        try:
            _stage(case, stage)
            got = snapshot(case.store)
            if got != want:
                diff = [p for p in sorted(set(got) | set(want)) if got.get(p) != want.get(p)]
                failures[k] = f"store differs from a clean run's at {diff[:3]}"
            else:
                with FeatureStore.open(case.store) as store:
                    report = verify(store)
                if not report.ok:
                    failures[k] = f"verify: {report.problems[:2]}"
        except Exception as exc:
            failures[k] = f"rerun failed: {type(exc).__name__}: {exc}"
        shutil.rmtree(work / f"k{k}", ignore_errors=True)
    return {"writes": total, "killed_at": points, "failures": failures}


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2:] or list(STAGES))))
