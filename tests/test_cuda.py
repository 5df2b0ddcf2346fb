"""The CUDA tier: the whole pipeline on a GPU agrees with the CPU, and fp16 extraction stays
close to fp32. Skipped where there is no CUDA device; `bench/gpu.sh` runs these on a lent GPU
machine. Tolerances: features within cosine 0.999 (fp32) or 0.99 (fp16) of the CPU's; trained
heads' B/N within 10 points (a few test images of the small demo flip between devices)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from shipyard.cli import app
from typer.testing import CliRunner

from tests.conftest import manifest_dict, write_manifest
from tests.test_sync_clip_fs import _synthetic_folder

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

METHODS = ["zero-shot", "linear-probe", "clip-adapter", "coop", "coop+ship", "tip-adapter",
           "tip-adapter-f", "tip-adapter-f+ship", "sync-clip-fs", "sync-clip-fs+ship", "sync-clip"]
FAST = {"coop": {"epochs": 5}, "tip-adapter-f": {"epochs": 5}, "clip-adapter": {"epochs": 5},
        "sync-clip-fs": {"epochs": 2}, "sync-clip": {"epochs": 3}}


def _run(tmp_path: Path, small_demo: Path, device: str, **model: Any) -> dict[str, Any]:
    data = manifest_dict(small_demo, tmp_path / f"{device}.zarr")
    data["model"].update(model)
    data["datasets"][0]["seeds"] = [1]
    data["ship"] = {"epochs": 3, "synthesize": {"per_class": 4}}
    data["heads"] = {"methods": METHODS, "overrides": FAST}
    # SYNC-CLIP's synthetic domain; sync-clip trains its prompts under CUDA autocast.
    folder = tmp_path / "syn" if (tmp_path / "syn").is_dir() else _synthetic_folder(tmp_path)
    data["datasets"].append({"name": "demo-syn", "format": "imagefolder", "domain": "synthetic",
                             "pairs_with": "demo", "root": str(folder)})
    path = write_manifest(tmp_path / f"{device}.yaml", data)
    result = CliRunner().invoke(app, ["--manifest", str(path), "--device", device, "run", "--json"])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def _features(store: Path) -> np.ndarray:
    root = zarr.open_group(zarr.storage.LocalStore(store), mode="r")
    fp = next(iter(root["extractors"].group_keys()))
    images = root[f"extractors/{fp}/images"]
    rows = int(images.attrs["rows"])  # type: ignore[arg-type]
    return np.asarray(images["features"][:rows], dtype=np.float32)  # type: ignore[index]


def test_the_pipeline_on_cuda_agrees_with_the_cpu(tmp_path: Path, small_demo: Path) -> None:
    cpu = _run(tmp_path, small_demo, "cpu")
    cuda = _run(tmp_path, small_demo, "cuda")
    a, b = _features(tmp_path / "cpu.zarr"), _features(tmp_path / "cuda.zarr")
    assert a.shape == b.shape
    assert float((a * b).sum(1).min()) > 0.999
    rows = {r["method"]: r for r in cpu["stages"]["evaluate"]["datasets"][0]["table"]}
    for r in cuda["stages"]["evaluate"]["datasets"][0]["table"]:
        for metric in ("base", "new"):
            assert abs(r[metric] - rows[r["method"]][metric]) <= 10.0, (r["method"], metric)


def test_fp16_extraction_on_cuda_stays_close_to_fp32(tmp_path: Path, small_demo: Path) -> None:
    data = manifest_dict(small_demo, tmp_path / "fp16.zarr")
    data["model"]["precision"] = "fp16"
    path = write_manifest(tmp_path / "fp16.yaml", data)
    result = CliRunner().invoke(app, ["--manifest", str(path), "--device", "cuda", "extract", "--json"])
    assert result.exit_code == 0, result.output
    ref = write_manifest(tmp_path / "fp32.yaml", manifest_dict(small_demo, tmp_path / "fp32.zarr"))
    result = CliRunner().invoke(app, ["--manifest", str(ref), "--device", "cpu", "extract", "--json"])
    assert result.exit_code == 0, result.output
    a, b = _features(tmp_path / "fp16.zarr"), _features(tmp_path / "fp32.zarr")
    assert float((a * b).sum(1).min()) > 0.99


def test_tip_adapter_caches_on_cuda_give_the_cpu_logits() -> None:
    """Dense, FAISS flat (on the GPU with faiss-gpu) and the classes index score on CUDA tensors
    and agree with the CPU: logits within 1e-3, every argmax the same."""
    from shipyard.pipeline.cache_index import CacheIndex, cache_logits
    from shipyard.pipeline.class_index import ClassIndex
    from shipyard.pipeline.tip import tip_logits_blocked

    g = torch.Generator().manual_seed(0)
    n, c, d = 20_000, 50, 64
    labels = torch.arange(n) % c
    centres = torch.nn.functional.normalize(torch.randn(c, d, generator=g), dim=1)
    keys = torch.nn.functional.normalize(centres[labels] + 0.8 * torch.randn(n, d, generator=g), dim=1)
    text = torch.nn.functional.normalize(centres + 0.5 * torch.randn(c, d, generator=g), dim=1)
    q = torch.nn.functional.normalize(centres[labels[:300]] + 0.8 * torch.randn(300, d, generator=g), dim=1)
    cpu = tip_logits_blocked(q, keys, labels, text, 1.0, 5.0)
    flat = CacheIndex.build(keys.numpy(), "flat")
    classes = ClassIndex.build(keys.cuda(), labels.cuda(), c)
    got = {"dense": tip_logits_blocked(q.cuda(), keys.cuda(), labels.cuda(), text.cuda(), 1.0, 5.0),
           "flat": cache_logits(flat, q.cuda(), labels.cuda(), text.cuda(), 1.0, 5.0),
           "classes": classes.logits(q.cuda(), text.cuda(), 1.0, 5.0, c)}
    for name, logits in got.items():
        assert logits.device.type == "cuda", name
        torch.testing.assert_close(logits.cpu(), cpu, atol=1e-3, rtol=1e-4, msg=name)
        assert torch.equal(logits.argmax(1).cpu(), cpu.argmax(1)), name
