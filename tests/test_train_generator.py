"""`train-generator` and `synthesize` as stages: skipping, resuming after SIGKILL, bad input,
and synthetic sets that grow by the classes they lack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from shipyard.pipeline.errors import ExtractorMismatchError, StoreError
from shipyard.pipeline.manifest import Manifest
from shipyard.pipeline.store import FeatureStore
from shipyard.pipeline.weights import load_tensors
from shipyard.stages.extract import ExtractOptions
from shipyard.stages.extract import run as extract
from shipyard.stages.synthesize import SynthesizeOptions, read_synthetic
from shipyard.stages.synthesize import run as synthesize
from shipyard.stages.train_generator import TrainGeneratorOptions
from shipyard.stages.train_generator import run as train

EPOCHS = 6


def _ready(make_manifest: Callable[..., Manifest], store: str = "store.zarr",
           epochs: int = EPOCHS, **kw: object) -> Manifest:
    m = make_manifest(store=store, ship={"epochs": epochs}, **kw)
    extract(m, ExtractOptions(device="cpu"))
    return m


def _weights(m: Manifest, fp: str) -> dict[str, torch.Tensor]:
    with FeatureStore.open(m.store) as store:
        group = store.artifact("generators", fp)
        assert group is not None
        return load_tensors(group, "weights")


def test_trains_then_skips_when_up_to_date(make_manifest: Callable[..., Manifest]) -> None:
    m = _ready(make_manifest)
    first = train(m, TrainGeneratorOptions(seeds=(1,), device="cpu"))
    gen = first["generators"][0]
    assert gen["status"] == "trained" and gen["epochs_run"] == EPOCHS
    assert set(gen["final"]) == {"loss", "recon", "kl"}
    again = train(m, TrainGeneratorOptions(seeds=(1,), device="cpu"))
    assert again["generators"][0]["status"] == "up to date"
    assert again["generators"][0]["epochs_run"] == 0
    other_seed = train(m, TrainGeneratorOptions(seeds=(2,), device="cpu"))
    assert other_seed["generators"][0]["generator"] != gen["generator"]
    with FeatureStore.open(m.store) as store:
        group = store.artifact("generators", gen["generator"])
        assert group is not None
        log = group.attrs["log"]
        assert [e["epoch"] for e in log] == list(range(1, EPOCHS + 1))  # type: ignore[index,union-attr]
        assert not [k for k in group.group_keys() if k.startswith("checkpoint_")]


CHILD = """
import sys, time
import shipyard.stages.train_generator as tg
real = tg.save_checkpoint
def slow(group, state):
    real(group, state)
    time.sleep(0.3)
tg.save_checkpoint = slow
from shipyard.pipeline.manifest import load_manifest
tg.run(load_manifest(sys.argv[1]), tg.TrainGeneratorOptions(seeds=(1,), device="cpu"))
"""


def _checkpoint_epoch(store: Path) -> int:
    # Polling races the writer by design: zarr warns about its in-flight temporary files.
    warnings.filterwarnings("ignore", message=".*partial is not recognized", category=UserWarning)
    try:
        root = zarr.open_group(zarr.storage.LocalStore(store, read_only=True), mode="r")
        for fp in root["generators"].group_keys():
            name = root[f"generators/{fp}"].attrs.get("checkpoint")
            return int(str(name).removeprefix("checkpoint_")) if name else 0
    except Exception:  # not created yet: keep polling
        return 0
    return 0


def test_sigkilled_training_resumes_to_the_same_weights(
        make_manifest: Callable[..., Manifest]) -> None:
    epochs = 12
    killed = _ready(make_manifest, store="killed.zarr", epochs=epochs)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(killed.path)],
                             env=env, cwd=root)
    try:
        deadline = time.monotonic() + 180
        while _checkpoint_epoch(Path(killed.store)) < 3 and time.monotonic() < deadline:
            assert child.poll() is None, "training finished before it could be killed"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
    at_kill = _checkpoint_epoch(Path(killed.store))
    assert 3 <= at_kill < epochs

    resumed = train(killed, TrainGeneratorOptions(seeds=(1,), device="cpu"))
    r = resumed["generators"][0]
    assert r["status"] == "resumed" and r["resumed_from_epoch"] == at_kill
    assert r["epochs_run"] == epochs - at_kill

    clean = _ready(make_manifest, store="clean.zarr", epochs=epochs)
    c = train(clean, TrainGeneratorOptions(seeds=(1,), device="cpu"))["generators"][0]
    assert c["generator"] == r["generator"]
    got, want = _weights(killed, r["generator"]), _weights(clean, c["generator"])
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert r["final"] == c["final"]


def test_store_of_another_extractor_fails_and_writes_nothing(
        make_manifest: Callable[..., Manifest]) -> None:
    _ready(make_manifest)
    other_model = make_manifest(model={"init_seed": 5})  # same store, other weights
    with pytest.raises(ExtractorMismatchError, match="run `shipyard extract`"):
        train(other_model, TrainGeneratorOptions(seeds=(1,), epochs=1, device="cpu"))
    with FeatureStore.open(other_model.store) as store:
        assert store.artifact_fps("generators") == []


def test_dataset_without_features_fails_and_writes_nothing(
        make_manifest: Callable[..., Manifest]) -> None:
    m = make_manifest()
    FeatureStore.open(m.store, read_only=False, create=True).close()  # an empty store
    with pytest.raises(ExtractorMismatchError, match="no features of this manifest's model"):
        train(m, TrainGeneratorOptions(epochs=1, device="cpu"))
    # Extracted, but the requested dataset's records are not in the store.
    extract(m, ExtractOptions(device="cpu"))
    with FeatureStore.open(m.store, read_only=False) as store:
        store.root["datasets/demo"].attrs["current"] = "0" * 64  # records point nowhere
    with pytest.raises(StoreError):
        train(m, TrainGeneratorOptions(epochs=1, device="cpu"))
    with FeatureStore.open(m.store) as store:
        assert store.artifact_fps("generators") == []


def test_synthesize_adds_only_missing_classes(make_manifest: Callable[..., Manifest]) -> None:
    m = _ready(make_manifest)
    train(m, TrainGeneratorOptions(seeds=(1,), device="cpu"))
    first = synthesize(m, SynthesizeOptions(seeds=(1,), classes=("new",), per_class=8,
                                            device="cpu"))
    s = first["sets"][0]
    assert s["classes"] == 5 and s["synthesized"] == 5 and s["reused"] == 0
    more = synthesize(m, SynthesizeOptions(seeds=(1,), classes=("all", "denim jacket"),
                                           per_class=8, device="cpu"))["sets"][0]
    assert more["synthetic"] == s["synthetic"]
    assert more["classes"] == 11 and more["synthesized"] == 6 and more["reused"] == 5
    with FeatureStore.open(m.store) as store:
        names = [*list(store.dataset("demo").classnames), "denim jacket"]
        feats = read_synthetic(store, s["synthetic"], names)
        assert set(feats) == set(names)
        for f in feats.values():
            assert f.shape == (8, 64)
            np.testing.assert_allclose(np.linalg.norm(f.astype(np.float32), axis=1), 1, atol=2e-3)
        group = store.artifact("synthetic", s["synthetic"])
        assert group is not None and group.attrs["fingerprint"]["domain"] == "synthetic"  # type: ignore[index,call-overload]


def test_per_class_samples_do_not_depend_on_the_other_classes(
        make_manifest: Callable[..., Manifest]) -> None:
    a = _ready(make_manifest, store="a.zarr")
    b = _ready(make_manifest, store="b.zarr")
    for m in (a, b):
        train(m, TrainGeneratorOptions(seeds=(1,), device="cpu"))
    sa = synthesize(a, SynthesizeOptions(seeds=(1,), classes=("all",), per_class=4,
                                         device="cpu"))["sets"][0]["synthetic"]
    sb = synthesize(b, SynthesizeOptions(seeds=(1,), classes=("bag", "sandal"), per_class=4,
                                         device="cpu"))["sets"][0]["synthetic"]
    with FeatureStore.open(a.store) as x, FeatureStore.open(b.store) as y:
        fa, fb = read_synthetic(x, sa, ["bag", "sandal"]), read_synthetic(y, sb, ["bag", "sandal"])
    for name in ("bag", "sandal"):
        np.testing.assert_array_equal(fa[name], fb[name])
    assert not np.allclose(fa["bag"].astype(float), fa["sandal"].astype(float))


def test_synthesize_without_generator_is_a_clear_error(
        make_manifest: Callable[..., Manifest]) -> None:
    m = _ready(make_manifest)
    with pytest.raises(Exception, match="no trained generator"):
        synthesize(m, SynthesizeOptions(seeds=(1,), device="cpu"))
