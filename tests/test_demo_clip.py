"""The demo's CLIP: the shipped checkpoint is the one its model card describes and reaches the
zero-shot accuracy the card states; the training script learns, is deterministic and never
trains on the demo's images."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import re
import struct
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from shipyard.pipeline.manifest import ModelSpec
from shipyard.pipeline.models import encode_images, encode_texts, load_clip
from shipyard.pipeline.preprocess import clean_view, decode

ROOT = Path(__file__).resolve().parent.parent
CARD_DIR = ROOT / "examples" / "demo_clip"
WEIGHTS = CARD_DIR / "shipyard-tiny-fashion.safetensors"
DEMO = ROOT / "examples" / "fashion_demo"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    sys.path.insert(0, str(ROOT / "examples"))  # as when run: it imports the demo's builder
    spec = importlib.util.spec_from_file_location("train_demo_clip", ROOT / "examples" / "train_demo_clip.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _card() -> dict[str, float | str]:
    text = (CARD_DIR / "MODEL_CARD.md").read_text("utf-8")
    digest = re.search(r"\*\*sha256\*\*: `([0-9a-f]{64})`", text)
    top1 = re.search(r"\): ([0-9.]+) top-1 over all 10 classes", text)
    assert digest and top1, "MODEL_CARD.md lost its sha256 or accuracy line"
    return {"sha256": digest.group(1), "top1": float(top1.group(1))}


def test_shipped_checkpoint_matches_its_card_and_reaches_its_accuracy(one_thread: None) -> None:
    card = _card()
    assert hashlib.sha256(WEIGHTS.read_bytes()).hexdigest() == card["sha256"]
    assert WEIGHTS.stat().st_size < 8_000_000
    clip = load_clip(ModelSpec(name="shipyard-tiny", pretrained=str(WEIGHTS)), torch.device("cpu"))
    split = json.loads((DEMO / "split_zhou_FashionDemo.json").read_text())
    rows = split["test"]
    images = torch.stack([clean_view(decode((DEMO / "images" / rel).read_bytes(), rel), clip.preprocess)
                          for rel, _label, _name in rows])
    names = [name for _label, name in sorted({(label, name) for _rel, label, name in rows})]
    text = encode_texts(clip, [f"a photo of a {n}, a type of clothing." for n in names])
    image = encode_images(clip, images)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    top1 = float(((image @ text.T).argmax(1) == np.array([r[1] for r in rows])).mean())
    # The card's figure was measured on these weights through the same preprocessing; a margin of
    # 1% (6 images) allows for other BLAS builds flipping a borderline image.
    assert top1 >= float(card["top1"]) - 0.01
    assert top1 > 0.5  # chance is 0.10: the model has learned


def test_demo_manifest_loads_the_shipped_checkpoint() -> None:
    data = yaml.safe_load((ROOT / "data_manifest.yaml").read_text())
    assert (ROOT / data["model"]["pretrained"]).resolve() == WEIGHTS
    assert data["model"]["name"] == "shipyard-tiny"
    with safe_open(str(WEIGHTS), "pt") as f:  # a description the report shows as a note
        assert "Fashion-MNIST" in f.metadata()["description"]


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def fake_mnist(tmp_path: Path) -> Path:
    """60 images, 6 per class, each class a bright band at its own rows: learnable in steps."""
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 10
    images = rng.integers(0, 40, size=(60, 28, 28))
    for i, label in enumerate(labels):
        images[i, 2 * label + 4 : 2 * label + 7] = 250
    source = tmp_path / "mnist"
    source.mkdir()
    _write_idx(source / "train-images-idx3-ubyte.gz", images)
    _write_idx(source / "train-labels-idx1-ubyte.gz", labels)
    return source


def _train(script: ModuleType, source: Path, out: Path, *extra: str, capsys: Any) -> dict[str, Any]:
    argv = ["--source", str(source), "--out", str(out), "--steps", "30", "--batch-size", "20",
            "--warmup", "0", "--lr", "3e-3", "--eval-split", "none", "--log-every", "10", *extra]
    assert script.main(argv) == 0
    return dict(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))


def test_training_learns_and_one_seed_gives_identical_weights(script: ModuleType, fake_mnist: Path,
                                                              tmp_path: Path, capsys: Any) -> None:
    first = _train(script, fake_mnist, tmp_path / "a" / "w.safetensors", "--exclude-split", "none",
                   capsys=capsys)
    second = _train(script, fake_mnist, tmp_path / "b" / "w.safetensors", "--exclude-split", "none",
                    capsys=capsys)
    assert first["last_loss"] < 0.8 * first["first_loss"]
    assert first["sha256"] == second["sha256"]
    assert (tmp_path / "a" / "w.safetensors").read_bytes() == (tmp_path / "b" / "w.safetensors").read_bytes()
    other = _train(script, fake_mnist, tmp_path / "c" / "w.safetensors", "--exclude-split", "none",
                   "--seed", "1", capsys=capsys)
    assert other["sha256"] != first["sha256"]
    card = (tmp_path / "a" / "MODEL_CARD.md").read_text()
    assert first["sha256"] in card and "30 steps of 20" in card


def test_training_leaves_out_the_demo_images(script: ModuleType, fake_mnist: Path, tmp_path: Path) -> None:
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"train": [["a/train_00003.png", 3, "dress"]],
                                 "val": [["a/train_00017.png", 7, "sneaker"]],
                                 "test": [["a/test_00005.png", 5, "sandal"]]}))
    args = script.parse_args(["--source", str(fake_mnist), "--exclude-split", str(split)])
    images, labels, excluded = script.training_images(args)
    full = script.read_idx(fake_mnist / "train-images-idx3-ubyte.gz")
    assert excluded == 2 and len(images) == 58  # test_ names index the test set: not excluded
    kept = [i for i in range(60) if i not in (3, 17)]
    assert np.array_equal(images, full[kept])
    assert labels.tolist() == [i % 10 for i in kept]


def test_preprocessing_is_the_extractors_clean_view(script: ModuleType) -> None:
    """Training inputs equal, bit for bit, what extraction feeds the model for the same image."""
    from PIL import Image
    from shipyard.pipeline.identity import Preprocess

    rng = np.random.default_rng(1)
    grey = rng.integers(0, 256, size=(3, 28, 28)).astype(np.uint8)
    pre = Preprocess(size=64, mean=(0.48145466, 0.4578275, 0.40821073),
                     std=(0.26862954, 0.26130258, 0.27577711), interpolation="bicubic",
                     resize_mode="shortest")
    ours = script.normalise(script.preprocess_grey(grey, 64), torch.tensor(pre.mean), torch.tensor(pre.std))
    theirs = torch.stack([clean_view(Image.fromarray(g, mode="L").convert("RGB"), pre) for g in grey])
    assert torch.equal(ours, theirs)


def test_bad_arguments_are_one_line_errors(script: ModuleType, capsys: Any) -> None:
    with pytest.raises(SystemExit):
        script.parse_args(["--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_training_crops_are_seeded_boxes_inside_the_image_and_flip_half(script: ModuleType) -> None:
    grey = torch.zeros(400, 64, 64, dtype=torch.uint8)
    grey[:, :, :32] = 200  # bright left half
    crops = script.random_crops(grey, (1.0, 1.0), torch.Generator().manual_seed(3))
    again = script.random_crops(grey, (1.0, 1.0), torch.Generator().manual_seed(3))
    assert torch.equal(crops, again)
    # Border padding: values stay within the image's own (bilinear rounding aside).
    assert float(crops.min()) >= 0 and float(crops.max()) <= 200 + 1e-3
    # Full-area boxes keep both halves: the left column is bright unless the crop was flipped.
    left, right = crops[:, :, 0].mean(1) > 100, crops[:, :, -1].mean(1) > 100
    assert bool((left ^ right).all())
    assert 0.4 < float(left.float().mean()) < 0.6
    small = script.random_crops(grey, (0.1, 0.1), torch.Generator().manual_seed(3))
    # A tenth of the area, magnified: many crops fall inside one half and come out uniform.
    uniform = (small.amax((1, 2)) - small.amin((1, 2))) < 1
    assert 0.2 < float(uniform.float().mean()) < 0.9


def test_a_described_checkpoint_gets_its_description_as_a_note(tmp_path: Path) -> None:
    from safetensors.torch import save_file
    from shipyard.pipeline.identity import checkpoint_description, model_notes

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"description": "a model of socks"})
    assert model_notes(ModelSpec(name="shipyard-tiny", pretrained=str(path))) == ["model: a model of socks"]
    save_file({"w": torch.zeros(2)}, str(path))  # no description: no note
    assert model_notes(ModelSpec(name="shipyard-tiny", pretrained=str(path))) == []
    path.write_bytes(b"\xff" * 16)  # a damaged header: no note (loading the model reports it)
    assert checkpoint_description(str(path)) is None
    random = model_notes(ModelSpec(name="shipyard-tiny"))
    assert len(random) == 1 and "random weights" in random[0]
