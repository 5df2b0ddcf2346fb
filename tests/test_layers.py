"""Layered stores: a working store over read-only upstream stores. Every lookup goes through the
layers (working store first), every write goes to the working store, nothing is written upstream;
`extract` encodes only the images no layer holds."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from shipyard.cli import app
from shipyard.pipeline.errors import ManifestError
from shipyard.pipeline.manifest_files import load_manifest
from shipyard.pipeline.store import FeatureStore
from typer.testing import CliRunner

from tests.conftest import make_small_demo, manifest_dict, run_stage, write_manifest

METHODS = ["zero-shot", "coop+ship", "tip-adapter+ship"]


def team_manifest(data: Path, store: Path, upstream: list[Any] | None = None) -> dict[str, Any]:
    d = manifest_dict(data, store)
    d["ship"] = {"epochs": 3, "synthesize": {"per_class": 4}}
    d["heads"] = {"methods": METHODS, "overrides": {"coop": {"epochs": 3}}}
    d["datasets"][0]["seeds"] = [1]
    if upstream is not None:
        d["upstream"] = upstream
    return d


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under a folder: content digest and modification time (ns)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


@pytest.fixture(scope="module")
def team_a(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Team A's store after extract, train-generator and synthesize: (data root, manifest)."""
    root = tmp_path_factory.mktemp("team_a")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SHIPYARD_CACHE_DIR", str(root / "cache"))
        data = make_small_demo(root)
        path = write_manifest(root / "a.yaml", team_manifest(data, root / "a.zarr"))
        m = load_manifest(path)
        for stage in ("extract", "train-generator", "synthesize"):
            run_stage(m, stage)
    return data, path


def test_a_team_builds_on_another_teams_store_and_writes_nothing_there(
        tmp_path: Path, team_a: tuple[Path, Path]) -> None:
    data, a_path = team_a
    a_store = a_path.parent / "a.zarr"
    before = snapshot(a_store)
    lock = (a_store.parent / "a.zarr.lock").stat().st_mtime_ns  # team A's own, left by its runs
    b_path = write_manifest(tmp_path / "b.yaml",
                            team_manifest(data, tmp_path / "b.zarr", [str(a_store)]))
    b_manifest = load_manifest(b_path)
    for stage in ("train-adapter", "build-cache"):
        run_stage(b_manifest, stage, methods=tuple(METHODS))
    result = invoke("--manifest", str(b_path), "--device", "cpu", "evaluate", "--json")
    assert result.exit_code == 0, result.output
    b_eval = json.loads(result.stdout)
    ran = json.loads(invoke("--manifest", str(b_path), "--device", "cpu", "run",
                            "--json").stdout)
    assert {j["status"] for j in ran["jobs"] if j["id"] != "report:demo"} == {"up to date"}
    assert snapshot(a_store) == before  # not one file of team A's store changed or appeared
    assert (a_store.parent / "a.zarr.lock").stat().st_mtime_ns == lock  # never taken by team B

    # Team A's own run on a copy of its store gives the same results.
    shutil.copytree(a_store, tmp_path / "a_own.zarr")
    own = write_manifest(tmp_path / "a_own.yaml", team_manifest(data, tmp_path / "a_own.zarr"))
    a_run = invoke("--manifest", str(own), "--device", "cpu", "run", "--json")
    assert a_run.exit_code == 0, a_run.output
    a_eval = json.loads(a_run.stdout)["stages"]["evaluate"]
    assert [d["table"] for d in b_eval["datasets"]] == [d["table"] for d in a_eval["datasets"]]
    assert b_eval["datasets"][0]["run"] == a_eval["datasets"][0]["run"]  # the same run key

    b = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")
    assert list(b["extractors"].group_keys()) == []  # no image features in team B's store
    assert list(b["datasets"].group_keys()) == []
    assert [len(list(b[k].group_keys())) for k in ("adapters", "caches", "runs")] == [1, 1, 1]
    assert "generators" not in b and "synthetic" not in b  # read from team A's

    # gc of team B's store: inputs in team A's store are not gone, so nothing is an orphan.
    gc = invoke("--manifest", str(b_path), "--device", "cpu", "store", "gc", "--json")
    assert gc.exit_code == 0, gc.output
    assert json.loads(gc.stdout)["removed"] == [] and json.loads(gc.stdout)["kept"] == 3
    assert snapshot(a_store) == before


def test_extract_encodes_only_the_images_no_layer_holds(
        tmp_path: Path, team_a: tuple[Path, Path]) -> None:
    _, a_path = team_a
    a_store = a_path.parent / "a.zarr"
    bigger = make_small_demo(tmp_path / "b", train=8, test=5)  # A's images, and 40 more
    b_path = write_manifest(tmp_path / "b.yaml",
                            team_manifest(bigger, tmp_path / "b.zarr", [str(a_store)]))
    out = json.loads(invoke("--manifest", str(b_path), "--device", "cpu", "extract",
                            "--json").stdout)
    assert (out["images"], out["extracted"], out["reused"]) == (150, 30, 120)
    assert out["views_extracted"] == 20  # rows of views: the 20 new training images only
    assert out["texts_extracted"] == 0  # the text set is team A's

    clean = write_manifest(tmp_path / "c.yaml", team_manifest(bigger, tmp_path / "c.zarr"))
    assert json.loads(invoke("--manifest", str(clean), "--device", "cpu", "extract",
                             "--json").stdout)["extracted"] == 150
    fp = out["extractor"]
    with FeatureStore.open(str(tmp_path / "b.zarr"), upstreams=[(str(a_store), {})]) as b, \
            FeatureStore.open(str(tmp_path / "c.zarr")) as c:
        assert b.own().extractor(fp).images.rows == 30
        lb, lc = b.extractor(fp), c.extractor(fp)
        keys = c.dataset("demo").keys()
        for table_b, table_c in ((lb.images, lc.images), (lb.view_table, lc.view_table)):
            ib, ic = table_b.index(), table_c.index()
            wanted = [k.tobytes() for k in keys if k.tobytes() in ic]
            rb = np.array([ib[k] for k in wanted])
            rc = np.array([ic[k] for k in wanted])
            for col in ("features", "norms"):
                np.testing.assert_array_equal(table_b.read(col, rb), table_c.read(col, rc))
        assert b.dataset_version("demo") == c.dataset_version("demo")
    again = json.loads(invoke("--manifest", str(b_path), "--device", "cpu", "status",
                              "--json").stdout)
    states = {j["id"]: j["state"] for d in again["datasets"] for j in d["jobs"]}
    assert states["records:demo"] == "up to date" and again["upstream"] == [str(a_store)]
    assert again["datasets"][0]["missing_features"] == 0


def test_status_reads_the_upstreams_before_the_working_store_exists(
        tmp_path: Path, team_a: tuple[Path, Path]) -> None:
    data, a_path = team_a
    a_store = a_path.parent / "a.zarr"
    b_path = write_manifest(tmp_path / "b.yaml",
                            team_manifest(data, tmp_path / "b.zarr", [str(a_store)]))
    out = json.loads(invoke("--manifest", str(b_path), "--device", "cpu", "status",
                            "--json").stdout)
    states = {j["id"]: j["state"] for d in out["datasets"] for j in d["jobs"]}
    assert states["records:demo"] == "up to date"
    assert states["synthetic:demo:seed1"] == "up to date"
    assert states["adapter:demo:seed1:coop+ship"] == "stale"
    assert not (tmp_path / "b.zarr").exists()
    info = json.loads(invoke("--manifest", str(b_path), "store", "info", "--json").stdout)
    assert info["extractors"] == [] and info["created"] is None
    assert [u["store"] for u in info["upstream"]] == [str(a_store)]
    assert info["upstream"][0]["artifacts"] == {"generators": 1, "synthetic": 1}
    alone = invoke("--store", str(a_store), "store", "info", "--json")
    assert "upstream" in json.loads(alone.stdout) and json.loads(alone.stdout)["upstream"] == []


def test_a_synthetic_set_an_upstream_lacks_classes_of_is_built_in_the_working_store(
        tmp_path: Path, team_a: tuple[Path, Path]) -> None:
    data, a_path = team_a
    a_store = a_path.parent / "a.zarr"
    before = snapshot(a_store)
    b_path = write_manifest(tmp_path / "b.yaml",
                            team_manifest(data, tmp_path / "b.zarr", [str(a_store)]))
    result = invoke("--manifest", str(b_path), "--device", "cpu", "synthesize", "--classes",
                    "all,a velvet scarf", "--json")
    assert result.exit_code == 0, result.output
    assert snapshot(a_store) == before
    b = zarr.open_group(str(tmp_path / "b.zarr"), mode="r")
    (key,) = list(b["synthetic"].group_keys())
    assert b["synthetic"][key].attrs["classnames"][-1] == "a velvet scarf"
    assert b["synthetic"][key]["classes"].attrs["rows"] == 11  # every class, not only the new one


def test_a_missing_upstream_is_one_line_and_creates_nothing(tmp_path: Path,
                                                            small_demo: Path) -> None:
    path = write_manifest(tmp_path / "b.yaml", team_manifest(small_demo, tmp_path / "b.zarr",
                                                             [str(tmp_path / "gone.zarr")]))
    result = invoke("--manifest", str(path), "--device", "cpu", "extract")
    assert result.exit_code == 1
    assert result.output.strip() == (f"error: upstream store {tmp_path / 'gone.zarr'}: "
                                      "no shipyard store there")
    assert not (tmp_path / "b.zarr").exists()


@pytest.mark.parametrize("upstream, message", [
    (["s.zarr"], "upstream[0]: {s} is the working store itself"),
    (["u.zarr", {"location": "u.zarr", "options": {}}], "upstream[1]: {u} is listed twice"),
])
def test_upstreams_must_be_other_stores(tmp_path: Path, small_demo: Path, upstream: list[Any],
                                        message: str) -> None:
    data = team_manifest(small_demo, tmp_path / "s.zarr", upstream)
    with pytest.raises(ManifestError) as err:
        load_manifest(write_manifest(tmp_path / "m.yaml", data))
    assert message.format(s=tmp_path / "s.zarr", u=tmp_path / "u.zarr") in str(err.value)


def test_upstream_entries_resolve_beside_the_manifest_and_keep_their_options(
        tmp_path: Path, small_demo: Path) -> None:
    data = team_manifest(small_demo, tmp_path / "s.zarr",
                         ["up.zarr", {"location": "s3://team-a/f.zarr", "options": {"anon": True}}])
    m = load_manifest(write_manifest(tmp_path / "m.yaml", data))
    assert m.upstreams == [(str(tmp_path / "up.zarr"), {}), ("s3://team-a/f.zarr", {"anon": True})]


def test_status_says_what_changed_against_an_upstreams_artefact(
        tmp_path: Path, team_a: tuple[Path, Path]) -> None:
    data, a_path = team_a
    d = team_manifest(data, tmp_path / "b.zarr", [str(a_path.parent / "a.zarr")])
    d["ship"]["epochs"] = 4
    out = json.loads(invoke("--manifest", str(write_manifest(tmp_path / "b.yaml", d)), "--device",
                            "cpu", "status", "--json").stdout)
    jobs = {j["id"]: j for ds in out["datasets"] for j in ds["jobs"]}
    assert jobs["generator:demo:seed1"]["reasons"] == ["params.train.epochs 3 -> 4"]  # not "not built yet"


def test_a_stage_whose_inputs_no_layer_holds_is_refused_before_the_working_store_is_made(
        tmp_path: Path, team_a: tuple[Path, Path]) -> None:
    data, a_path = team_a
    d = team_manifest(data, tmp_path / "b.zarr", [str(a_path.parent / "a.zarr")])
    d["ship"]["epochs"] = 4  # team A's generators were trained for 3
    result = invoke("--manifest", str(write_manifest(tmp_path / "b.yaml", d)), "--device", "cpu",
                    "train-adapter", "--method", "coop", "--synthetic", "auto")
    assert result.exit_code == 2  # a usage error, as without upstreams
    assert "needs generator:demo:seed1, which is not up to date" in result.output
    assert not (tmp_path / "b.zarr").exists()


def test_store_verify_upstreams_checks_every_layer_and_names_the_damaged_one(
        tmp_path: Path, team_a: tuple[Path, Path]) -> None:
    data, a_path = team_a
    a_copy = tmp_path / "a.zarr"
    shutil.copytree(a_path.parent / "a.zarr", a_copy)
    b_path = write_manifest(tmp_path / "b.yaml", team_manifest(data, tmp_path / "b.zarr",
                                                               [str(a_copy)]))
    run_stage(load_manifest(b_path), "extract")  # makes B's working store: everything is in A
    (fp,) = [p.name for p in (a_copy / "extractors").iterdir() if p.is_dir()]
    chunk = a_copy / "extractors" / fp / "images" / "features" / "c" / "0" / "0"
    arr = zarr.open_array(str(a_copy / "extractors" / fp / "images" / "features"), mode="r+")
    arr[0:2] = np.zeros((2, arr.shape[1]), dtype=arr.dtype)  # two rows no longer unit-norm
    assert chunk.exists()
    alone = invoke("--manifest", str(b_path), "store", "verify", "--json")
    assert alone.exit_code == 0 and json.loads(alone.stdout)["layers"] == [str(tmp_path / "b.zarr")]
    both = invoke("--manifest", str(b_path), "store", "verify", "--upstreams", "--json")
    assert both.exit_code == 1
    out = json.loads(both.stdout)
    assert out["layers"] == [str(tmp_path / "b.zarr"), str(a_copy)]
    assert out["problems"] and all(p.startswith(f"upstream {a_copy}: ") for p in out["problems"])
    assert any(f"extractors/{fp[:12]}/images" in p for p in out["problems"])
    assert out["checked"]["datasets"] == 1  # A's records (B's extract found them there)
    assert "datasets" not in json.loads(alone.stdout)["checked"]
    text = invoke("--manifest", str(b_path), "store", "verify", "--upstreams").stdout
    assert text.startswith(f"verify {tmp_path / 'b.zarr'} and its 1 upstream store: FAILED")
    refused = invoke("--store", str(a_copy), "store", "verify", "--upstreams")
    assert refused.exit_code == 2 and "--upstreams reads the manifest's upstream stores" in \
        refused.stderr
