"""Synthetic-domain datasets (SYNC-CLIP's second domain): generated images of a real dataset's
classes, matched by class name, extracted into the same image table and recorded as their own
domain; nothing trains or evaluates on them by themselves."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from shipyard.cli import app
from shipyard.pipeline.datasets import Split
from shipyard.pipeline.store import FeatureStore
from typer.testing import CliRunner

from tests.conftest import DEMO, demo_split, manifest_dict, write_manifest

SYN_CLASSES = {"bag": 8, "sandal": 5, "ankle_boot": 9}  # folder -> the demo's label


def _synthetic(root: Path, small_demo: Path) -> tuple[Path, Path]:
    """Three class folders of images; one of them is also a real training image (the same bytes
    under another path), which must be encoded once."""
    split = json.loads((small_demo / "split.json").read_text())
    used = {r[0] for rows in split.values() for r in rows}
    folder = root / "syn"
    for name, label in SYN_CLASSES.items():
        (folder / name).mkdir(parents=True)
        rows = [r for r in demo_split()["test"] if r[1] == label and r[0] not in used][:3]
        for i, (path, _, _) in enumerate(rows):
            shutil.copy2(DEMO / "images" / path, folder / name / f"gen{i}.png")
    real_train = next(r for r in split["train"] if r[1] == 8)
    shared = folder / "bag" / "same_as_real.png"
    shutil.copy2(small_demo / "images" / real_train[0], shared)
    return folder, shared


def _data(tmp_path: Path, small_demo: Path, **syn: Any) -> dict[str, Any]:
    folder, _ = _synthetic(tmp_path, small_demo)
    data = manifest_dict(small_demo, tmp_path / "s.zarr")
    data["datasets"].append({"name": "demo-syn", "format": "imagefolder", "root": str(folder),
                             "domain": "synthetic", "pairs_with": "demo", **syn})
    return data


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def test_a_synthetic_dataset_is_extracted_beside_its_pair_and_recorded_as_its_domain(
        tmp_path: Path, small_demo: Path) -> None:
    path = write_manifest(tmp_path / "m.yaml", _data(tmp_path, small_demo))
    dry = json.loads(invoke("--manifest", str(path), "run", "--dry-run", "--json").stdout)
    assert [j["id"] for j in dry["jobs"] if "demo-syn" in j["id"]] == ["records:demo-syn"]
    result = invoke("--manifest", str(path), "--device", "cpu", "extract", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["images"] == 120 + 9  # the copy of a real training image is one image, not two
    store = FeatureStore.open(str(tmp_path / "s.zarr"))
    real, syn = store.dataset("demo"), store.dataset("demo-syn")
    assert syn.attrs["domain"] == "synthetic" and syn.attrs["pairs_with"] == "demo"
    assert real.attrs["domain"] == "real"
    assert syn.classnames == real.classnames  # label ids are the real dataset's
    paths = syn.paths()
    labels = {p.split("/")[0]: int(y) for p, y in zip(paths, syn.labels(), strict=True)}
    assert labels == SYN_CLASSES
    assert len(paths) == 10 and (syn.splits() == Split.TRAIN).all()
    assert syn.attrs["seeds"] == [] and not any(n.startswith("fewshot") for n in syn.group)
    (fp,) = store.extractor_fps()
    stored, synthetic = store.extractor(fp).images.keys(), syn.keys()  # (N, 32) arrays
    keys = {k.tobytes() for k in stored}
    assert len(keys) == 129 and {k.tobytes() for k in synthetic} <= keys
    assert np.isin(syn.keys().view("S32"), real.keys().view("S32")).sum() == 1  # the shared one
    # No head of the manifest reads the synthetic domain: status still reports what it lacks.
    status = invoke("--manifest", str(path), "status", "--json")
    assert status.exit_code == 0, status.output
    entries = {d["name"]: d for d in json.loads(status.stdout)["datasets"]}
    assert entries["demo-syn"]["missing_features"] == 0 and entries["demo-syn"]["records_current"]


def test_an_unknown_class_name_is_one_line(tmp_path: Path, small_demo: Path) -> None:
    data = _data(tmp_path, small_demo)
    (Path(data["datasets"][1]["root"]) / "parka").mkdir()
    shutil.copy2(next(Path(data["datasets"][1]["root"]).rglob("gen0.png")),
                 Path(data["datasets"][1]["root"]) / "parka" / "p.png")
    result = invoke("--manifest", str(write_manifest(tmp_path / "m.yaml", data)), "extract")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "dataset demo-syn: class 'parka' is not a class of demo" in lines[0]


@pytest.mark.parametrize(("change", "message"), [
    ({"pairs_with": None}, "a synthetic dataset names the real dataset it pairs with"),
    ({"pairs_with": "nowhere"}, "'nowhere' is not a real dataset of the manifest"),
    ({"pairs_with": "demo-syn"}, "'demo-syn' is not a real dataset of the manifest"),
    ({"domain": "real"}, "only a dataset with domain: synthetic pairs with another"),
])
def test_pairing_mistakes_are_manifest_errors(tmp_path: Path, small_demo: Path,
                                              change: dict[str, Any], message: str) -> None:
    data = _data(tmp_path, small_demo)
    data["datasets"][1].update(change)
    result = invoke("--manifest", str(write_manifest(tmp_path / "m.yaml", data)), "status")
    assert result.exit_code == 2
    assert message in result.stderr
