"""A SIGKILLed `extract` resumes, and the store ends equal to a clean run's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import zarr
from shipyard.pipeline.audit import verify
from shipyard.pipeline.manifest import Manifest
from shipyard.pipeline.store import FeatureStore

from tests.conftest import run_stage

# The child slows each forward down so the parent can kill it mid-run.
CHILD = """
import sys, time
import shipyard.pipeline.extraction as ex
real = ex.encode_images
def slow(clip, batch):
    time.sleep(0.15)
    return real(clip, batch)
ex.encode_images = slow
from shipyard.pipeline.manifest_files import load_manifest
from tests.conftest import run_stage
run_stage(load_manifest(sys.argv[1]), "extract")
"""


def _committed_rows(store: Path) -> int:
    # Polling races the writer by design: zarr warns about its in-flight temporary files.
    warnings.filterwarnings("ignore", message=".*partial is not recognized", category=UserWarning)
    try:
        root = zarr.open_group(zarr.storage.LocalStore(store, read_only=True), mode="r")
        for fp in root["extractors"].group_keys():
            return int(root[f"extractors/{fp}/images"].attrs["rows"])
    except Exception:  # not created yet, or mid-creation: keep polling
        return 0
    return 0


def _snapshot(store_path: str, fp: str) -> dict[str, dict[bytes, np.ndarray]]:
    with FeatureStore.open(store_path) as store:
        ex = store.extractor(fp)
        out = {}
        for name, table in (("images", ex.images), ("views", ex.view_table)):
            keys = table.keys()
            assert len({k.tobytes() for k in keys}) == len(keys), f"duplicate {name} rows"
            out[name] = dict(zip(map(bytes, keys), table.read("features"), strict=True))
        return out


def test_sigkill_mid_extract_then_resume_equals_clean_run(
        make_manifest: Callable[..., Manifest], tmp_path: Path) -> None:
    killed = make_manifest(store="killed.zarr", batch_size=16, chunk_rows=32)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(killed.path)], env=env, cwd=root)
    try:
        deadline = time.monotonic() + 120
        while _committed_rows(Path(killed.store)) < 48 and time.monotonic() < deadline:
            assert child.poll() is None, "extract finished before it could be killed"
            time.sleep(0.02)
        rows_at_kill = _committed_rows(Path(killed.store))
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    assert 48 <= rows_at_kill < 120, rows_at_kill
    assert child.returncode == -signal.SIGKILL

    # status on the half-extracted store counts exactly what the resumed extract then encodes.
    from shipyard.stages.runner import Request
    from shipyard.stages.status import status

    before = status(killed, Request(), device="cpu")["datasets"][0]
    resumed = run_stage(killed, "extract")
    assert resumed["reused"] >= rows_at_kill  # committed work survived the kill
    assert resumed["extracted"] == 120 - resumed["reused"]
    assert before["missing_features"] == resumed["extracted"]
    assert before["missing_views"] == resumed["views_extracted"]

    clean = make_manifest(store="clean.zarr", batch_size=16, chunk_rows=32)
    reference = run_stage(clean, "extract")
    assert reference["extractor"] == resumed["extractor"]

    got = _snapshot(killed.store, resumed["extractor"])
    want = _snapshot(clean.store, reference["extractor"])
    for name in ("images", "views"):
        assert got[name].keys() == want[name].keys(), name
        for key, value in want[name].items():
            np.testing.assert_array_equal(got[name][key], value)
    with FeatureStore.open(killed.store) as store:
        report = verify(store)
        assert report.ok, report.problems
        # Same rows in the same order as the clean run: batches never straddled a chunk.
        ref_keys = FeatureStore.open(clean.store).extractor(reference["extractor"]).images.keys()
        np.testing.assert_array_equal(store.extractor(resumed["extractor"]).images.keys(), ref_keys)
