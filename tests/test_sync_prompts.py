"""The paper's SYNC-CLIP, its model and loop: the prompted towers place their tokens where the
public code does (checked against open_clip's own forward with hooks), the synthetic-specific
tokens touch synthetic images only, each loss reaches the prompts it should, a resumed training
ends bit-equal to an uninterrupted one, and crops are seeded per image. The stages:
test_sync_clip_prompted.py."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
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

from tests.test_sync_clip_fs import NAMES

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


@pytest.mark.parametrize("pool", ["avg", "avg-after-ln"])
def test_other_open_clip_poolings_match_encode_image_without_prompts(
        clip: ClipModel, pool: str, one_thread: None) -> None:
    visual = copy.deepcopy(clip.model.visual)
    visual.pool_type = "avg"
    visual.final_ln_after_pool = pool == "avg-after-ln"
    vision, x = PromptedVision(visual), _images(2)
    with torch.no_grad():
        torch.testing.assert_close(vision(x, torch.zeros(1, 0, vision.width)), visual(x),
                                   rtol=0, atol=1e-6)
        # With prompts, the mean is over the patches alone: the prompts are never pooled.
        prompts = torch.randn(2, 4, vision.width, generator=torch.Generator().manual_seed(1))
        seq: list[torch.Tensor] = []
        handle = visual.ln_post.register_forward_hook(lambda _m, _a, out: seq.append(out))
        try:
            got = vision(x, prompts)
        finally:
            handle.remove()
        grid = x.shape[-1] // visual.conv1.kernel_size[0]
        if pool == "avg":  # ln_post ran on the whole sequence; pool its patch rows
            want = seq[0][:, 1 : 1 + grid * grid].mean(dim=1) @ visual.proj
        else:  # ln_post ran on the pooled rows
            want = seq[0] @ visual.proj
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_towers_it_cannot_prompt_are_refused_in_one_line(clip: ClipModel) -> None:
    from shipyard.pipeline.errors import UsageError

    with pytest.raises(UsageError, match="need an open_clip ViT image tower"):
        PromptedVision(torch.nn.Linear(2, 2))
    visual = copy.deepcopy(clip.model.visual)
    visual.pool_type = "none"
    with pytest.raises(UsageError, match="pool type 'none' is not supported"):
        PromptedVision(visual)
    visual.pool_type, visual.attn_pool = "tok", torch.nn.Identity()
    with pytest.raises(UsageError, match="attentional pooling"):
        PromptedVision(visual)
    vision = PromptedVision(clip.model.visual)
    with pytest.raises(ValueError, match=r"expected \(L, n, 64\) with 1 <= L <= 2"):
        vision(_images(1), torch.zeros(3, 4, 64))
    with pytest.raises(ValueError, match="synthetic prompts of shape"):
        vision(_images(1), torch.zeros(2, 4, 64), torch.zeros(2, 5, 64))


def test_eval_caches_the_class_features_until_it_trains_again(clip: ClipModel,
                                                               encoder: PromptEncoder) -> None:
    head = _head(clip, encoder).eval()
    first = head.text()
    with torch.no_grad():
        head.ctx.add_(torch.randn(head.ctx.shape, generator=torch.Generator().manual_seed(2)))
    assert head.text() is first  # cached while evaluating
    head.train()
    assert not torch.allclose(head.text(), first, atol=1e-4)  # recomputed from the prompts
    with pytest.raises(Exception, match="has 2 tokens, n_ctx is 4"):
        SyncClip(encoder, PromptedVision(clip.model.visual), NAMES,
                 HeadConfig(ctx_init="a photo"), PromptDesign())


def test_the_warm_up_epoch_trains_at_1e_5(clip: ClipModel, encoder: PromptEncoder,
                                          one_thread: None) -> None:
    def moved(warmup: int) -> float:
        cfg = HeadConfig(epochs=2, batch_size=4, lr=0.5, warmup_epochs=warmup, weight_decay=0.0)
        keep: list[Checkpoint] = []
        head = _head(clip, encoder, seed=3)
        start = head.vision_prompts.detach().clone()
        train_prompted(head, _data(clip.preprocess), 5, [5, 6, 7, 8, 9], cfg, SyncWeights(),
                       on_epoch=lambda c: keep.append(copy.deepcopy(c)))
        return float((keep[0].model["vision_prompts"] - start).abs().max())

    assert moved(1) < 1e-3 < moved(0)  # 1e-5 for the first epoch, else 0.5 at once


def test_each_step_draws_the_paired_then_new_class_synthetic_images(
        clip: ClipModel, encoder: PromptEncoder, monkeypatch: pytest.MonkeyPatch,
        one_thread: None) -> None:
    pre = clip.preprocess
    data = _data(pre)
    # Every image is flat, of value 10 * its label: its pixels (any crop of them) say its class.
    labels = data.synthetic_labels
    flat = (10 * labels).to(torch.uint8)[:, None, None, None].expand_as(data.synthetic).clone()
    real = [Image.new("RGB", (40 + i % 3, 48), (10 * int(c),) * 3)
            for i, c in enumerate(data.real.labels)]
    data = SyncImages(ImageRows(tuple(real), data.real.keys, data.real.labels), flat, labels, pre)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    real_encode = SyncClip.encode_both

    def spy(self: SyncClip, real: torch.Tensor, syn: torch.Tensor) -> Any:
        seen.append((real.detach().clone(), syn.detach().clone()))
        return real_encode(self, real, syn)

    monkeypatch.setattr(SyncClip, "encode_both", spy)
    cfg = HeadConfig(epochs=2, batch_size=4, warmup_epochs=0)
    train_prompted(_head(clip, encoder), data, 5, [5, 6, 7, 8, 9], cfg, SyncWeights())
    assert len(seen) == 2 * 2  # 10 shots, batch 4, the last partial batch dropped: 2 per epoch
    mean = torch.tensor(pre.mean).view(1, 3, 1, 1)
    std = torch.tensor(pre.std).view(1, 3, 1, 1)
    def classes(x: torch.Tensor) -> list[int]:
        return ((x * std + mean) * 255 / 10).round().long()[:, 0, 0, 0].tolist()

    second_halves = []
    for real_x, syn in seen:
        assert real_x.shape[0] == 4 and syn.shape[0] == 8
        assert classes(syn)[:4] == classes(real_x)  # paired: the real batch's labels, in order
        second_halves += classes(syn)[4:]
        assert all(5 <= c <= 9 for c in classes(syn)[4:])  # then new classes only
    assert len(set(second_halves)) > 1  # drawn, not one fixed class


def test_tok_pooling_after_the_final_norm_reads_the_class_token(clip: ClipModel,
                                                                 one_thread: None) -> None:
    visual = copy.deepcopy(clip.model.visual)
    visual.final_ln_after_pool = True  # tok pooling, ln_post on the pooled [CLS] row
    vision, x = PromptedVision(visual), _images(2)
    prompts = torch.randn(2, 4, vision.width, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(vision(x, torch.zeros(1, 0, vision.width)), visual(x),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(vision(x, prompts), _hooked_vision(clip, x, list(prompts)),
                                   rtol=0, atol=1e-5)


def test_the_head_scores_unit_features_at_scale_100_and_its_tower_stays_frozen(
        clip: ClipModel, encoder: PromptEncoder) -> None:
    head = _head(clip, encoder).train()
    assert not head.vision.visual.training  # the frozen tower is outside it: never in training
    head.eval()
    g = torch.Generator().manual_seed(6)
    f = torch.nn.functional.normalize(torch.randn(3, encoder.embed_dim, generator=g), dim=-1)
    text = head.text()
    torch.testing.assert_close(head(f), 100.0 * f @ text.T)
    raw = f * torch.tensor([[2.0], [5.0], [0.5]])  # logits read the direction, row by row
    torch.testing.assert_close(head.logits(raw, text), 100.0 * f @ text.T, rtol=0, atol=1e-4)


def test_a_shorter_context_builds_prompts_of_its_own_length(clip: ClipModel,
                                                            encoder: PromptEncoder) -> None:
    cfg = HeadConfig(n_ctx=2, ctx_init="a photo")
    head = SyncClip(encoder, PromptedVision(clip.model.visual), NAMES, cfg, PromptDesign())
    assert head.prompts.n_ctx == 2 and head.text_deep.shape == (1, 2, encoder.width)
    assert head.eval().text().shape == (len(NAMES), encoder.embed_dim)
