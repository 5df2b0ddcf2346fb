"""A write the store refuses part-way (permissions, read-only credentials): one line naming the
store and the job, exit 1, after the results already computed are printed and kept."""

from __future__ import annotations

import errno
import json
import re
from pathlib import Path
from typing import Any

import pytest
from shipyard.cli import app
from shipyard.pipeline.artifacts import ADAPTER, RUN, keys_of
from shipyard.pipeline.errors import is_denied
from shipyard.pipeline.store import FeatureStore
from typer.testing import CliRunner

from tests.conftest import manifest_dict, write_manifest


def _manifest(tmp_path: Path, small_demo: Path) -> Path:
    data = manifest_dict(small_demo, tmp_path / "s.zarr")
    data["heads"] = {"methods": ["zero-shot", "coop"], "overrides": {"coop": {"epochs": 3}}}
    data["datasets"][0]["seeds"] = [1]
    return write_manifest(tmp_path / "m.yaml", data)


@pytest.fixture
def deny_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store refuses to take an evaluation run, as a bucket whose policy denies runs/ would."""
    begin = FeatureStore.begin

    def refusing(self: FeatureStore, ref: Any, *args: Any, **kwargs: Any) -> Any:
        if ref.kind is RUN:
            raise PermissionError("Access Denied")
        return begin(self, ref, *args, **kwargs)

    monkeypatch.setattr(FeatureStore, "begin", refusing)


def test_a_denied_write_prints_what_ran_keeps_it_and_fails_in_one_line(
        tmp_path: Path, small_demo: Path, deny_runs: None) -> None:
    path = _manifest(tmp_path, small_demo)
    store = str(tmp_path / "s.zarr")
    result = CliRunner().invoke(app, ["--manifest", str(path), "--device", "cpu", "run", "--json"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.fullmatch(rf"error: {re.escape(store)}: writing run:demo was denied "
                        r"\(PermissionError: Access Denied\); what ran before it is kept in the "
                        r"store", lines[0]), lines[0]
    out = json.loads(result.stdout)
    assert out["exit_code"] == 1 and out["error"] == lines[0].removeprefix("error: ")
    assert out["stages"]["extract"]["extracted"] == 120
    (adapter,) = out["stages"]["train-adapter"]["adapters"]
    assert adapter["method"] == "coop"
    assert "evaluate" not in out["stages"]
    with FeatureStore.open(store) as s:
        assert len(keys_of(s.root, ADAPTER)) == 1 and keys_of(s.root, RUN) == []


def test_the_next_run_reuses_what_was_kept(tmp_path: Path, small_demo: Path,
                                          monkeypatch: pytest.MonkeyPatch, deny_runs: None) -> None:
    path = _manifest(tmp_path, small_demo)
    args = ["--manifest", str(path), "--device", "cpu", "run", "--json"]
    assert CliRunner().invoke(app, args).exit_code == 1
    monkeypatch.undo()  # the store takes runs again
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    statuses = {j["id"]: j["status"] for j in json.loads(result.stdout)["jobs"]}
    assert statuses == {"records:demo": "up to date", "adapter:demo:seed1:coop": "up to date",
                        "run:demo": "built", "report:demo": "built"}


def test_the_human_output_shows_the_results_before_the_error(
        tmp_path: Path, small_demo: Path, deny_runs: None) -> None:
    path = _manifest(tmp_path, small_demo)
    run = CliRunner().invoke(app, ["--manifest", str(path), "--device", "cpu", "run"])
    assert run.exit_code == 1
    assert "extract: 120 images: 120 extracted" in run.stdout
    assert "coop" in run.stdout
    assert run.stderr.strip().splitlines() == [
        f"error: {tmp_path / 's.zarr'}: writing run:demo was denied (PermissionError: Access "
        "Denied); what ran before it is kept in the store"]


def test_only_refusals_count_as_denied_writes() -> None:
    assert is_denied(PermissionError("Access Denied"))
    assert is_denied(OSError(errno.EROFS, "Read-only file system"))
    assert is_denied(OSError(errno.EACCES, "Permission denied"))
    assert not is_denied(OSError(errno.ENOSPC, "No space left on device"))
    assert not is_denied(ValueError("not an OS error"))
