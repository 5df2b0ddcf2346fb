"""The invalidation matrix: for each change to the data or the manifest, `status` names exactly the
jobs expected to be stale, `run` recomputes exactly those and reuses every other, and the store is
up to date afterwards. The expected table is below, one row per change."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from shipyard.cli import app
from typer.testing import CliRunner

from tests.conftest import DEMO, demo_split, make_small_demo, manifest_dict, write_manifest

HEADS = ["coop", "coop+ship", "tip-adapter-f", "tip-adapter-f+ship"]
FAST = {"coop": {"epochs": 2}, "tip-adapter-f": {"epochs": 2}}


def _base(root: Path) -> dict[str, Any]:
    data = manifest_dict(root / "data", root / "s.zarr")
    data["ship"] = {"epochs": 2, "batch_size": 64, "synthesize": {"per_class": 3}}
    data["heads"] = {"methods": ["zero-shot", "coop", "coop+ship", "tip-adapter", "tip-adapter-f",
                                 "tip-adapter-f+ship"], "overrides": FAST}
    data["datasets"][0]["seeds"] = [1]
    return data


def invoke(*args: str) -> Any:
    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def seed_jobs(seed: int, heads: list[str] = HEADS, ship: bool = True, cache: bool = True) -> set[str]:
    out = {f"adapter:demo:seed{seed}:{h}" for h in heads}
    if ship:
        out |= {f"generator:demo:seed{seed}", f"synthetic:demo:seed{seed}"}
    if cache:
        out.add(f"cache:demo:seed{seed}:tip-adapter")
    return out


EVAL = {"run:demo", "report:demo"}
EVERYTHING = {"records:demo", *seed_jobs(1), *EVAL}
SHIP_SIDE = {"generator:demo:seed1", "synthetic:demo:seed1", "adapter:demo:seed1:coop+ship",
             "adapter:demo:seed1:tip-adapter-f+ship", *EVAL}
READS_VAL = {"cache:demo:seed1:tip-adapter", "adapter:demo:seed1:tip-adapter-f",
             "adapter:demo:seed1:tip-adapter-f+ship"}


def _split(root: Path) -> dict[str, Any]:
    return json.loads((root / "data" / "split.json").read_text())


def _write_split(root: Path, split: dict[str, Any]) -> None:
    (root / "data" / "split.json").write_text(json.dumps(split))


def _add_train_image(label: int) -> Callable[[Path, dict[str, Any]], None]:
    def change(root: Path, manifest: dict[str, Any]) -> None:
        split = _split(root)
        present = {row[0] for rows in split.values() for row in rows}
        row = next(r for r in demo_split()["train"] if r[1] == label and r[0] not in present)
        dest = root / "data" / "images" / row[0]
        shutil.copy2(DEMO / "images" / row[0], dest)
        split["train"].append(row)
        _write_split(root, split)
    return change


def _remove_val_image(root: Path, manifest: dict[str, Any]) -> None:
    split = _split(root)
    split["val"].pop(0)
    _write_split(root, split)


def _relabel_test_image(root: Path, manifest: dict[str, Any]) -> None:
    split = _split(root)
    other = next(r for r in split["test"] if r[1] != split["test"][0][1])
    split["test"][0][1:] = other[1:]
    _write_split(root, split)


def _set(path: str, value: Any) -> Callable[[Path, dict[str, Any]], None]:
    def change(root: Path, manifest: dict[str, Any]) -> None:
        node = manifest
        *parents, last = path.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[last] = value
    return change


MATRIX: dict[str, tuple[Callable[[Path, dict[str, Any]], None], set[str]]] = {
    # data
    "train image added, base class": (_add_train_image(0), EVERYTHING),
    # New-class training images are read by nothing but extract (base-to-new trains on base).
    "train image added, new class": (_add_train_image(9), {"records:demo"}),
    "val image removed": (_remove_val_image, {"records:demo", *READS_VAL, *EVAL}),
    "test image relabelled": (_relabel_test_image, {"records:demo", *EVAL}),
    # datasets[]
    "template": (_set("datasets.0.templates", ["itap of a {}."]),
                 {"records:demo", "cache:demo:seed1:tip-adapter", "adapter:demo:seed1:tip-adapter-f",
                  "adapter:demo:seed1:tip-adapter-f+ship", *EVAL}),
    "shots": (_set("datasets.0.shots", 3), EVERYTHING),
    "seeds": (_set("datasets.0.seeds", [1, 2]), {"records:demo", *seed_jobs(2), *EVAL}),
    "sampler": (_set("datasets.0.sampler", "numpy"), EVERYTHING),
    # EuroSAT's preset: its search scales and init alpha reach the Tip heads; its Tip-Adapter-F
    # epochs (100) do not, since the manifest's overrides sit above the preset.
    "preset": (_set("datasets.0.preset", "EuroSAT"), {*READS_VAL, *EVAL}),
    "dataset override, one variant": (_set("datasets.0.overrides", {"coop+ship": {"lr": 0.001}}),
                                      {"adapter:demo:seed1:coop+ship", *EVAL}),
    # heads
    "coop epochs": (_set("heads.overrides.coop.epochs", 3),
                    {"adapter:demo:seed1:coop", "adapter:demo:seed1:coop+ship", *EVAL}),
    "tip-adapter-f lr": (_set("heads.overrides.tip-adapter-f.lr", 0.002),
                         {"adapter:demo:seed1:tip-adapter-f",
                          "adapter:demo:seed1:tip-adapter-f+ship", *EVAL}),
    "tip_scale": (_set("heads.tip_scale", [5, 2]), {*READS_VAL, *EVAL}),
    "cache_index": (_set("heads.cache_index", "ivf"), {"cache:demo:seed1:tip-adapter", *EVAL}),
    "cache_topk": (_set("heads.cache_topk", 8), {"cache:demo:seed1:tip-adapter", *EVAL}),
    "coop batch_size": (_set("heads.overrides.coop.batch_size", 16),
                        {"adapter:demo:seed1:coop", "adapter:demo:seed1:coop+ship", *EVAL}),
    # paper: Tip-Adapter-F selects on test, CoOp+SHIP over generator epochs (the generator keeps
    # their weights, so it and its synthetic set are new); CoOp keeps its last epoch either way.
    "protocol": (_set("heads.protocol", "paper"),
                 {"generator:demo:seed1", "synthetic:demo:seed1", "adapter:demo:seed1:coop+ship",
                  "adapter:demo:seed1:tip-adapter-f", "adapter:demo:seed1:tip-adapter-f+ship",
                  *EVAL}),
    # ship
    "ship epochs": (_set("ship.epochs", 3), SHIP_SIDE),
    "ship batch_size": (_set("ship.batch_size", 32), SHIP_SIDE),
    "ship lr": (_set("ship.lr", 0.002), SHIP_SIDE),
    "ship seed": (_set("ship.seed", 1), SHIP_SIDE),
    "ship variant": (_set("ship.variant", "imagenet"), SHIP_SIDE),
    # CoOp+SHIP samples fresh features from the generator every step: the stored pool is only
    # the Tip-Adapter-F+SHIP cache's.
    "synthesize per_class": (_set("ship.synthesize.per_class", 4),
                             {"synthetic:demo:seed1", "adapter:demo:seed1:tip-adapter-f+ship",
                              *EVAL}),
    # the model and the recipe: another extractor, so everything
    "model init seed": (_set("model.init_seed", 1), EVERYTHING),
    "augmentation recipe": (_set("extraction.augment", {"scale": [0.4, 1.0]}), EVERYTHING),
    # settings that change how, not what: nothing is stale
    "checkpoint_every": (_set("ship.checkpoint_every", 2), set()),
    "extraction batch_size and workers": (_set("extraction.batch_size", 8), set()),
}


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One store with every job of the base manifest done; each case changes a copy of it."""
    root = tmp_path_factory.mktemp("base")
    make_small_demo(root)
    path = write_manifest(root / "m.yaml", _base(root))
    invoke("--manifest", str(path), "--device", "cpu", "run", "--json")
    assert invoke("--manifest", str(path), "status", "--json")["up_to_date"] is True
    return root


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MATRIX))
def test_a_change_makes_exactly_its_dependants_stale(name: str, base: Path, tmp_path: Path) -> None:
    change, expected = MATRIX[name]
    root = tmp_path / "case"
    shutil.copytree(base, root, ignore=shutil.ignore_patterns("*.lock"))
    manifest = yaml.safe_load((root / "m.yaml").read_text())
    manifest["store"] = str(root / "s.zarr")
    manifest["datasets"][0]["root"] = str(root / "data" / "images")
    manifest["datasets"][0]["split_file"] = str(root / "data" / "split.json")
    change(root, manifest)
    path = write_manifest(root / "m.yaml", manifest)

    status = invoke("--manifest", str(path), "status", "--json")
    assert set(status["stale"]) == expected, name
    assert status["up_to_date"] is (not expected)

    ran = invoke("--manifest", str(path), "--device", "cpu", "run", "--json")
    computed = {j["id"] for j in ran["jobs"] if j["status"] != "up to date"}
    reused = {j["id"] for j in ran["jobs"] if j["status"] == "up to date"}
    assert computed == expected, name
    assert reused.isdisjoint(expected) and reused | computed >= {"records:demo", *EVAL}
    assert invoke("--manifest", str(path), "status", "--json")["stale"] == []
