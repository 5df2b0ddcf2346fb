"""Cross-dataset transfer: heads trained on one dataset, evaluated unchanged on another dataset's
class names and test images, as SHIP and CoOp evaluate ImageNet-trained heads on ten others."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from shipyard.cli import app
from shipyard.pipeline.artifacts import ADAPTER, Ref, keys_of
from shipyard.pipeline.store import FeatureStore
from typer.testing import CliRunner

from tests.conftest import demo_split, make_small_demo, manifest_dict, write_manifest

TARGET_CLASSES = ("sandal", "sneaker", "bag", "ankle boot")  # four of the demo's, relabelled 0..3


def _target(root: Path) -> Path:
    """A second dataset over some of the demo's images: other classes, in another order."""
    data = make_small_demo(root / "t", train=2, val=1, test=4)
    split = json.loads((data / "split.json").read_text())
    names = {label: name for _, label, name in demo_split()["test"]}
    keep = {label: TARGET_CLASSES.index(name) for label, name in names.items()
            if name in TARGET_CLASSES}
    out = {part: [[p, keep[y], c] for p, y, c in rows if y in keep] for part, rows in split.items()}
    (data / "split.json").write_text(json.dumps(out))
    return data


def _manifest(tmp_path: Path) -> Path:
    source = make_small_demo(tmp_path / "s")
    data = manifest_dict(source, tmp_path / "store.zarr")
    data["datasets"][0]["seeds"] = [1]
    target = _target(tmp_path)
    data["datasets"].append({"name": "target", "format": "coop",
                             "root": str(target / "images"),
                             "split_file": str(target / "split.json"),
                             "templates": ["a photo of a {}."], "transfer_from": "demo"})
    data["heads"] = {"methods": ["zero-shot", "coop", "clip-adapter", "tip-adapter-f"],
                     "overrides": {"coop": {"epochs": 3}, "clip-adapter": {"epochs": 3},
                                   "tip-adapter-f": {"epochs": 2}}}
    return write_manifest(tmp_path / "m.yaml", data)


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def test_coop_trained_on_one_dataset_scores_another_datasets_classes(tmp_path: Path) -> None:
    path = _manifest(tmp_path)
    result = invoke("--manifest", str(path), "--device", "cpu", "run", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    jobs = {j["id"] for j in out["jobs"]}
    assert not any(j.startswith(("adapter:target", "cache:target", "generator:target"))
                   for j in jobs)  # nothing trains on the target
    target = next(d for d in out["stages"]["evaluate"]["datasets"] if d["name"] == "target")
    assert target["transfer_from"] == "demo"
    rows = {r["method"]: r for r in target["table"]}
    assert set(rows) == {"zero-shot", "coop", "clip-adapter"}  # Tip-Adapter-F's cache does not

    # CoOp's accuracy on the target, by hand: the source's context on the target's class names.
    from shipyard.pipeline.configs import HeadConfig
    from shipyard.pipeline.head_inputs import transfer_inputs
    from shipyard.pipeline.heads import CoOp
    from shipyard.pipeline.manifest_files import load_manifest
    from shipyard.pipeline.models import load_clip
    from shipyard.pipeline.text_encoder import PromptEncoder
    from shipyard.pipeline.weights import load_tensors

    m = load_manifest(path)
    store = FeatureStore.open(m.store)
    (fp,) = store.extractor_fps()
    inputs = transfer_inputs(store, store.extractor(fp), m.dataset("target"), torch.device("cpu"))
    assert inputs.classnames == TARGET_CLASSES
    groups = [store.lookup(Ref.of(ADAPTER, k)) for k in keys_of(store.root, ADAPTER)]
    coop = next(g for g in groups if dict(g.attrs["record"])["params"]["head"] == "coop")
    assert dict(coop.attrs)["classnames"] != list(TARGET_CLASSES)  # trained on other classes
    clip = load_clip(m.model, torch.device("cpu"))
    head = CoOp(PromptEncoder.from_clip(clip), TARGET_CLASSES, HeadConfig())
    head.load_state_dict(load_tensors(coop, "weights", torch.device("cpu")))
    head.eval()
    with torch.no_grad():
        predicted = head(inputs.test.features).argmax(1)
    expected = 100.0 * float((predicted == inputs.test.labels).float().mean())
    assert rows["coop"]["accuracy"] == pytest.approx(expected, abs=1e-9)
    text = invoke("--manifest", str(path), "evaluate", "--dataset", "target").stdout
    assert "heads trained on demo, evaluated on target's classes" in text


def test_running_the_target_alone_trains_only_what_it_reads_of_the_source(tmp_path: Path) -> None:
    path = _manifest(tmp_path)
    result = invoke("--manifest", str(path), "run", "--dataset", "target", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    jobs = {j["id"] for j in json.loads(result.stdout)["jobs"]}
    assert jobs == {"records:demo", "adapter:demo:seed1:coop", "adapter:demo:seed1:clip-adapter",
                    "records:target", "run:target", "report:target"}


def test_a_transfer_source_must_be_another_untransferred_dataset(tmp_path: Path) -> None:
    path = _manifest(tmp_path)
    import yaml

    data = yaml.safe_load(path.read_text())
    data["datasets"][1]["transfer_from"] = "nowhere"
    bad = write_manifest(tmp_path / "bad.yaml", data)
    result = invoke("--manifest", str(bad), "status")
    assert result.exit_code == 2
    assert "transfer_from: 'nowhere' is not another dataset of the manifest" in result.stderr
