"""Two view recipes in one extractor: Dassl's crops (scale 0.08-1) for CoOp and CLIP-Adapter
beside the primary SHIP / Tip-Adapter crops (0.5-1), stored once per image, read by the heads
that train on them, and keyed so that changing one recipe invalidates only its readers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from shipyard.cli import app
from shipyard.pipeline.identity import view_recipe_key
from shipyard.pipeline.manifest import AugmentSpec
from shipyard.pipeline.manifest_files import load_manifest
from shipyard.pipeline.store import FeatureStore
from typer.testing import CliRunner

from tests.conftest import manifest_dict, write_manifest

DASSL = {"scale": [0.08, 1.0]}


def _data(small_demo: Path, store: Path) -> dict[str, Any]:
    data = manifest_dict(small_demo, store)
    data["extraction"]["recipes"] = {"dassl": DASSL}
    data["ship"] = {"epochs": 2, "synthesize": {"per_class": 3}}
    data["heads"] = {"methods": ["coop", "coop+ship", "tip-adapter"],
                     "overrides": {"coop": {"epochs": 2}}}
    data["datasets"][0]["seeds"] = [1]
    return data


def invoke(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def test_dassl_views_are_stored_beside_the_primary_ones_and_read_by_coop(
        tmp_path: Path, small_demo: Path) -> None:
    from shipyard.pipeline.head_inputs import head_inputs
    from shipyard.pipeline.models import load_clip
    from shipyard.pipeline.preprocess import augmented_views, decode

    path = write_manifest(tmp_path / "m.yaml", _data(small_demo, tmp_path / "s.zarr"))
    result = invoke("--manifest", str(path), "--device", "cpu", "run", "--json")
    assert result.exit_code == 0, result.output
    m = load_manifest(path)
    key = view_recipe_key(m.extraction, "dassl")
    store = FeatureStore.open(m.store)
    (fp,) = store.extractor_fps()
    ex = store.extractor(fp)
    dassl = ex.views_of(key)
    assert dassl is not None and dassl.rows == ex.view_table.rows == 60  # every train image
    assert set(dassl.index()) == set(ex.view_table.index())

    # A stored Dassl view, by hand: the same seeded crop box at scale (0.08, 1), encoded.
    clip = load_clip(m.model, torch.device("cpu"))
    split = json.loads((small_demo / "split.json").read_text())
    image = small_demo / "images" / split["train"][0][0]
    import hashlib

    digest = hashlib.sha256(image.read_bytes()).digest()
    views = augmented_views(decode(image.read_bytes(), image.name), digest, 2, 0,
                            AugmentSpec(scale=(0.08, 1.0)), clip.preprocess)
    with torch.no_grad():
        raw = clip.model.encode_image(views).numpy()
    unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    row = np.array([dassl.index()[digest]])
    np.testing.assert_allclose(dassl.read("features", row)[0].astype(np.float32), unit, atol=2e-3)
    np.testing.assert_allclose(dassl.read("norms", row)[0], np.linalg.norm(raw, axis=1),
                               rtol=1e-4)
    primary = ex.view_table.read("features", np.array([ex.view_table.index()[digest]]))[0]
    assert not np.allclose(primary, dassl.read("features", row)[0], atol=1e-2)  # other crops

    # CoOp reads the Dassl views; CoOp+SHIP (SHIP's recipe) and Tip-Adapter the primary ones.
    status = json.loads(invoke("--manifest", str(path), "status", "--json").stdout)
    assert status["up_to_date"] is True
    from shipyard.pipeline.artifacts import ADAPTER, CACHE, Ref, keys_of

    records = [dict(store.lookup(Ref.of(kind, k)).attrs["record"])
               for kind in (ADAPTER, CACHE) for k in keys_of(store.root, kind)]
    read = {(r["params"]["head"], bool(r["params"].get("mix"))): r["inputs"].get("views")
            for r in records}
    assert read == {("coop", False): key, ("coop", True): None, ("tip-adapter", False): None}
    spec = m.datasets[0]
    coop_inputs = head_inputs(store, ex, spec, 1, torch.device("cpu"), key)
    plain = head_inputs(store, ex, spec, 1, torch.device("cpu"))
    assert torch.equal(coop_inputs.train.clean, plain.train.clean)
    assert not torch.allclose(coop_inputs.train.views, plain.train.views, atol=1e-2)


def test_changing_the_dassl_recipe_makes_only_its_readers_stale(tmp_path: Path,
                                                                 small_demo: Path) -> None:
    data = _data(small_demo, tmp_path / "s.zarr")
    path = write_manifest(tmp_path / "m.yaml", data)
    assert invoke("--manifest", str(path), "--device", "cpu", "run").exit_code == 0
    data["extraction"]["recipes"]["dassl"] = {"scale": [0.1, 1.0]}
    write_manifest(path, data)
    status = json.loads(invoke("--manifest", str(path), "status", "--json").stdout)
    # extract: the new recipe's views are missing; coop reads them; the rest stays.
    assert set(status["stale"]) == {"records:demo", "adapter:demo:seed1:coop", "run:demo",
                                    "report:demo"}


def test_without_the_recipe_coop_trains_on_the_primary_views(tmp_path: Path,
                                                              small_demo: Path) -> None:
    data = _data(small_demo, tmp_path / "s.zarr")
    del data["extraction"]["recipes"]
    path = write_manifest(tmp_path / "m.yaml", data)
    from shipyard.pipeline.recipes import head_config

    m = load_manifest(path)
    assert head_config(m, m.datasets[0], "coop").views == "primary"
    data["extraction"]["recipes"] = {"dassl": DASSL}
    m = load_manifest(write_manifest(path, data))
    assert head_config(m, m.datasets[0], "coop").views == "dassl"
    assert head_config(m, m.datasets[0], "coop+ship").views == "primary"
    assert head_config(m, m.datasets[0], "clip-adapter").views == "dassl"
    assert head_config(m, m.datasets[0], "tip-adapter-f").views == "primary"


def test_an_override_naming_an_unknown_recipe_is_refused(tmp_path: Path, small_demo: Path) -> None:
    data = _data(small_demo, tmp_path / "s.zarr")
    data["heads"]["overrides"]["tip-adapter-f"] = {"views": "dasl"}
    path = write_manifest(tmp_path / "m.yaml", data)
    result = invoke("--manifest", str(path), "status")
    assert result.exit_code == 2
    assert "heads.overrides.tip-adapter-f.views: unknown view recipe 'dasl'" in result.stderr


@pytest.mark.parametrize("name", ["Dassl", "-x", ""])
def test_recipe_names_are_plain(tmp_path: Path, small_demo: Path, name: str) -> None:
    data = _data(small_demo, tmp_path / "s.zarr")
    data["extraction"]["recipes"] = {name: DASSL}
    result = invoke("--manifest", str(write_manifest(tmp_path / "m.yaml", data)), "status")
    assert result.exit_code == 2
