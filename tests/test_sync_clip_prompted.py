"""The paper's SYNC-CLIP (`--method sync-clip`): the prompted towers place their tokens where the
public code does (checked against open_clip's own forward with hooks), the synthetic-specific
tokens touch synthetic images only, each loss reaches the prompts it should, a resumed training
ends bit-equal to an uninterrupted one, and the stages train, resume and score it on images."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
import zarr.storage
from PIL import Image
from shipyard.pipeline.checkpoints import Checkpoint
from shipyard.pipeline.configs import HeadConfig, PromptDesign
from shipyard.pipeline.image_sets import ImageRows, clean_pixels, normalize, stack_crops
from shipyard.pipeline.models import ClipModel
from shipyard.pipeline.preprocess import clean_view
from shipyard.pipeline.sync_losses import SyncWeights
from shipyard.pipeline.sync_prompted import SyncImages, _losses, train_prompted
from shipyard.pipeline.sync_prompts import PromptedVision, SyncClip
from shipyard.pipeline.text_encoder import PromptEncoder

from tests.conftest import manifest_dict, write_manifest
from tests.test_sync_clip_fs import NAMES, _synthetic_folder, invoke

ROOT = Path(__file__).resolve().parent.parent


def _head(clip: ClipModel, encoder: PromptEncoder, design: PromptDesign | None = None,
          seed: int = 0) -> SyncClip:
    torch.manual_seed(seed)
    return SyncClip(encoder, PromptedVision(clip.model.visual), NAMES, HeadConfig(),
                    design or PromptDesign())


def _images(n: int, side: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def test_with_no_prompt_tokens_it_is_open_clips_encode_image(clip: ClipModel,
                                                             one_thread: None) -> None:
    vision = PromptedVision(clip.model.visual)
    x = _images(3)
    want = clip.model.encode_image(x, normalize=False)
    got = vision(x, torch.zeros(1, 0, vision.width))
    assert torch.equal(got, want)


def _hooked_vision(clip: ClipModel, x: torch.Tensor, layers: list[torch.Tensor]) -> torch.Tensor:
    """open_clip's own encode_image with the prompt tokens put in by hooks: appended to the
    sequence entering ln_pre (after the positional embedding), and in place of the last n
    tokens entering blocks 1..L-1."""
    visual, handles = clip.model.visual, []
    n = layers[0].shape[0]

    def append(_module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        (seq,) = args
        return (torch.cat([seq, layers[0].expand(seq.shape[0], -1, -1)], dim=1),)

    def replace(i: int) -> Any:
        def hook(_module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            seq = args[0]
            return (torch.cat([seq[:, :-n], layers[i].expand(seq.shape[0], -1, -1)], dim=1),
                    *args[1:])
        return hook

    handles.append(visual.ln_pre.register_forward_pre_hook(append))
    for i in range(1, len(layers)):
        handles.append(visual.transformer.resblocks[i].register_forward_pre_hook(replace(i)))
    try:
        return clip.model.encode_image(x, normalize=False)
    finally:
        for h in handles:
            h.remove()


def test_vision_prompts_sit_where_the_public_code_puts_them(clip: ClipModel, encoder: PromptEncoder,
                                                            one_thread: None) -> None:
    head, x = _head(clip, encoder), _images(2)
    shared, syn = head.vision_prompts.detach(), head.synthetic_prompts.detach()
    want_real = _hooked_vision(clip, x, list(shared))
    mixed = [torch.cat([syn[i], shared[i][2:]]) for i in range(len(shared))]  # first 2 replaced
    want_syn = _hooked_vision(clip, x, mixed)
    with torch.no_grad():
        torch.testing.assert_close(head.encode(x), want_real, rtol=0, atol=1e-5)
        torch.testing.assert_close(head.encode(x, synthetic=True), want_syn, rtol=0, atol=1e-5)
        assert not torch.allclose(head.encode(x), head.encode(x, synthetic=True), atol=1e-3)
        # One forward for both domains: the real rows first, then the synthetic ones.
        real, syn = head.encode_both(x[:1], x)
        torch.testing.assert_close(real, want_real[:1], rtol=0, atol=1e-5)
        torch.testing.assert_close(syn, want_syn, rtol=0, atol=1e-5)


def test_deep_text_prompts_replace_the_context_outputs_before_each_block(
        clip: ClipModel, encoder: PromptEncoder, one_thread: None) -> None:
    head = _head(clip, encoder)
    deep = head.text_deep.detach()
    assert deep.shape == (1, 4, encoder.width)  # the tiny model's 2 blocks: one deep layer

    def hook(_module: Any, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        seq = args[0]
        return (torch.cat([seq[:, :1], deep[0].expand(seq.shape[0], -1, -1), seq[:, 5:]], dim=1),
                *args[1:])

    labels = torch.arange(len(NAMES))
    with torch.no_grad():
        got = head.class_features()
        plain = encoder(head.ctx, labels, head.prompts)
        handle = encoder.transformer.resblocks[1].register_forward_pre_hook(hook)
        try:
            want = encoder(head.ctx, labels, head.prompts)
        finally:
            handle.remove()
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(got, plain, atol=1e-3)  # the deep prompts matter


def test_synthetic_tokens_change_synthetic_features_and_leave_real_ones(
        clip: ClipModel, encoder: PromptEncoder, one_thread: None) -> None:
    head, x = _head(clip, encoder), _images(2)
    g = torch.Generator().manual_seed(5)

    def nudge(t: torch.Tensor) -> None:  # random: every token is layer-normed, a shift is not seen
        t.add_(torch.randn(t.shape, generator=g))

    with torch.no_grad():
        real, syn = head.encode(x), head.encode(x, synthetic=True)
        nudge(head.synthetic_prompts)
        assert torch.equal(head.encode(x), real)
        moved = head.encode(x, synthetic=True)
        assert not torch.allclose(moved, syn, atol=1e-3)
        nudge(head.vision_prompts[:, :2])  # replaced for synthetic images: only real move
        assert torch.equal(head.encode(x, synthetic=True), moved)
        assert not torch.allclose(head.encode(x), real, atol=1e-3)
        real = head.encode(x)
        nudge(head.vision_prompts[:, 2:])  # the shared last two: both move
        assert not torch.allclose(head.encode(x), real, atol=1e-3)
        assert not torch.allclose(head.encode(x, synthetic=True), moved, atol=1e-3)


def test_prompt_depth_is_the_designs_capped_at_each_tower(clip: ClipModel, encoder: PromptEncoder,
                                                          one_thread: None) -> None:
    assert _head(clip, encoder).depths() == {"text": 2, "vision": 2}  # 9 asked, 2 blocks
    shallow = _head(clip, encoder, PromptDesign(depth=1))
    assert shallow.depths() == {"text": 1, "vision": 1}
    assert shallow.text_deep.shape[0] == 0 and shallow.vision_prompts.shape[0] == 1
    x = _images(2)
    with torch.no_grad():  # depth 1: the input prompts' outputs flow on through block 1
        want = _hooked_vision(clip, x, [shallow.vision_prompts[0]])
        torch.testing.assert_close(shallow.encode(x), want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="synthetic tokens 5"):
        PromptDesign(synthetic_tokens=5)


def _grads(head: SyncClip, which: int) -> set[str]:
    head.zero_grad(set_to_none=True)
    y = torch.tensor([0, 1, 2, 3])
    wanted = torch.tensor([0, 1, 2, 3, 5, 6, 7, 8])
    parts = _losses(head, _images(4, seed=1), _images(8, seed=2), y, wanted, n_base=5)
    parts[which].backward()
    return {n for n, p in head.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}


def test_each_loss_reaches_the_prompts_of_its_domains(clip: ClipModel, encoder: PromptEncoder,
                                                      one_thread: None) -> None:
    head = _head(clip, encoder).train()
    everything = {"ctx", "text_deep", "vision_prompts", "synthetic_prompts"}
    assert _grads(head, 0) == everything - {"synthetic_prompts"}  # L_real: real images only
    assert _grads(head, 1) == everything  # L_syn: synthetic images, all-class text
    # L_align compares image features: no text prompt, both domains (nothing detached).
    assert _grads(head, 2) == {"vision_prompts", "synthetic_prompts"}


def _data(pre: Any) -> SyncImages:
    g = np.random.default_rng(0)
    pictures = [Image.fromarray(g.integers(0, 255, (40 + i % 3, 48, 3), dtype=np.uint8))
                for i in range(30)]
    keys = np.stack([np.frombuffer(bytes([i]) * 32, np.uint8) for i in range(30)])
    real = ImageRows(tuple(pictures[:10]), keys[:10], torch.arange(5).repeat_interleave(2))
    syn = ImageRows(tuple(pictures[10:]), keys[10:], torch.arange(10).repeat_interleave(2))
    return SyncImages(real, stack_crops(syn, 0, 0, pre), syn.labels, pre)


def _trained(clip: ClipModel, encoder: PromptEncoder, epochs: int,
             resume: Checkpoint | None = None, keep: list[Checkpoint] | None = None) -> tuple[SyncClip, Any]:
    cfg = HeadConfig(epochs=epochs, batch_size=4, lr=0.01, warmup_epochs=1)
    head = _head(clip, encoder, seed=3)
    out = train_prompted(head, _data(clip.preprocess), 5, [5, 6, 7, 8, 9], cfg,
                         SyncWeights(weight=0.4, kl_weight=0.1), resume,
                         (lambda c: keep.append(copy.deepcopy(c))) if keep is not None else None)
    return head, out


def test_a_resumed_training_ends_bit_equal_to_an_uninterrupted_one(
        clip: ClipModel, encoder: PromptEncoder, one_thread: None) -> None:
    checkpoints: list[Checkpoint] = []
    clean, out = _trained(clip, encoder, 3, keep=checkpoints)
    assert [c.epoch for c in checkpoints] == [1, 2, 3]
    resumed, again = _trained(clip, encoder, 3, resume=checkpoints[0])
    for name, value in clean.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    strip = [{k: v for k, v in e.items() if k != "seconds"} for e in out["log"]]
    assert strip == [{k: v for k, v in e.items() if k != "seconds"} for e in again["log"]]
    first = out["log"][0]  # L = L_real + WEIGHT L_syn + KLWEIGHT L_align
    assert first["loss"] == pytest.approx(first["real"] + 0.4 * first["syn"] + 0.1 * first["align"],
                                          rel=1e-5)
    assert not torch.equal(clean.vision_prompts, _head(clip, encoder, seed=3).vision_prompts)


def test_crops_are_seeded_per_image_and_clean_pixels_match_the_extractors_view(
        clip: ClipModel) -> None:
    pre = clip.preprocess
    rows = _data(pre).real
    alone = stack_crops(rows, 7, 2, pre, index=[3])
    assert torch.equal(alone[0], stack_crops(rows, 7, 2, pre, index=[0, 3])[1])
    assert not torch.equal(alone, stack_crops(rows, 7, 3, pre, index=[3]))  # another epoch
    img = rows.images[0]
    got = normalize(clean_pixels(img, pre)[None], pre, torch.device("cpu"))[0]
    assert torch.equal(got, clean_view(img, pre))


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


CHILD = """
import sys, time
import shipyard.pipeline.checkpoints as checkpoints
real = checkpoints.save_checkpoint
def slow(group, state):
    real(group, state)
    time.sleep(0.3)
checkpoints.save_checkpoint = slow
from shipyard.pipeline.manifest_files import load_manifest
from tests.conftest import run_stage
run_stage(load_manifest(sys.argv[1]), "train-adapter", seeds=(1,), methods=("sync-clip",))
"""


def _checkpoint_epoch(store: Path) -> int:
    # Polling races the writer by design: zarr warns about its in-flight temporary files.
    warnings.filterwarnings("ignore", message=".*partial is not recognized", category=UserWarning)
    try:
        root = zarr.open_group(zarr.storage.LocalStore(store, read_only=True), mode="r")
        for key in root["adapters"].group_keys():
            name = root[f"adapters/{key}"].attrs.get("checkpoint")
            return int(str(name).removeprefix("checkpoint_")) if name else 0
    except Exception:  # not created yet: keep polling
        return 0
    return 0


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
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(killed)], env=env, cwd=ROOT)
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
