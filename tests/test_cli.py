"""The CLI in-process: exit codes, one JSON object with --json, one-line errors, nothing written on
bad usage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from shipyard.cli import app
from typer.testing import CliRunner

from tests.conftest import manifest_dict, write_manifest

runner = CliRunner()


def invoke(*args: str) -> Any:
    return runner.invoke(app, list(args))


@pytest.fixture
def manifest_path(tmp_path: Path, small_demo: Path) -> Path:
    return write_manifest(tmp_path / "m.yaml", manifest_dict(small_demo, tmp_path / "s.zarr"))


def test_extract_json_reports_counts_and_throughput(manifest_path: Path) -> None:
    result = invoke("--manifest", str(manifest_path), "--device", "cpu", "extract", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)  # exactly one JSON object on stdout
    for key in ("images", "extracted", "reused", "failed", "failures", "seconds",
                "images_per_second"):
        assert key in out
    assert out["images"] == out["extracted"] == 120 and out["images_per_second"] > 0
    again = json.loads(invoke("--manifest", str(manifest_path), "extract", "--json").stdout)
    assert again["extracted"] == 0 and again["reused"] == 120


def test_human_output_and_status(manifest_path: Path) -> None:
    before = invoke("--manifest", str(manifest_path), "status", "--json")
    assert before.exit_code == 0, before.output
    assert json.loads(before.stdout)["up_to_date"] is False
    result = invoke("--manifest", str(manifest_path), "extract")
    assert result.exit_code == 0
    assert "120 images: 120 extracted, 0 reused, 0 failed" in result.stdout
    status = json.loads(invoke("--manifest", str(manifest_path), "status", "--json").stdout)
    assert status["datasets"][0]["missing_features"] == 0
    assert status["stale"] == ["run:demo", "report:demo"]  # features current; nothing evaluated
    assert invoke("--manifest", str(manifest_path), "status", "--check").exit_code == 1
    assert invoke("--manifest", str(manifest_path), "evaluate").exit_code == 0
    status = json.loads(invoke("--manifest", str(manifest_path), "status", "--json").stdout)
    assert status["up_to_date"] is True and status["stale"] == []
    assert invoke("--manifest", str(manifest_path), "status", "--check").exit_code == 0
    text = invoke("--manifest", str(manifest_path), "status").stdout
    assert "demo: 120 records, 0 unusable: up to date" in text


def test_status_names_what_is_stale(manifest_path: Path, small_demo: Path) -> None:
    invoke("--manifest", str(manifest_path), "extract")
    split = json.loads((small_demo / "split.json").read_text())
    a, b = split["train"][0], split["train"][-1]
    a[1:], b[1:] = b[1:], a[1:]  # swap label and class name
    (small_demo / "split.json").write_text(json.dumps(split))
    status = json.loads(invoke("--manifest", str(manifest_path), "status", "--json").stdout)
    assert status["up_to_date"] is False
    assert status["datasets"][0]["stale"] == [
        "records:demo: stored records differ from the split (files added, renamed or relabelled)",
        "run:demo: not built yet", "report:demo: not written yet"]


def test_store_info_and_verify(manifest_path: Path, tmp_path: Path) -> None:
    invoke("--manifest", str(manifest_path), "extract")
    info = json.loads(invoke("--store", str(tmp_path / "s.zarr"), "store", "info", "--json").stdout)
    assert info["extractors"][0]["images"] == 120 and info["extractors"][0]["view_rows"] == 60
    assert info["datasets"][0]["records"] == 120
    ok = invoke("--store", str(tmp_path / "s.zarr"), "store", "verify")
    assert ok.exit_code == 0 and "ok" in ok.stdout


def test_verify_fails_on_corrupted_rows(manifest_path: Path, tmp_path: Path) -> None:
    invoke("--manifest", str(manifest_path), "extract")
    store = tmp_path / "s.zarr"
    root = zarr.open_group(zarr.storage.LocalStore(store), mode="r+")
    fp = next(iter(root["extractors"].group_keys()))
    features = root[f"extractors/{fp}/images/features"]
    row = np.asarray(features[5:6])
    row[0, 3] = np.nan
    features[5:6] = row
    result = invoke("--store", str(store), "store", "verify", "--json")
    assert result.exit_code == 1
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert any("row 5 is not finite" in p for p in report["problems"])


def test_verify_detects_duplicate_keys(manifest_path: Path, tmp_path: Path) -> None:
    invoke("--manifest", str(manifest_path), "extract")
    root = zarr.open_group(zarr.storage.LocalStore(tmp_path / "s.zarr"), mode="r+")
    fp = next(iter(root["extractors"].group_keys()))
    keys = root[f"extractors/{fp}/images/keys"]
    keys[1:2] = np.asarray(keys[0:1])
    report = json.loads(invoke("--store", str(tmp_path / "s.zarr"), "store", "verify",
                               "--json").stdout)
    assert any("1 duplicate keys" in p for p in report["problems"])


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("model"), "model: missing required field"),
    (lambda d: d["extraction"].update(views="four"), "extraction.views: expected an integer"),
    (lambda d: d["datasets"][0].update(format="parquet"),
     "datasets[0].format: unknown value 'parquet' (expected one of: coop, imagefolder)"),
    (lambda d: d["datasets"][0].update(shots=0), "datasets[0].shots: expected an integer >= 1"),
    (lambda d: d.update(stores="x"), "stores: unknown field"),
    (lambda d: d["datasets"][0].update(templates=["no placeholder"]),
     "datasets[0].templates[0]: expected a string with one '{}'"),
    (lambda d: d["datasets"][0].update(templates=["a photo of a {}.", "a {x} photo"]),
     "datasets[0].templates[1]: expected a string with one '{}' and no other replacement field, "
     "got 'a {x} photo'"),
    (lambda d: d["datasets"][0].update(templates=["a {0} photo"]),
     "datasets[0].templates[0]: expected a string with one '{}'"),
    (lambda d: d["datasets"][0].update(templates="preset:Nope"),
     "datasets[0].templates: unknown template preset 'Nope'"),
    (lambda d: d["datasets"][0].update(seeds=[1, True]),
     "datasets[0].seeds[1]: expected an integer, got True"),
    (lambda d: d.update(ship={"variant": "huge"}),
     "ship.variant: unknown value 'huge' (expected one of: default, imagenet)"),
    (lambda d: d["heads"].update(methods=["zero-shot+ship"]),
     "heads.methods[0]: unknown method 'zero-shot+ship'"),
    (lambda d: d["heads"].update(overrides={"coop": {"epochs": "ten"}}),
     "heads.overrides: coop.epochs: expected int, got 'ten'"),
    (lambda d: d["heads"].update(cache_index="lsh"),
     "heads.cache_index: unknown value 'lsh' (expected one of: flat, ivf, hnsw, classes)"),
    (lambda d: d["datasets"][0].pop("split_file"),
     "datasets[0].split_file: missing required field (format coop reads one)"),
    (lambda d: d["datasets"].append(dict(d["datasets"][0])),
     "datasets: dataset name 'demo' is used more than once"),
])
def test_bad_manifest_exits_2_with_one_line_and_writes_nothing(
        tmp_path: Path, small_demo: Path, edit: Any, message: str) -> None:
    data = manifest_dict(small_demo, tmp_path / "never.zarr")
    edit(data)
    path = write_manifest(tmp_path / "bad.yaml", data)
    result = invoke("--manifest", str(path), "extract")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    assert str(path) in lines[0] and message in lines[0], lines[0]
    assert not (tmp_path / "never.zarr").exists()


def test_missing_manifest_and_bad_yaml(tmp_path: Path) -> None:
    result = invoke("--manifest", str(tmp_path / "nope.yaml"), "extract")
    assert result.exit_code == 2 and "manifest not found" in result.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: [unclosed\n")
    result = invoke("--manifest", str(bad), "status")
    assert result.exit_code == 2 and "not valid YAML" in result.stderr


def test_bad_split_file_exits_2(tmp_path: Path, small_demo: Path) -> None:
    (small_demo / "split.json").write_text(json.dumps({"train": [["a.png", "zero", "x"]],
                                                       "test": []}))
    path = write_manifest(tmp_path / "m.yaml", manifest_dict(small_demo, tmp_path / "s.zarr"))
    result = invoke("--manifest", str(path), "extract")
    assert result.exit_code == 2
    assert "train[0]: expected [relative_path, label >= 0, classname]" in result.stderr
    assert not (tmp_path / "s.zarr").exists()


def test_usage_errors_exit_2(manifest_path: Path) -> None:
    assert invoke("--manifest", str(manifest_path), "--device", "tpu", "extract").exit_code == 2
    assert invoke("--manifest", str(manifest_path), "extract", "--dataset", "nope").exit_code == 2
    assert invoke("nonexistent-command").exit_code == 2


def test_store_commands_on_missing_store(tmp_path: Path) -> None:
    result = invoke("--store", str(tmp_path / "none.zarr"), "store", "info")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: no shipyard store at {tmp_path / 'none.zarr'} " \
                                    "(run `shipyard extract` first)"


def test_seed_outside_the_manifest_exits_2(manifest_path: Path) -> None:
    invoke("--manifest", str(manifest_path), "extract")
    for command in (["train-generator"], ["synthesize"], ["train-adapter", "--method", "coop"],
                    ["build-cache"], ["evaluate"]):
        result = invoke("--manifest", str(manifest_path), *command, "--seed", "7")
        assert result.exit_code == 2, (command, result.output)
        assert "dataset demo: seed 7 is not in its seeds (1, 2)" in result.stderr


def test_manifest_schema_validates_the_shipped_manifests() -> None:
    import jsonschema
    import yaml

    result = invoke("manifest", "schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert set(schema["required"]) == {"store", "model", "datasets"}
    assert "path" not in schema["properties"]
    root = Path(__file__).resolve().parent.parent
    jsonschema.validate(yaml.safe_load((root / "data_manifest.yaml").read_text()), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"store": "x", "model": {"name": "m"}, "datasets": [],
                             "shipp": {}}, schema)


def test_manifest_check_reads_the_split_files(manifest_path: Path, tmp_path: Path) -> None:
    result = invoke("--manifest", str(manifest_path), "manifest", "check", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["datasets"] == {"demo": 120}
    assert not (tmp_path / "s.zarr").exists()


def test_a_relative_store_option_is_relative_to_the_current_folder_for_every_command(
        tmp_path: Path, small_demo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "manifests").mkdir()
    path = write_manifest(tmp_path / "manifests" / "m.yaml",
                          manifest_dict(small_demo, tmp_path / "unused.zarr"))
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert invoke("--manifest", str(path), "--store", "rel.zarr", "extract").exit_code == 0
    assert (tmp_path / "work" / "rel.zarr").is_dir()
    assert not (tmp_path / "manifests" / "rel.zarr").exists()
    assert invoke("--store", "rel.zarr", "store", "verify").exit_code == 0
    status = json.loads(invoke("--manifest", str(path), "--store", "rel.zarr", "status",
                               "--json").stdout)
    assert status["store"] == str(tmp_path / "work" / "rel.zarr")


def test_verbose_shows_shipyard_job_lines_and_completion_is_offered(manifest_path: Path) -> None:
    """-v: shipyard's own log lines (job, status, key, seconds) on stderr; without it none.
    --help offers shell completion (typer's --install-completion / --show-completion)."""
    quiet = invoke("--manifest", str(manifest_path), "--device", "cpu", "extract")
    assert quiet.exit_code == 0 and "records:demo:" not in quiet.stderr
    again = invoke("--manifest", str(manifest_path), "-v", "evaluate")
    assert again.exit_code == 0, again.output
    lines = [ln for ln in again.stderr.splitlines() if "run:demo:" in ln]
    assert lines and "key " in lines[0] and lines[0].rstrip().endswith("s)"), again.stderr
    help_text = invoke("--help").stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text
