"""`train-generator` and `synthesize` as stages: skipping, resuming after SIGKILL, bad input,
and synthetic sets that grow by the classes they lack."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from shipyard.pipeline.artifacts import GENERATOR, SYNTHETIC, Ref, keys_of, record_of
from shipyard.pipeline.errors import UsageError
from shipyard.pipeline.head_store import read_synthetic
from shipyard.pipeline.manifest import Manifest
from shipyard.pipeline.store import FeatureStore
from shipyard.pipeline.weights import load_tensors

from tests.conftest import checkpoint_epoch, run_stage, slow_checkpoints_child

EPOCHS = 6


def _ready(make_manifest: Callable[..., Manifest], store: str = "store.zarr",
           epochs: int = EPOCHS, **kw: object) -> Manifest:
    m = make_manifest(store=store, ship={"epochs": epochs}, **kw)
    run_stage(m, "extract")
    return m


def train(m: Manifest, seeds: tuple[int, ...] = (), **options: object) -> dict:
    return run_stage(m, "train-generator", seeds=seeds, **options)


def synthesize(m: Manifest, seeds: tuple[int, ...] = (), **options: object) -> dict:
    return run_stage(m, "synthesize", seeds=seeds, **options)


def _weights(m: Manifest, fp: str) -> dict[str, torch.Tensor]:
    with FeatureStore.open(m.store) as store:
        group = store.lookup(Ref.of(GENERATOR, fp))
        assert group is not None
        return load_tensors(group, "weights")


def test_trains_then_skips_when_up_to_date(make_manifest: Callable[..., Manifest]) -> None:
    m = _ready(make_manifest)
    first = train(m, (1,))
    gen = first["generators"][0]
    assert gen["status"] == "trained" and gen["epochs_run"] == EPOCHS
    assert set(gen["final"]) == {"loss", "recon", "kl"}
    again = train(m, (1,))
    assert again["generators"][0]["status"] == "up to date"
    assert again["generators"][0]["epochs_run"] == 0
    other_seed = train(m, (2,))
    assert other_seed["generators"][0]["generator"] != gen["generator"]
    with FeatureStore.open(m.store) as store:
        group = store.lookup(Ref.of(GENERATOR, gen["generator"]))
        assert group is not None
        log = group.attrs["log"]
        assert [e["epoch"] for e in log] == list(range(1, EPOCHS + 1))  # type: ignore[index,union-attr]
        assert not [k for k in group.group_keys() if k.startswith("checkpoint_")]


CHILD = slow_checkpoints_child('run_stage(load_manifest(sys.argv[1]), "train-generator", seeds=(1,))')


def _checkpoint_epoch(store: Path) -> int:
    return checkpoint_epoch(store, "generators")


def test_sigkilled_training_resumes_to_the_same_weights(
        make_manifest: Callable[..., Manifest]) -> None:
    epochs = 12
    killed = _ready(make_manifest, store="killed.zarr", epochs=epochs)
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root)}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(killed.path),
                              str(torch.get_num_threads())],
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

    resumed = train(killed, (1,))
    r = resumed["generators"][0]
    assert r["status"] == "resumed" and r["resumed_from_epoch"] == at_kill
    assert r["epochs_run"] == epochs - at_kill

    clean = _ready(make_manifest, store="clean.zarr", epochs=epochs)
    c = train(clean, (1,))["generators"][0]
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
    with pytest.raises(UsageError, match=r"needs records:demo.*no features of this model"):
        train(other_model, (1,), epochs=1)
    with FeatureStore.open(other_model.store) as store:
        assert keys_of(store.root, GENERATOR) == []


def test_dataset_without_features_fails_and_writes_nothing(
        make_manifest: Callable[..., Manifest]) -> None:
    m = make_manifest()
    FeatureStore.open(m.store, read_only=False, create=True).close()  # an empty store
    with pytest.raises(UsageError, match="run `shipyard extract` first"):
        train(m, epochs=1)
    # Extracted, but the requested dataset's records are not in the store.
    run_stage(m, "extract")
    with FeatureStore.open(m.store, read_only=False) as store:
        store.root["datasets/demo"].attrs["current"] = "0" * 64  # records point nowhere
    with pytest.raises(UsageError, match="stored records differ from the split"):
        train(m, epochs=1)
    with FeatureStore.open(m.store) as store:
        assert keys_of(store.root, GENERATOR) == []


def test_synthesize_adds_only_missing_classes(make_manifest: Callable[..., Manifest]) -> None:
    m = _ready(make_manifest)
    train(m, (1,))
    first = synthesize(m, (1,), classes=("new",), per_class=8)
    s = first["sets"][0]
    assert s["classes"] == 5 and s["synthesized"] == 5 and s["reused"] == 0
    more = synthesize(m, (1,), classes=("all", "denim jacket"), per_class=8)["sets"][0]
    assert more["synthetic"] == s["synthetic"]
    assert more["classes"] == 11 and more["synthesized"] == 6 and more["reused"] == 5
    with FeatureStore.open(m.store) as store:
        names = [*list(store.dataset("demo").classnames), "denim jacket"]
        feats = read_synthetic(store, s["synthetic"], names)
        assert set(feats) == set(names)
        for f in feats.values():
            assert f.shape == (8, 64)
            np.testing.assert_allclose(np.linalg.norm(f.astype(np.float32), axis=1), 1, atol=2e-3)
        group = store.lookup(Ref.of(SYNTHETIC, s["synthetic"]))
        assert group is not None and record_of(group)["params"]["domain"] == "synthetic"


def test_per_class_samples_do_not_depend_on_the_other_classes(
        make_manifest: Callable[..., Manifest]) -> None:
    a = _ready(make_manifest, store="a.zarr")
    b = _ready(make_manifest, store="b.zarr")
    for m in (a, b):
        train(m, (1,))
    sa = synthesize(a, (1,), classes=("all",), per_class=4)["sets"][0]["synthetic"]
    sb = synthesize(b, (1,), classes=("bag", "sandal"), per_class=4)["sets"][0]["synthetic"]
    with FeatureStore.open(a.store) as x, FeatureStore.open(b.store) as y:
        fa, fb = read_synthetic(x, sa, ["bag", "sandal"]), read_synthetic(y, sb, ["bag", "sandal"])
    for name in ("bag", "sandal"):
        np.testing.assert_array_equal(fa[name], fb[name])
    assert not np.allclose(fa["bag"].astype(float), fa["sandal"].astype(float))


def test_synthesize_without_generator_is_a_clear_error(
        make_manifest: Callable[..., Manifest]) -> None:
    m = _ready(make_manifest)
    with pytest.raises(UsageError, match=r"needs generator:demo:seed1.*run `shipyard "
                                         r"train-generator` first"):
        synthesize(m, (1,))
