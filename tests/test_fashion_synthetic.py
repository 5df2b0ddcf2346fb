"""The demo's stand-in synthetic domain: what its sampler and rendering shift compute, and the
shipped set as the demo manifest reads it (16 images for each of the demo's 10 classes)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from shipyard.pipeline.datasets import Split, read_dataset
from shipyard.pipeline.manifest_files import load_manifest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import make_fashion_synthetic as syn  # noqa: E402


def test_render_brightens_by_gamma_then_blurs_3x3() -> None:
    flat = syn.render(np.full((5, 5), 64.0))
    assert flat.dtype == np.uint8
    assert np.all(flat == round(255 * (64 / 255) ** 0.6))  # 111: mid-tones brightened
    dot = np.zeros((5, 5))
    dot[2, 2] = 255
    out = syn.render(dot)
    assert np.all(out[1:4, 1:4] == round(255 / 9)) and out.sum() == 9 * round(255 / 9)


def test_sampler_draws_along_the_fitted_directions_only() -> None:
    rng = np.random.default_rng(0)
    images = np.full((40, 28, 28), 30, dtype=np.uint8)
    images[:, 5, 7] = rng.integers(0, 256, 40)  # the only pixel that varies
    samples = syn.fit_and_sample(images, 50, np.random.default_rng(1))
    assert samples.shape == (50, 28, 28)
    rest = np.delete(samples.reshape(50, -1), 5 * 28 + 7, axis=1)
    assert np.allclose(rest, 30)
    varying = samples[:, 5, 7]
    assert varying.std() > 20  # drawn with the pixel's own spread (about 74), clipped to 0..255
    same = syn.fit_and_sample(images, 50, np.random.default_rng(1))
    assert np.array_equal(samples, same)


def test_the_demo_manifest_reads_the_shipped_set_as_every_class_of_the_demo() -> None:
    manifest = load_manifest(ROOT / "data_manifest.yaml")
    real = read_dataset(manifest.dataset("fashion-demo"))
    spec = manifest.dataset("fashion-synthetic")
    assert spec.domain.value == "synthetic" and spec.pairs_with == "fashion-demo"
    records = read_dataset(spec, classes_of=real.classnames)
    assert records.classnames == real.classnames
    counts = np.bincount([r.label for r in records.records], minlength=10)
    assert counts.tolist() == [16] * 10
    assert {r.split for r in records.records} == {Split.TRAIN}
    for r in records.records:  # each image sits in the folder of the class it is labelled with
        assert Path(r.path).parent.name.replace("_", " ") == real.classnames[r.label]


@pytest.mark.skipif(not (syn.SOURCE / "train-images-idx3-ubyte.gz").is_file(),
                    reason="needs Debian's dataset-fashion-mnist")
def test_the_script_regenerates_the_shipped_set_byte_for_byte(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "examples" / "make_fashion_synthetic.py"), "--out",
                    str(tmp_path)], check=True, capture_output=True)
    shipped = sorted(p.relative_to(ROOT / "examples" / "fashion_synthetic")
                     for p in (ROOT / "examples" / "fashion_synthetic").rglob("*.png"))
    assert shipped == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.png"))
    for rel in shipped:
        assert (tmp_path / rel).read_bytes() == (ROOT / "examples" / "fashion_synthetic" / rel).read_bytes()
