"""The paper's SYNC-CLIP through the stages (`--method sync-clip`): planned with its synthetic
domain, trained and scored on images (its own prompted test features), refused in one line when
an image changed since extraction, and resumed after a SIGKILL to the uninterrupted prompts. Its
model and loop: test_sync_prompts.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import checkpoint_epoch, manifest_dict, slow_checkpoints_child, write_manifest
from tests.test_sync_clip_fs import _synthetic_folder, invoke

ROOT = Path(__file__).resolve().parent.parent


# The stages: planned, trained, scored on images, resumed after a kill.

def _manifest(tmp_path: Path, small_demo: Path, epochs: int = 2, store: str = "s.zarr") -> Path:
    data = manifest_dict(small_demo, tmp_path / store)
    data["datasets"][0]["seeds"] = [1]
    data["heads"] = {"methods": ["zero-shot", "sync-clip"],
                     "overrides": {"sync-clip": {"epochs": epochs}}}
    folder = tmp_path / "syn" if (tmp_path / "syn").is_dir() else _synthetic_folder(tmp_path)
    data["datasets"].append({"name": "demo-syn", "format": "imagefolder", "domain": "synthetic",
                             "pairs_with": "demo", "root": str(folder)})
    return write_manifest(tmp_path / f"{store}.yaml", data)


def test_the_stages_train_and_score_it_on_its_own_image_features(
        tmp_path: Path, small_demo: Path, one_thread: None) -> None:
    path = _manifest(tmp_path, small_demo)
    dry = json.loads(invoke("--manifest", str(path), "run", "--dry-run", "--json").stdout)
    job = {j["id"]: j for j in dry["jobs"]}["adapter:demo:seed1:sync-clip"]
    assert "records:demo-syn" in job["deps"]  # planned with its synthetic domain
    result = invoke("--manifest", str(path), "--device", "cpu", "run", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)["stages"]
    evaluation = out["evaluate"]
    assert any("sync-clip is the paper's method" in n for n in evaluation["notes"])
    rows = {r["method"]: r for r in evaluation["datasets"][0]["table"]}
    adapter = out["train-adapter"]["adapters"][0]
    assert adapter["prompt_depth"] == {"text": 2, "vision": 2}
    assert adapter["domain"] == "demo-syn" and adapter["resumed_from_epoch"] == 0
    # Recompute the score from the stored prompts and the test images themselves.
    from shipyard.pipeline.datasets import Split
    from shipyard.pipeline.head_inputs import head_inputs
    from shipyard.pipeline.head_store import load_adapter
    from shipyard.pipeline.image_sets import read_rows, stack_clean
    from shipyard.pipeline.manifest_files import load_manifest
    from shipyard.pipeline.metrics import base_new
    from shipyard.pipeline.store import FeatureStore
    from shipyard.stages.base import Environment

    manifest = load_manifest(path)
    env = Environment(manifest, device="cpu")
    store = FeatureStore.open(str(manifest.store))
    inputs = head_inputs(store, env.extractor(store), manifest.dataset("demo"), 1,
                         torch.device("cpu"))
    head = load_adapter(store, adapter["adapter"], env.clip, env.extractor_fp, inputs)
    ds = store.dataset("demo")
    test = read_rows(manifest.dataset("demo"), ds, np.flatnonzero(ds.splits() == Split.TEST),
                     manifest.extraction.max_pixels)
    with torch.no_grad():
        logits = head(head.image_features(stack_clean(test, env.clip.preprocess),
                                          env.clip.preprocess))
        cached = head(inputs.test.features)  # what scoring cached features would give
    want = base_new(logits, inputs.test.labels, inputs.base, inputs.new)
    assert rows["sync-clip"]["base"] == pytest.approx(want["base"])
    assert rows["sync-clip"]["new"] == pytest.approx(want["new"])
    assert not torch.allclose(logits, cached, atol=1e-3)
    report = (tmp_path / "reports" / "s.zarr" / "demo.html").read_text()
    assert "prompts trained and scored with the image encoder in the loop" in report
    assert ">sync-clip<" in report  # its row of the table


def test_an_image_changed_since_extraction_is_refused_in_one_line(
        tmp_path: Path, small_demo: Path) -> None:
    from shipyard.pipeline.errors import UsageError
    from shipyard.pipeline.image_sets import read_rows
    from shipyard.pipeline.manifest_files import load_manifest
    from shipyard.pipeline.store import FeatureStore

    path = _manifest(tmp_path, small_demo)
    assert invoke("--manifest", str(path), "--device", "cpu", "extract").exit_code == 0
    manifest = load_manifest(path)
    ds = FeatureStore.open(str(manifest.store)).dataset("demo")
    spec, rows = manifest.dataset("demo"), np.arange(3)
    assert len(read_rows(spec, ds, rows, 10**8)) == 3
    name = ds.paths()[1]
    Image.new("RGB", (28, 28), (9, 9, 9)).save(spec.root / name)
    with pytest.raises(UsageError, match=f"^dataset demo: {name} changed since it was extracted; "
                                         "run `shipyard extract`$"):
        read_rows(spec, ds, rows, 10**8)
    (spec.root / name).unlink()
    with pytest.raises(UsageError, match=f"^dataset demo: cannot read {name} "):
        read_rows(spec, ds, rows, 10**8)


CHILD = slow_checkpoints_child('run_stage(load_manifest(sys.argv[1]), "train-adapter", '
                               'seeds=(1,), methods=("sync-clip",))')


def _checkpoint_epoch(store: Path) -> int:
    return checkpoint_epoch(store, "adapters")


def _stored_prompts(manifest_path: Path, key: str) -> dict[str, torch.Tensor]:
    from shipyard.pipeline.artifacts import ADAPTER, Ref
    from shipyard.pipeline.manifest_files import load_manifest
    from shipyard.pipeline.store import FeatureStore
    from shipyard.pipeline.weights import load_tensors

    with FeatureStore.open(str(load_manifest(manifest_path).store)) as store:
        group = store.lookup(Ref.of(ADAPTER, key))
        assert group is not None
        assert not [k for k in group.group_keys() if k.startswith("checkpoint_")]
        return load_tensors(group, "weights")


@pytest.mark.slow
def test_a_sigkilled_training_resumes_to_the_uninterrupted_prompts(
        tmp_path: Path, small_demo: Path) -> None:
    from shipyard.pipeline.manifest_files import load_manifest

    from tests.conftest import run_stage

    epochs = 8
    killed = _manifest(tmp_path, small_demo, epochs=epochs, store="killed.zarr")
    assert invoke("--manifest", str(killed), "--device", "cpu", "extract").exit_code == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(killed),
                             str(torch.get_num_threads())], env=env, cwd=ROOT)
    store = tmp_path / "killed.zarr"
    try:
        deadline = time.monotonic() + 180
        while _checkpoint_epoch(store) < 2 and time.monotonic() < deadline:
            assert child.poll() is None, "training finished before it could be killed"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    at_kill = _checkpoint_epoch(store)
    assert 2 <= at_kill < epochs

    again = run_stage(load_manifest(killed), "train-adapter", seeds=(1,), methods=("sync-clip",))
    r = again["adapters"][0]
    assert r["status"] == "resumed" and r["resumed_from_epoch"] == at_kill
    clean = _manifest(tmp_path, small_demo, epochs=epochs, store="clean.zarr")
    assert invoke("--manifest", str(clean), "--device", "cpu", "extract").exit_code == 0
    c = run_stage(load_manifest(clean), "train-adapter", seeds=(1,),
                  methods=("sync-clip",))["adapters"][0]
    assert c["status"] == "built" and c["adapter"] == r["adapter"]
    got, want = _stored_prompts(killed, r["adapter"]), _stored_prompts(clean, c["adapter"])
    assert got.keys() == want.keys() == {"ctx", "text_deep", "vision_prompts", "synthetic_prompts"}
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert r["final_loss"] == c["final_loss"]
