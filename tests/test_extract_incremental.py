"""Cache rules of `extract`: what an unchanged, grown, renamed or relabelled dataset costs, and
that a changed model or recipe gets its own extractor while the old one stays readable."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
from shipyard.pipeline.manifest import Manifest
from shipyard.pipeline.store import FeatureStore

from tests.conftest import DEMO, demo_split, run_stage


def extract(manifest: Manifest) -> dict:
    return run_stage(manifest, "extract")


def features_by_key(manifest: Manifest, fp: str) -> dict[bytes, np.ndarray]:
    with FeatureStore.open(manifest.store) as store:
        table = store.extractor(fp).images
        keys, feats = table.keys(), table.read("features")
    return {k.tobytes(): f for k, f in zip(keys, feats, strict=True)}


def test_unchanged_dataset_extracts_nothing(make_manifest: Callable[..., Manifest]) -> None:
    m = make_manifest()
    first = extract(m)
    assert first["extracted"] == first["images"] == 120
    assert first["views_extracted"] == 60  # 6 train images x 10 classes
    second = extract(m)
    assert second["extracted"] == 0 and second["views_extracted"] == 0
    assert second["reused"] == 120 and second["texts_extracted"] == 0
    assert second["records_updated"] == []


def test_adding_five_images_extracts_exactly_five(make_manifest: Callable[..., Manifest],
                                                  small_demo: Path) -> None:
    m = make_manifest()
    extract(m)
    split = json.loads((small_demo / "split.json").read_text())
    present = {row[0] for rows in split.values() for row in rows}
    extra = [row for row in demo_split()["test"] if row[0] not in present][:5]
    for path, _label, _cls in extra:
        shutil.copy2(DEMO / "images" / path, small_demo / "images" / path)
    split["test"] += extra
    (small_demo / "split.json").write_text(json.dumps(split))
    out = extract(m)
    assert out["extracted"] == 5 and out["reused"] == 120
    assert out["views_extracted"] == 0  # test images get no augmented views
    assert out["records_updated"] == ["demo"]
    with FeatureStore.open(m.store) as store:
        assert store.extractor(out["extractor"]).images.rows == 125
        assert len(store.dataset("demo")) == 125


def test_renaming_files_extracts_nothing(make_manifest: Callable[..., Manifest],
                                         small_demo: Path) -> None:
    m = make_manifest()
    extract(m)
    split = json.loads((small_demo / "split.json").read_text())
    for rows in split.values():
        for row in rows:
            old = small_demo / "images" / row[0]
            row[0] = row[0].replace(".png", "_renamed.png")
            old.rename(small_demo / "images" / row[0])
    (small_demo / "split.json").write_text(json.dumps(split))
    out = extract(m)
    assert out["extracted"] == 0 and out["views_extracted"] == 0
    assert out["records_updated"] == ["demo"]  # the path -> key map changed, features did not
    with FeatureStore.open(m.store) as store:
        paths = store.dataset("demo").paths()
        assert len(paths) == 120 and all(p.endswith("_renamed.png") for p in paths)


def test_relabelling_files_extracts_nothing(make_manifest: Callable[..., Manifest],
                                            small_demo: Path) -> None:
    m = make_manifest()
    first = extract(m)
    split = json.loads((small_demo / "split.json").read_text())
    # Swap the labels of two training images of different classes.
    a, b = split["train"][0], split["train"][-1]
    a[1], b[1], a[2], b[2] = b[1], a[1], b[2], a[2]
    (small_demo / "split.json").write_text(json.dumps(split))
    out = extract(m)
    assert out["extracted"] == 0 and out["views_extracted"] == 0
    assert out["extractor"] == first["extractor"]
    assert out["records_updated"] == ["demo"]


def test_changed_model_or_recipe_gets_a_new_extractor(make_manifest: Callable[..., Manifest]) -> None:
    m = make_manifest()
    first = extract(m)
    before = features_by_key(m, first["extractor"])

    other_weights = make_manifest(model={"init_seed": 7})
    assert other_weights.store == m.store
    second = extract(other_weights)
    assert second["extractor"] != first["extractor"]
    assert second["extracted"] == 120  # nothing reused across different weights

    other_recipe = make_manifest(augment={"scale": [0.08, 1.0]})
    third = extract(other_recipe)
    assert third["extractor"] not in (first["extractor"], second["extractor"])

    with FeatureStore.open(m.store) as store:
        assert set(store.extractor_fps()) == {first["extractor"], second["extractor"],
                                              third["extractor"]}
    after = features_by_key(m, first["extractor"])  # the old group is intact and readable
    assert after.keys() == before.keys()
    for key, value in before.items():
        np.testing.assert_array_equal(after[key], value)
    changed = features_by_key(m, second["extractor"])
    assert not np.allclose(changed[next(iter(before))], before[next(iter(before))])


def test_views_are_reproducible_per_image(make_manifest: Callable[..., Manifest]) -> None:
    """Each view is seeded by (image key, view index): two stores built apart agree exactly."""
    a = make_manifest(store="a.zarr")
    b = make_manifest(store="b.zarr", batch_size=8)  # other batches, same views
    fa, fb = extract(a)["extractor"], extract(b)["extractor"]
    assert fa == fb
    with FeatureStore.open(a.store) as sa, FeatureStore.open(b.store) as sb:
        ta, tb = sa.extractor(fa).view_table, sb.extractor(fb).view_table
        va = dict(zip(map(bytes, ta.keys()), ta.read("features"), strict=True))
        vb = dict(zip(map(bytes, tb.keys()), tb.read("features"), strict=True))
    assert va.keys() == vb.keys() and len(va) == 60
    for key in va:
        np.testing.assert_allclose(va[key].astype(np.float32), vb[key].astype(np.float32),
                                   atol=2e-3)
        assert not np.array_equal(va[key][0], va[key][1])  # two different views
