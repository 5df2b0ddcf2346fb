"""Stored features against an obvious reference, and what bad images do to a run."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from shipyard.pipeline.errors import ImageError
from shipyard.pipeline.manifest import Manifest
from shipyard.pipeline.models import shipped_configs
from shipyard.pipeline.store import FeatureStore

from tests.conftest import run_stage


def test_cached_features_equal_open_clip_directly(make_manifest: Callable[..., Manifest],
                                                  small_demo: Path) -> None:
    """The store's features are what open_clip's own model + transform give, to float16 precision."""
    m = make_manifest()
    out = run_stage(m, "extract")
    open_clip.add_model_config(shipped_configs()["shipyard-tiny"])
    torch.manual_seed(0)  # the manifest's init_seed
    model, _, preprocess = open_clip.create_model_and_transforms("shipyard-tiny")
    model.eval()
    split = json.loads((small_demo / "split.json").read_text())
    paths = [small_demo / "images" / row[0] for row in split["test"][:16]]
    with torch.no_grad():
        batch = torch.stack([preprocess(Image.open(p)) for p in paths])
        raw = model.encode_image(batch).numpy()
        direct = model.encode_image(batch, normalize=True).numpy()
    with FeatureStore.open(m.store) as store:
        table = store.extractor(out["extractor"]).images
        index = table.index()
        import hashlib

        rows = np.array([index[hashlib.sha256(p.read_bytes()).digest()] for p in paths])
        cached = table.read("features", rows).astype(np.float32)
        norms = table.read("norms", rows)
    assert cached.shape == direct.shape == (16, 64)
    np.testing.assert_allclose(cached, direct, atol=1e-3, rtol=0)  # float16 storage
    cos = (cached * direct).sum(1) / np.linalg.norm(cached, axis=1)
    assert cos.min() > 0.9999
    # The raw features' norms are kept beside the unit vectors: raw = unit * norm.
    assert norms.dtype == np.float32 and norms.shape == (16,)
    np.testing.assert_allclose(norms, np.linalg.norm(raw, axis=1), rtol=1e-5)
    assert np.ptp(norms) > 1e-3  # they differ from image to image: the norms carry information
    np.testing.assert_allclose(cached * norms[:, None], raw, atol=2e-3 * norms.max())


def _break_images(small_demo: Path) -> dict[str, str]:
    """Add five bad entries to the split; returns path -> expected reason fragment."""
    images = small_demo / "images"
    good = next(images.rglob("*.png"))
    jpeg = images / "bag" / "truncated.jpg"
    Image.open(good).convert("RGB").save(jpeg, format="JPEG")
    data = jpeg.read_bytes()
    jpeg.write_bytes(data[: len(data) // 2])
    (images / "bag" / "empty.png").write_bytes(b"")
    (images / "bag" / "notes.png").write_text("this is not an image\n")
    split = json.loads((small_demo / "split.json").read_text())
    bag = next(row for row in split["train"] if row[2] == "bag")
    extra = ["bag/truncated.jpg", "bag/empty.png", "bag/notes.png", "bag/missing.png",
             "../outside.png"]
    split["train"] += [[p, bag[1], "bag"] for p in extra]
    (small_demo / "split.json").write_text(json.dumps(split))
    return {"truncated.jpg": "cannot decode", "empty.png": "empty file",
            "notes.png": "not a recognised image", "missing.png": "file not found",
            "../outside.png": "escapes the image root"}


def test_bad_images_are_reported_and_skipped(make_manifest: Callable[..., Manifest],
                                             small_demo: Path) -> None:
    expected = _break_images(small_demo)
    m = make_manifest()
    out = run_stage(m, "extract")
    assert out["failed"] == 5 and out["extracted"] == 120
    for fragment, reason in expected.items():
        hits = [f for f in out["failures"] if f["path"].endswith(fragment)]
        assert len(hits) == 1, fragment
        assert reason in hits[0]["reason"], hits[0]
    with FeatureStore.open(m.store) as store:
        ds = store.dataset("demo")
        assert len(ds) == 120  # bad entries are not records
        assert len(ds.failures) == 5
    again = run_stage(m, "extract")  # still reported, nothing re-encoded
    assert again["failed"] == 5 and again["extracted"] == 0
    from shipyard.stages.runner import Request
    from shipyard.stages.status import status

    entry = status(m, Request(), device="cpu")["datasets"][0]
    assert entry["unusable"] == 5 and entry["missing_features"] == 0  # 3 of them failed to decode


def test_strict_fails_before_writing(make_manifest: Callable[..., Manifest],
                                     small_demo: Path) -> None:
    _break_images(small_demo)
    m = make_manifest()
    with pytest.raises(ImageError, match="--strict"):
        run_stage(m, "extract", strict=True)
    assert not Path(m.store).exists()


def test_strict_decode_failure_keeps_committed_rows(make_manifest: Callable[..., Manifest],
                                                    small_demo: Path) -> None:
    m = make_manifest()
    first = run_stage(m, "extract")
    split = json.loads((small_demo / "split.json").read_text())
    (small_demo / "images" / "bag" / "notes.png").write_text("not an image")
    split["test"].append(["bag/notes.png", split["test"][0][1], split["test"][0][2]])
    (small_demo / "split.json").write_text(json.dumps(split))
    with pytest.raises(ImageError, match="not a recognised image"):
        run_stage(m, "extract", strict=True)
    with FeatureStore.open(m.store) as store:
        assert store.extractor(first["extractor"]).images.rows == 120


def test_sixteen_bit_images_are_scaled_not_clipped() -> None:
    import io

    import numpy as np
    from PIL import Image
    from shipyard.pipeline.preprocess import decode

    grey = np.linspace(0, 60000, 64 * 64).reshape(64, 64).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(grey).save(buf, format="PNG")  # mode I;16
    got = np.asarray(decode(buf.getvalue(), "deep.png"))[..., 0].astype(int)
    want = np.rint(grey / 257.0).astype(int)  # 65535 -> 255
    assert np.abs(got - want).max() <= 1
    assert got.max() == 233  # 60000 / 257, not clipped to 255


def test_an_image_over_the_pixel_limit_is_a_failure_not_a_decode(
        make_manifest: Callable[..., Manifest], small_demo: Path) -> None:
    import io

    from PIL import Image
    from shipyard.pipeline.errors import ImageError
    from shipyard.pipeline.preprocess import decode

    buf = io.BytesIO()
    Image.new("L", (3000, 3000)).save(buf, format="PNG")  # 9 MP in a few KB
    with pytest.raises(ImageError, match="3000 x 3000 pixels exceed the limit of 1000000"):
        decode(buf.getvalue(), "big.png", max_pixels=1_000_000)
    split = json.loads((small_demo / "split.json").read_text())
    (small_demo / "images" / "big.png").write_bytes(buf.getvalue())
    split["train"].append(["big.png", split["train"][0][1], split["train"][0][2]])
    (small_demo / "split.json").write_text(json.dumps(split))
    out = run_stage(make_manifest(max_pixels=1_000_000), "extract")
    assert [f["reason"] for f in out["failures"]] == [
        "3000 x 3000 pixels exceed the limit of 1000000 (extraction.max_pixels)"]
