"""Progress when stderr is not a terminal: one-line records every few seconds while a task is
open, advanced or not, so a long run in a log never looks dead; nothing for short tasks."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest
from shipyard.cli import app
from shipyard.pipeline import extraction
from shipyard.pipeline.progress import LogProgress
from typer.testing import CliRunner

from tests.conftest import manifest_dict, write_manifest


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_record_names_the_stage_count_rate_and_eta() -> None:
    clock = Clock()
    progress = LogProgress(io.StringIO(), interval=3600, clock=clock)
    task = progress.task("encode images", 10, "img")
    task.advance(4)
    clock.now = 102.0
    assert task.line() == "progress: encode images 4/10 img (40%), 2.0 img/s, eta 3 s, 2 s elapsed"  # type: ignore[attr-defined]
    task.note("seed 2")
    assert task.line().endswith("[seed 2]")  # type: ignore[attr-defined]
    untotalled = progress.task("hash", None, "file")
    untotalled.advance(6)
    clock.now = 105.0
    assert untotalled.line() == "progress: hash 6 file, 2.0 file/s, 3 s elapsed"  # type: ignore[attr-defined]
    task.close()
    untotalled.close()


def _lines(stream: io.StringIO) -> list[str]:
    return [line for line in stream.getvalue().splitlines() if line]


def test_records_keep_coming_while_a_task_makes_no_progress_and_stop_when_it_closes() -> None:
    stream = io.StringIO()
    task = LogProgress(stream, interval=0.05).task("train head", 5, "epoch")
    deadline = time.monotonic() + 5
    while len(_lines(stream)) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    task.close()
    lines = _lines(stream)
    assert len(lines) >= 3 and all(line.startswith("progress: train head 0/5 epoch (0%)") for line in lines)
    assert "eta unknown" in lines[0]
    time.sleep(0.15)
    assert _lines(stream) == lines  # closed: silent


def test_a_task_shorter_than_the_interval_writes_nothing() -> None:
    stream = io.StringIO()
    task = LogProgress(stream, interval=30).task("evaluate", 3, "head")
    task.advance(3)
    task.close()
    assert stream.getvalue() == ""
    with pytest.raises(ValueError, match="> 0"):
        LogProgress(stream, interval=0)


@pytest.fixture
def slowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Encoding 0.05 s slower per batch: the demo's extraction takes long enough to report on."""
    real = extraction.encode_images

    def slow(clip: Any, x: Any) -> Any:
        time.sleep(0.05)
        return real(clip, x)

    monkeypatch.setattr(extraction, "encode_images", slow)


@pytest.mark.parametrize("command", [["extract"], ["run"]])
def test_a_non_terminal_run_reports_progress_on_stderr(command: list[str], tmp_path: Path,
                                                      small_demo: Path, slowed: None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHIPYARD_PROGRESS_SECONDS", "0.1")
    path = write_manifest(tmp_path / "m.yaml", manifest_dict(small_demo, tmp_path / "s.zarr",
                                                             batch_size=8))
    result = CliRunner().invoke(app, ["--manifest", str(path), "--device", "cpu", *command, "--json"])
    assert result.exit_code == 0, result.output
    records = [line for line in result.stderr.splitlines() if line.startswith("progress: ")]
    assert any(line.startswith("progress: encode images ") and " img/s" in line for line in records)
    assert result.stdout.lstrip().startswith("{")  # stdout stays one JSON object
    fresh = write_manifest(tmp_path / "q.yaml", manifest_dict(small_demo, tmp_path / "q.zarr",
                                                              batch_size=8))
    quiet = CliRunner().invoke(app, ["--manifest", str(fresh), "--device", "cpu", "--quiet",
                                     *command, "--json"])
    assert quiet.exit_code == 0, quiet.output
    assert "progress: " not in quiet.stderr


def test_a_bad_progress_interval_is_one_line(tmp_path: Path, small_demo: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHIPYARD_PROGRESS_SECONDS", "soon")
    path = write_manifest(tmp_path / "m.yaml", manifest_dict(small_demo, tmp_path / "s.zarr"))
    result = CliRunner().invoke(app, ["--manifest", str(path), "--device", "cpu", "extract"])
    assert result.exit_code == 2
    assert "SHIPYARD_PROGRESS_SECONDS='soon': expected a number of seconds" in result.output
