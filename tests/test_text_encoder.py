"""Prompt-injected text encoding: truncated against full length, and against open_clip itself."""

from __future__ import annotations

import copy

import open_clip
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shipyard.pipeline.errors import UsageError
from shipyard.pipeline.models import ClipModel
from shipyard.pipeline.text_encoder import PromptEncoder

NAMES = ["cat", "golden retriever puppy",
         "greater spotted woodpecker perched on a snowy birch branch in the northern boreal forest"]
LABELS = torch.tensor([0, 1, 2, 1, 0, 2, 2])
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def _ctx_and_bias(encoder: PromptEncoder, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randn(4, encoder.width, generator=gen).requires_grad_(True)
    bias = (0.1 * torch.randn(batch, encoder.width, generator=gen)).requires_grad_(True)
    return ctx, bias


def test_class_names_have_different_token_lengths(encoder: PromptEncoder) -> None:
    prompts = encoder.class_prompts(NAMES)
    assert len(set(prompts.eos.tolist())) == len(NAMES)
    assert int(prompts.eos.max()) + 1 < prompts.tokens.shape[1]  # truncation actually cuts


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("length_groups", [1, 3])
def test_truncated_equals_full_length_forward_and_gradients(clip: ClipModel, with_bias: bool,
                                                            length_groups: int) -> None:
    encoder = PromptEncoder.from_clip(clip, length_groups=length_groups)
    prompts = encoder.class_prompts(NAMES)
    gen = torch.Generator().manual_seed(1)
    weights = torch.randn(len(LABELS), encoder.embed_dim, generator=gen)
    results = []
    for truncate in (True, False):
        ctx, bias = _ctx_and_bias(encoder, len(LABELS))
        out = encoder(ctx, LABELS, prompts, bias if with_bias else None, truncate=truncate)
        (out * weights).sum().backward()
        results.append((out.detach(), ctx.grad, bias.grad))
    (out_t, ctx_t, bias_t), (out_f, ctx_f, bias_f) = results
    assert (out_t - out_f).abs().max() <= TOL
    assert ctx_t is not None and ctx_f is not None
    assert (ctx_t - ctx_f).abs().max() <= TOL
    assert ctx_t.abs().max() > 0
    if with_bias:
        assert bias_t is not None and bias_f is not None
        assert (bias_t - bias_f).abs().max() <= TOL
        assert bias_t.abs().max() > 0
    else:
        assert bias_t is None and bias_f is None


def test_length_groups_keep_per_sample_context_in_input_order(clip: ClipModel) -> None:
    grouped = PromptEncoder.from_clip(clip, length_groups=4)  # more groups than lengths
    single = PromptEncoder.from_clip(clip)
    prompts = single.class_prompts(NAMES)
    ctx = torch.randn(len(LABELS), 4, single.width, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = single(ctx, LABELS, prompts)
        assert (grouped(ctx, LABELS, prompts) - expected).abs().max() <= TOL
        assert (grouped(ctx[:1], LABELS[:1], prompts) - expected[:1]).abs().max() <= TOL


def _open_clip_reference(model: torch.nn.Module, tokenizer: object) -> torch.Tensor:
    texts = [f"a photo of a {name}." for name in NAMES]
    with torch.no_grad():
        return model.encode_text(tokenizer(texts), normalize=True)  # type: ignore[operator]


def test_a_photo_of_a_reproduces_open_clip_encode_text(clip: ClipModel,
                                                       encoder: PromptEncoder) -> None:
    ctx = encoder.context_from_text("a photo of a")
    assert ctx.shape == (4, clip.text_width)
    with torch.no_grad():
        ours = encoder(ctx, torch.arange(len(NAMES)), encoder.class_prompts(NAMES))
    assert (ours - _open_clip_reference(clip.model, clip.tokenizer)).abs().max() <= TOL


def test_custom_text_clip_reproduces_open_clip_encode_text(clip: ClipModel) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model("shipyard-tiny", force_custom_text=True).eval()
    assert isinstance(model, open_clip.CustomTextCLIP)
    encoder = PromptEncoder(model, clip.tokenizer)
    with torch.no_grad():
        ours = encoder(encoder.context_from_text("a photo of a"), torch.arange(len(NAMES)),
                       encoder.class_prompts(NAMES))
    assert (ours - _open_clip_reference(model, clip.tokenizer)).abs().max() <= TOL


def test_clip_weights_get_no_gradient_and_output_is_unit_norm(clip: ClipModel,
                                                             encoder: PromptEncoder) -> None:
    prompts = encoder.class_prompts(NAMES)
    ctx, bias = _ctx_and_bias(encoder, len(LABELS))
    out = encoder(ctx, LABELS, prompts, bias)
    out.sum().backward()
    assert all(p.grad is None for p in clip.model.parameters())
    assert all(not p.requires_grad for p in encoder.parameters())
    assert ctx.grad is not None and bias.grad is not None
    assert torch.allclose(out.norm(dim=-1), torch.ones(len(LABELS)), atol=1e-6)


def test_shapes_come_from_the_model(clip: ClipModel, encoder: PromptEncoder) -> None:
    assert (encoder.width, encoder.embed_dim) == (clip.text_width, clip.embed_dim)
    prompts = encoder.class_prompts(NAMES, n_ctx=3)
    context_length = clip.model.positional_embedding.shape[0]
    assert prompts.tokens.shape == (len(NAMES), context_length)
    assert prompts.embeddings.shape == (len(NAMES), context_length, clip.text_width)
    ctx = torch.randn(3, clip.text_width)
    assert encoder(ctx, LABELS, prompts).shape == (len(LABELS), clip.embed_dim)
    with pytest.raises(ValueError, match="ctx of shape"):
        encoder(torch.randn(4, clip.text_width), LABELS, prompts)


def test_per_sample_context_equals_shared_context(encoder: PromptEncoder) -> None:
    prompts = encoder.class_prompts(NAMES)
    ctx, bias = _ctx_and_bias(encoder, len(LABELS))
    with torch.no_grad():
        shared = encoder(ctx, LABELS, prompts, bias)
        per_sample = encoder(ctx.expand(len(LABELS), -1, -1) + bias[:, None], LABELS, prompts)
    assert (shared - per_sample).abs().max() <= TOL


def test_encoder_stays_in_eval_mode(encoder: PromptEncoder) -> None:
    encoder.train()
    assert not any(m.training for m in encoder.modules())


def test_half_precision_model_is_encoded_in_fp32(clip: ClipModel, encoder: PromptEncoder) -> None:
    half = copy.deepcopy(clip.model).half()
    encoder16 = PromptEncoder(half, clip.tokenizer)
    assert all(p.dtype == torch.float32 for p in encoder16.parameters())
    assert all(p.dtype == torch.float16 for p in half.parameters())  # the model is left alone
    prompts16 = encoder16.class_prompts(NAMES)
    assert prompts16.embeddings.dtype == torch.float32
    ctx16, ctx = encoder16.context_from_text("a photo of a"), encoder.context_from_text("a photo of a")
    with torch.no_grad():
        diff = encoder16(ctx16, LABELS, prompts16) - encoder(ctx, LABELS, encoder.class_prompts(NAMES))
    assert diff.abs().max() < 1e-2  # only the fp16 rounding of the weights differs


def test_empty_batch(encoder: PromptEncoder) -> None:
    prompts = encoder.class_prompts(NAMES)
    out = encoder(torch.zeros(4, encoder.width), torch.zeros(0, dtype=torch.long), prompts)
    assert out.shape == (0, encoder.embed_dim)


WORDS = ["cat", "sea", "otter", "golden", "retriever", "x-ray", "t-shirt", "ankle", "boot", "écru",
         "7", "of", "the", "north", "snowy", "birch", "branch"]


@settings(max_examples=20, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(st.lists(st.sampled_from(WORDS), min_size=1, max_size=14).map(" ".join),
                      min_size=1, max_size=4, unique=True),
       n_ctx=st.integers(1, 6), groups=st.integers(1, 4), batch=st.integers(1, 9),
       shared=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_truncated_encoding_equals_full_length_for_any_names(
        clip: ClipModel, names: list[str], n_ctx: int, groups: int, batch: int, shared: bool,
        seed: int) -> None:
    """Property: any class names, context length, batch, length groups, and shared or per-sample
    context: the features cut after the last EOS equal the 77-token ones."""
    encoder = PromptEncoder.from_clip(clip, length_groups=groups)
    prompts = encoder.class_prompts(names, n_ctx=n_ctx)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(names), (batch,), generator=g)
    ctx = torch.randn(*(() if shared else (batch,)), n_ctx, encoder.width, generator=g)
    with torch.no_grad():
        cut = encoder(ctx, labels, prompts, truncate=True)
        full = encoder(ctx, labels, prompts, truncate=False)
    assert cut.shape == (batch, encoder.embed_dim)
    assert (cut - full).abs().max() <= TOL


def _tiny(custom: bool, **text: object) -> torch.nn.Module:
    """The tiny test CLIP with some text-tower settings changed, as either open_clip class."""
    import json
    from pathlib import Path

    from open_clip.model import CLIP, CustomTextCLIP
    from shipyard.pipeline import models

    cfg = json.loads((Path(models.__file__).parent / "model_configs" / "shipyard-tiny.json")
                     .read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        klass = CustomTextCLIP if custom else CLIP
        return klass(cfg["embed_dim"], cfg["vision_cfg"], {**cfg["text_cfg"], **text}).eval()


EOS_POOL = {"pool_type": "eos", "eos_id": 49407}


@pytest.mark.parametrize(("custom", "text"), [
    (False, EOS_POOL), (True, EOS_POOL), (False, {"proj_type": "none"}),
    (True, {"proj_type": "none"}), (True, {"proj_bias": True})],  # only CustomTextCLIP: Linear
    ids=["eos-pool", "custom-eos-pool", "no-projection", "custom-no-projection",
         "custom-linear-projection"])
def test_other_text_towers_reproduce_open_clip_encode_text(clip: ClipModel, custom: bool,
                                                           text: dict[str, object]) -> None:
    """Pooling at the first EOS id (not the highest token id), no text projection, and a Linear
    projection, on open_clip's CLIP and CustomTextCLIP: features equal `encode_text`."""
    model = _tiny(custom, **text)
    encoder = PromptEncoder(model, clip.tokenizer)
    assert encoder.pool_type == text.get("pool_type", "argmax")
    with torch.no_grad():
        ours = encoder(encoder.context_from_text("a photo of a"), torch.arange(len(NAMES)),
                       encoder.class_prompts(NAMES))
    assert (ours - _open_clip_reference(model, clip.tokenizer)).abs().max() <= TOL


@pytest.mark.parametrize(("custom", "text", "message"), [
    (True, {"embed_cls": True}, r"^text towers with an appended CLS token \(CoCa\) are not supported$"),
    (False, {"no_causal_mask": True}, r"^prompt injection needs a causal text transformer$"),
    (True, {"no_causal_mask": True}, r"^prompt injection needs a causal text transformer$"),
    (False, {"pool_type": "first"}, r"^text pool type 'first': only 'argmax' and 'eos' pool at the "
                                    r"EOS token$"),
])
def test_text_towers_it_cannot_inject_into_are_refused(clip: ClipModel, custom: bool,
                                                      text: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        PromptEncoder(_tiny(custom, **text), clip.tokenizer)


def test_fewer_than_one_length_group_is_refused(clip: ClipModel) -> None:
    with pytest.raises(UsageError, match=r"^length_groups must be >= 1, got 0$"):
        PromptEncoder.from_clip(clip, length_groups=0)


def test_a_model_without_a_text_tower_is_refused_by_type(clip: ClipModel) -> None:
    with pytest.raises(UsageError, match=r"^Linear: no open_clip text transformer to inject into$"):
        PromptEncoder(torch.nn.Linear(2, 2), clip.tokenizer)


def test_fp32_weights_are_shared_and_nothing_is_trainable(clip: ClipModel) -> None:
    model = _tiny(False)
    assert all(p.requires_grad for p in model.parameters())
    encoder = PromptEncoder(model, clip.tokenizer)
    assert encoder.text_projection is model.text_projection  # shared, not copied
    assert encoder.transformer is model.transformer
    assert not any(p.requires_grad for p in encoder.parameters())
    assert "attn_mask" not in encoder.state_dict()  # derived from the model, never saved
    assert encoder.length_groups == 1 and PromptEncoder.from_clip(clip).length_groups == 1
    assert PromptEncoder.from_clip(clip, length_groups=3).length_groups == 3


@pytest.mark.parametrize(("groups", "truncate", "calls"), [
    (1, None, 1), (1, True, 1), (1, False, 1), (2, None, 2), (3, None, 3), (3, True, 3),
    (3, False, 1)])
def test_each_group_is_encoded_up_to_its_last_eos_by_default(
        clip: ClipModel, groups: int, truncate: bool | None, calls: int) -> None:
    """The sequence lengths the transformer sees: one pass cut after the batch's last EOS, or one
    pass per length group cut after each group's last EOS; 77 without truncation."""
    encoder = PromptEncoder.from_clip(clip, length_groups=groups)
    prompts = encoder.class_prompts(NAMES)
    lengths: list[int] = []
    hook = encoder.transformer.register_forward_pre_hook(lambda m, a: lengths.append(a[0].shape[1]))
    labels = torch.tensor([0, 0, 1, 2, 1, 0])  # by length: 0 0 0 | 1 1 | 2
    try:
        with torch.no_grad():
            kwargs = {} if truncate is None else {"truncate": truncate}
            encoder(torch.randn(4, encoder.width), labels, prompts, **kwargs)
    finally:
        hook.remove()
    eos = prompts.eos.tolist()
    if truncate is False:
        want = [prompts.tokens.shape[1]]
    elif groups == 1:
        want = [max(eos) + 1]
    elif groups == 2:
        want = [eos[0] + 1, eos[2] + 1]
    else:
        want = [eos[0] + 1, eos[1] + 1, eos[2] + 1]
    assert len(lengths) == calls and lengths == want


def test_context_of_another_dtype_is_cast_to_the_encoders(encoder: PromptEncoder) -> None:
    prompts = encoder.class_prompts(NAMES)
    ctx = torch.randn(4, encoder.width)
    with torch.no_grad():
        torch.testing.assert_close(encoder(ctx.double(), LABELS, prompts),
                                   encoder(ctx, LABELS, prompts))
