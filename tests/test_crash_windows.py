"""Crash windows: every stage killed between every pair of consecutive store writes, then run
again, ends with the store a clean run leaves, and `store verify` passes. The kills happen in
child processes (tests/crash_harness.py says how a kill is injected); two run side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Two children, about equal in length (measured alone: extract 82 s of the first; train-generator
# 56 s and train-adapter 26 s of the second); each runs the stages it does not kill, in order, to
# build the store its next windowed stage starts from.
GROUPS = (("extract", "synthesize", "evaluate"), ("train-generator", "train-adapter", "build-cache"))


def start_children(work: Path) -> list[subprocess.Popen[str]]:
    """Start the children (single-threaded, in their own folders under `work`). The suite starts
    them as soon as it is collected and runs these tests last, so the children overlap every
    other test (tests/conftest.py)."""
    env = {**os.environ, "SHIPYARD_CACHE_DIR": str(work / "cache")}
    children = []
    for i, group in enumerate(GROUPS):
        folder = work / f"windows{i}"
        folder.mkdir(parents=True, exist_ok=True)
        children.append(subprocess.Popen(
            [sys.executable, "-m", "tests.crash_harness", str(folder), *group], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return children


@pytest.fixture(scope="module")
def windows(request: pytest.FixtureRequest,
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    children = getattr(request.config, "_crash_children", None)
    if children is None:  # not started at collection (e.g. run through another entry point)
        children = start_children(tmp_path_factory.mktemp("windows"))
    out: dict[str, Any] = {}
    for child in children:
        stdout, stderr = child.communicate(timeout=900)
        assert child.returncode == 0, stderr[-3000:]
        out |= json.loads(stdout)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [s for group in GROUPS for s in group])
def test_a_kill_at_any_store_write_resumes_to_a_clean_store(stage: str,
                                                            windows: dict[str, Any]) -> None:
    result = windows[stage]
    # Every artefact kind is written by some stage; each stage writes more than a commit.
    assert result["writes"] >= 8, result
    assert result["killed_at"] == list(range(1, result["writes"] + 1))
    assert result["failures"] == {}, result["failures"]
