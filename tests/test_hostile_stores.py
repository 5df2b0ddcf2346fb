"""Broken and crafted stores: every command fails in one line with the right exit code, and
nothing committed is harmed (nor anything outside the store)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from shipyard.cli import app
from typer.testing import CliRunner

from tests.conftest import copy_run, manifest_dict, run_once


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def _with_heads(data: Path, store: Path) -> dict[str, Any]:
    out = manifest_dict(data, store)
    out["heads"] = {"methods": ["zero-shot", "coop", "tip-adapter", "tip-adapter-f"],
                    "overrides": {"coop": {"epochs": 2}, "tip-adapter-f": {"epochs": 2}}}
    out["datasets"][0]["seeds"] = [1]
    return out


@pytest.fixture(scope="module")
def evaluated_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("evaluated")
    return root, run_once(root, manifest_dict)


@pytest.fixture
def evaluated(evaluated_once: tuple[Path, str], tmp_path: Path,
              small_demo: Path) -> dict[str, Any]:
    """A store with features, records and a zero-shot run (each test breaks its own copy)."""
    path, out = copy_run(*evaluated_once, tmp_path, manifest_dict)
    return {"path": path, "store": tmp_path / "s.zarr", "run": out}


def _one_line(result: Any, code: int, fragment: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == code, result.output
    assert len(lines) == 1 and fragment in lines[0], lines
    assert "Traceback" not in result.output


def _images(store: Path) -> zarr.Group:
    root = zarr.open_group(zarr.storage.LocalStore(store), mode="r+")
    fp = next(iter(root["extractors"].group_keys()))
    group = root[f"extractors/{fp}/images"]
    assert isinstance(group, zarr.Group)
    return group


def test_a_row_count_past_the_data_is_refused_and_nothing_is_written(
        evaluated: dict[str, Any], small_demo: Path) -> None:
    images = _images(evaluated["store"])
    rows = int(images.attrs["rows"])  # type: ignore[arg-type]
    keys_before = np.asarray(images["keys"][...])
    images.attrs["rows"] = rows + 3
    extra = next(iter((small_demo / "images").rglob("*.png")))
    shutil.copy2(extra, extra.with_name("new_image.png"))  # work for extract to do
    split = json.loads((small_demo / "split.json").read_text())
    split["train"].append([str(extra.with_name("new_image.png").relative_to(small_demo / "images")),
                           split["train"][0][1], split["train"][0][2]])
    (small_demo / "split.json").write_text(json.dumps(split))
    result = invoke("--manifest", str(evaluated["path"]), "extract")
    _one_line(result, 1, f"{rows + 3} rows committed but keys holds {rows}")
    assert "store verify" in result.stderr
    np.testing.assert_array_equal(np.asarray(images["keys"][...]), keys_before)


@pytest.mark.parametrize("linked", ["runs", "runs/<key>"])
def test_a_symlinked_group_is_never_followed_out_of_the_store(
        evaluated: dict[str, Any], tmp_path: Path, linked: str) -> None:
    run_key = evaluated["run"]["stages"]["evaluate"]["datasets"][0]["run"]
    path = evaluated["store"] / linked.replace("<key>", run_key)
    outside = tmp_path / "outside" / path.name
    shutil.copytree(path, outside)  # the store's group now lives elsewhere, behind a link
    (outside / "precious.txt").write_text("keep me")
    shutil.rmtree(path)
    path.symlink_to(outside, target_is_directory=True)
    result = invoke("--manifest", str(evaluated["path"]), "evaluate", "--force")
    _one_line(result, 1, "a symbolic link")
    assert (outside / "precious.txt").read_text() == "keep me"


def test_readers_see_only_committed_state(evaluated: dict[str, Any]) -> None:
    root = zarr.open_group(zarr.storage.LocalStore(evaluated["store"]), mode="r+")
    root.create_group("datasets/half")  # a dataset killed before its first commit
    half = root.create_group(f"extractors/{'0' * 64}", attributes={"fp": "0" * 64})
    half.create_group("images")  # an extractor killed while laying out its tables
    result = invoke("--store", str(evaluated["store"]), "store", "info", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert [d["name"] for d in info["datasets"]] == ["demo"]
    assert len(info["extractors"]) == 1
    status = invoke("--manifest", str(evaluated["path"]), "status", "--json")
    assert status.exit_code == 0 and json.loads(status.stdout)["stale"] == []


@pytest.fixture(scope="module")
def with_heads_once(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("with_heads")
    return root, run_once(root, _with_heads)


@pytest.fixture
def with_heads(with_heads_once: tuple[Path, str], tmp_path: Path,
               small_demo: Path) -> dict[str, Any]:
    path, out = copy_run(*with_heads_once, tmp_path, _with_heads)
    return {"path": path, "store": tmp_path / "s.zarr",
            "jobs": {j["id"]: j["key"] for j in out["jobs"]}}


def _chunks(store: Path, array: str) -> Path:
    folder = store / array / "c"
    assert folder.is_dir(), folder
    return folder


@pytest.mark.parametrize(("what", "array"), [
    ("a cache's labels", "caches/{cache:demo:seed1:tip-adapter}/labels"),
    ("a CoOp context", "adapters/{adapter:demo:seed1:coop}/weights/ctx"),
    ("Tip-Adapter-F's keys", "adapters/{adapter:demo:seed1:tip-adapter-f}/weights/keys"),
    ("every text feature", "extractors/*/texts/*/features"),
])
def test_missing_chunks_fail_verify_and_are_refused_by_readers(
        with_heads: dict[str, Any], what: str, array: str) -> None:
    store = with_heads["store"]
    pattern = re.sub(r"\{([^}]+)\}", lambda m: with_heads["jobs"][m.group(1)], array)
    for found in store.glob(pattern):
        shutil.rmtree(_chunks(store, str(found.relative_to(store))))
    report = invoke("--store", str(store), "store", "verify", "--json")
    assert report.exit_code == 1, what
    problems = json.loads(report.stdout)["problems"]
    assert any("do not match their digest" in p or "not unit-norm" in p for p in problems), problems
    result = invoke("--manifest", str(with_heads["path"]), "evaluate", "--force")
    _one_line(result, 1, "run `shipyard store verify`")


def _reseal(store: Path, array: str, data: np.ndarray) -> None:
    """What a crafted store does: replace an array and give it a matching digest."""
    from shipyard.pipeline.zarr_nodes import write_sealed

    parent, _, name = array.rpartition("/")
    group = zarr.open_group(zarr.storage.LocalStore(store), mode="r+")[parent]
    assert isinstance(group, zarr.Group)
    del group[name]
    write_sealed(group, name, data, chunks=(max(1, len(data)), *data.shape[1:]))


def test_crafted_index_bytes_are_never_deserialized(with_heads: dict[str, Any]) -> None:
    cache = with_heads["jobs"]["cache:demo:seed1:tip-adapter"]
    before = invoke("--manifest", str(with_heads["path"]), "evaluate", "--force", "--json")
    junk = np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8)
    junk[:4] = np.frombuffer(b"IxFI", np.uint8)  # a flat index's magic, then garbage sizes
    _reseal(with_heads["store"], f"caches/{cache}/index", junk)
    after = invoke("--manifest", str(with_heads["path"]), "evaluate", "--force", "--json")
    assert after.exit_code == 0, after.output
    table = [json.loads(r.stdout)["datasets"][0]["table"] for r in (before, after)]
    assert table[0] == table[1]  # the index is rebuilt from the stored keys


def test_a_cache_with_more_keys_than_labels_is_refused(with_heads: dict[str, Any]) -> None:
    cache = with_heads["jobs"]["cache:demo:seed1:tip-adapter"]
    root = zarr.open_group(zarr.storage.LocalStore(with_heads["store"]), mode="r")
    labels = np.asarray(root[f"caches/{cache}/labels"][...])
    _reseal(with_heads["store"], f"caches/{cache}/labels", labels[:-3])
    result = invoke("--manifest", str(with_heads["path"]), "evaluate", "--force")
    _one_line(result, 2, f"{len(labels) - 3} labels for keys of shape ({len(labels)}, 64)")


def _garbage_metadata(store: Path) -> None:
    next(store.glob("extractors/*/images/keys/zarr.json")).write_text("{not json")


def _deleted_array(store: Path) -> None:
    shutil.rmtree(next(store.glob("extractors/*/images/features")))


def _garbage_root(store: Path) -> None:
    (store / "zarr.json").write_text("\x00\x01 not a store")


def _records_pointing_nowhere(store: Path) -> None:
    meta = json.loads((store / "datasets" / "demo" / "zarr.json").read_text())
    meta["attributes"]["current"] = "f" * 64
    (store / "datasets" / "demo" / "zarr.json").write_text(json.dumps(meta))


BROKEN = {"garbage metadata": _garbage_metadata, "deleted array": _deleted_array,
          "garbage root": _garbage_root, "records pointing nowhere": _records_pointing_nowhere}
COMMANDS = [["status"], ["store", "info"], ["store", "verify"], ["extract"], ["evaluate"],
            ["run"], ["train-adapter", "--method", "coop"], ["build-cache"]]


@pytest.mark.parametrize("broken", list(BROKEN))
def test_every_command_fails_in_one_line_on_a_broken_store(evaluated: dict[str, Any],
                                                            broken: str) -> None:
    BROKEN[broken](evaluated["store"])
    for command in COMMANDS:
        store = ["--store", str(evaluated["store"])] if command[0] == "store" else []
        args = ["--manifest", str(evaluated["path"]), *store, *command]
        result = invoke(*args, "--json")
        where = f"{broken}: {' '.join(command)}"
        assert "Traceback" not in result.output, where
        if result.exit_code == 0:  # unaffected by this damage (it reads other parts)
            continue
        assert result.exit_code in (1, 2), where
        lines = result.stderr.strip().splitlines()
        out = json.loads(result.stdout)  # exactly one JSON object, whatever happened
        if command == ["store", "verify"] and "ok" in out:
            assert out["ok"] is False and out["problems"], where
            continue
        assert len(lines) == 1 and lines[0].startswith("error: "), (where, lines)
        assert out == {"error": lines[0].removeprefix("error: "), "exit_code": result.exit_code}


def test_a_negative_or_infinite_stored_norm_fails_verify_and_is_refused(
        with_heads: dict[str, Any]) -> None:
    """The norms beside the unit vectors are data too: verify checks them, and a head reading a
    broken one refuses in one line instead of training on it."""
    store = with_heads["store"]
    root = zarr.open_group(zarr.storage.LocalStore(store), mode="r+")
    fp = next(iter(root["extractors"].group_keys()))
    views = root[f"extractors/{fp}/views/norms"]
    assert isinstance(views, zarr.Array)
    broken = np.asarray(views[:]).copy()
    broken[:] = -1.0
    views[:] = broken
    report = invoke("--store", str(store), "store", "verify", "--json")
    assert report.exit_code == 1
    problems = json.loads(report.stdout)["problems"]
    assert any("views/norms: a negative norm" in p for p in problems), problems
    result = invoke("--manifest", str(with_heads["path"]), "build-cache", "--force")
    _one_line(result, 1, "norms that are negative or not finite")
