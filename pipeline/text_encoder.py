"""Prompt-injected text encoding: learnable context vectors (plus an optional per-sample bias) are
spliced into `[SOS] X .. X {class}. [EOS]` and run through the frozen open_clip text tower, the
decoder of SHIP and the classifier of CoOp."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .models import ClipModel

PLACEHOLDER = "X"  # one token per context vector in the tokenized template


@dataclass(frozen=True)
class ClassPrompts:
    """Tokenized `X .. X {name}.` per class, embedded once and kept on the encoder's device."""

    names: tuple[str, ...]
    n_ctx: int  # number of placeholder tokens, right after SOS
    tokens: torch.Tensor  # (C, S) token ids, S = context length (77)
    embeddings: torch.Tensor  # (C, S, W) fp32 token embeddings; rows 1..n_ctx are placeholders
    eos: torch.Tensor  # (C,) position of the token whose feature is pooled (EOS)

    def __len__(self) -> int:
        return len(self.names)


def _fp32(part: Any) -> Any:
    """The part itself when already fp32 (weights shared with the CLIP model), else an fp32 copy."""
    if part is None:
        return None
    if isinstance(part, nn.Parameter):
        return part if part.dtype == torch.float32 else nn.Parameter(part.detach().float(), False)
    if all(p.dtype == torch.float32 for p in part.parameters()):
        return part
    return copy.deepcopy(part).float()


def _text_tower(model: Any) -> tuple[Any, str, int]:
    """(module holding the text parts, pool type, EOS id): `open_clip.CLIP` keeps the parts on
    itself, `CustomTextCLIP` in `model.text` (a TextTransformer)."""
    if hasattr(model, "token_embedding"):
        tower, pool, eos_id = model, model.text_pool_type, getattr(model, "text_eos_id", -1)
    elif hasattr(getattr(model, "text", None), "token_embedding"):
        tower = model.text
        pool, eos_id = tower.pool_type, getattr(tower, "eos_id", -1)
    else:
        raise UsageError(f"{type(model).__name__}: no open_clip text transformer to inject into")
    if getattr(tower, "cls_emb", None) is not None:
        raise UsageError("text towers with an appended CLS token (CoCa) are not supported")
    if getattr(tower, "attn_mask", None) is None:
        # The EOS feature may then depend on later tokens: truncation would change it.
        raise UsageError("prompt injection needs a causal text transformer")
    if pool not in ("argmax", "eos"):
        raise UsageError(f"text pool type {pool!r}: only 'argmax' and 'eos' pool at the EOS token")
    return tower, str(pool), int(eos_id)


class PromptEncoder(nn.Module):
    """Frozen open_clip text tower, fp32, that reads learnable context vectors in place of the
    placeholder tokens. It has no trainable parameters: context and bias are inputs.

    `length_groups` > 1 sorts each batch by prompt length and encodes that many groups, each cut
    after its own last EOS: fewer padded tokens (1.45x fewer for the benchmark's mix of names,
    4 groups), at the price of more and smaller kernel launches (for CPU rather than GPU)."""

    attn_mask: torch.Tensor  # (S, S) additive causal mask

    def __init__(self, model: nn.Module, tokenizer: Any, length_groups: int = 1) -> None:
        super().__init__()
        if length_groups < 1:
            raise UsageError(f"length_groups must be >= 1, got {length_groups}")
        self.length_groups = length_groups
        tower, self.pool_type, self.eos_id = _text_tower(model)
        self.tokenizer = tokenizer
        self.token_embedding = _fp32(tower.token_embedding)
        self.positional_embedding = _fp32(tower.positional_embedding)  # (S, W)
        self.transformer = _fp32(tower.transformer)
        self.ln_final = _fp32(tower.ln_final)
        self.text_projection = _fp32(tower.text_projection)  # (W, D) Parameter, Linear or None
        self.register_buffer("attn_mask", tower.attn_mask.float(), persistent=False)  # (S, S)
        self.requires_grad_(False)
        self.eval()
        self.width = int(self.positional_embedding.shape[1])  # W
        probe = self._project(torch.zeros(1, self.width, device=self.attn_mask.device))
        self.embed_dim = int(probe.shape[1])  # D

    @classmethod
    def from_clip(cls, clip: ClipModel, length_groups: int = 1) -> PromptEncoder:
        return cls(clip.model, clip.tokenizer, length_groups)

    @property
    def device(self) -> torch.device:
        return self.positional_embedding.device

    def train(self, mode: bool = True) -> PromptEncoder:
        """Always eval: the tower is frozen, whatever mode the module that holds it is in."""
        return super().train(False)

    @torch.no_grad()
    def class_prompts(self, names: Sequence[str], n_ctx: int = 4) -> ClassPrompts:
        """Tokenize and embed `X .. X {name}.` (n_ctx X's) once per class; `_` reads as a space."""
        names = tuple(names)
        template = " ".join([PLACEHOLDER] * n_ctx)
        texts = [f"{template} {name.replace('_', ' ')}." for name in names]
        tokens = self.tokenizer(texts).to(self.device)  # (C, S)
        if tokens.shape[1] != self.positional_embedding.shape[0]:
            raise UsageError(f"tokenizer length {tokens.shape[1]} != text context length "
                             f"{self.positional_embedding.shape[0]}")
        placeholders = tokens[:, 1 : 1 + n_ctx]  # (C, n)
        if n_ctx < 1 or not bool((placeholders == placeholders[0, 0]).all()):
            raise UsageError(f"the tokenizer does not give one token per {PLACEHOLDER!r}")
        embeddings = self.token_embedding(tokens).float()  # (C, S, W)
        return ClassPrompts(names, n_ctx, tokens, embeddings, self._eos_positions(tokens))

    @torch.no_grad()
    def context_from_text(self, text: str) -> torch.Tensor:
        """(n, W) token embeddings of `text` between SOS and EOS, e.g. CoOp's `a photo of a`."""
        tokens = self.tokenizer([text]).to(self.device)  # (1, S)
        eos = int(self._eos_positions(tokens)[0])
        return self.token_embedding(tokens[0, 1:eos]).float().clone()  # (n, W)

    def forward(self, ctx: torch.Tensor, labels: torch.Tensor, prompts: ClassPrompts,
                bias: torch.Tensor | None = None, *, truncate: bool = True,
                deep: torch.Tensor | None = None) -> torch.Tensor:
        """ctx (n, W) shared or (B, n, W) per sample, bias (B, W) added to every context vector,
        labels (B,) class indices -> (B, D) L2-normalized text features.

        `deep` (L, n, W), deep prompts (SYNC-CLIP's and MaPLe's independent text prompts): block
        i = 1..L of the transformer reads deep[i - 1] in place of the n context tokens' outputs
        of the block before it; later blocks read what came before. L < the tower's depth.

        With `truncate`, the sequence is cut after the batch's (or group's) last EOS: the tower
        is causal, so the pooled features are those of the full length, for a fraction of the
        compute. Without it, all S = 77 positions are encoded, as open_clip does."""
        if labels.numel() == 0:
            return prompts.embeddings.new_zeros(0, self.embed_dim)
        if not truncate or self.length_groups == 1:
            return self._encode(ctx, labels, prompts, bias, truncate, deep)
        order = prompts.eos[labels].argsort()  # (B,) shortest prompts first
        parts = [self._encode(ctx if ctx.dim() == 2 else ctx[idx], labels[idx], prompts,
                              None if bias is None else bias[idx], True, deep)
                 for idx in order.tensor_split(self.length_groups) if len(idx)]
        return torch.cat(parts)[order.argsort()]  # (B, D) back in input order

    def _encode(self, ctx: torch.Tensor, labels: torch.Tensor, prompts: ClassPrompts,
                bias: torch.Tensor | None, truncate: bool,
                deep: torch.Tensor | None = None) -> torch.Tensor:
        """One batch through the tower, cut after its last EOS if `truncate` -> (B, D)."""
        eos = prompts.eos[labels]  # (B,)
        length = int(eos.max()) + 1 if truncate else prompts.tokens.shape[1]
        x = self._splice(ctx, bias, prompts.embeddings[labels, :length], prompts.n_ctx)  # (B, L, W)
        x = x + self.positional_embedding[:length]  # (B, L, W) + (L, W)
        mask = self.attn_mask[:length, :length]
        x = self.transformer(x, attn_mask=mask) if deep is None else \
            self._deep(x, mask, deep, prompts.n_ctx)  # (B, L, W)
        # LayerNorm is per token, so pooling first and normalizing only the EOS rows is exact.
        pooled = x[torch.arange(x.shape[0], device=x.device), eos]  # (B, W)
        return F.normalize(self._project(self.ln_final(pooled)), dim=-1)  # (B, D)

    @property
    def layers(self) -> int:
        return len(self.transformer.resblocks)

    def _deep(self, x: torch.Tensor, mask: torch.Tensor, deep: torch.Tensor,
              n_ctx: int) -> torch.Tensor:
        """The transformer block by block, rows 1..n_ctx replaced by deep[i - 1] before block i
        (1 <= i <= L): (B, L, W) -> (B, L, W)."""
        blocks = self.transformer.resblocks
        if deep.dim() != 3 or deep.shape[1:] != (n_ctx, self.width) or len(deep) >= len(blocks):
            raise ValueError(f"deep prompts of shape {tuple(deep.shape)}: expected (L, {n_ctx}, "
                             f"{self.width}) with L < {len(blocks)} blocks")
        if not getattr(self.transformer, "batch_first", True):
            raise UsageError("deep text prompts need a batch-first transformer (open_clip 3)")
        for i, block in enumerate(blocks):  # (B, L, W)
            if 0 < i <= len(deep):
                tokens = deep[i - 1].to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
                x = torch.cat([x[:, :1], tokens, x[:, 1 + n_ctx :]], dim=1)
            x = block(x, attn_mask=mask)
        return x

    def _splice(self, ctx: torch.Tensor, bias: torch.Tensor | None, embeddings: torch.Tensor,
                n_ctx: int) -> torch.Tensor:
        """Replace rows 1..n_ctx of embeddings (B, L, W) by the context (+ bias) -> (B, L, W)."""
        batch = embeddings.shape[0]
        if ctx.shape[-2:] != (n_ctx, self.width):
            raise ValueError(f"ctx of shape {tuple(ctx.shape)}: expected (..., {n_ctx}, "
                             f"{self.width})")
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(batch, -1, -1)  # (n, W) -> (B, n, W)
        if bias is not None:
            ctx = ctx + bias.unsqueeze(1)  # (B, n, W) + (B, 1, W)
        sos, rest = embeddings[:, :1], embeddings[:, 1 + n_ctx :]  # (B, 1, W), (B, L-1-n, W)
        return torch.cat([sos, ctx.to(embeddings.dtype), rest], dim=1)  # (B, L, W)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        """(B, W) -> (B, D) through the text projection, in whichever form the model has it."""
        if self.text_projection is None:
            return x
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x @ self.text_projection  # (B, W) @ (W, D)

    def _eos_positions(self, tokens: torch.Tensor) -> torch.Tensor:
        """(C, S) token ids -> (C,) pooled positions, found as open_clip's `text_global_pool`."""
        if self.pool_type == "argmax":
            return tokens.argmax(dim=-1)  # the EOT token has the highest id
        return tokens.eq(self.eos_id).int().argmax(dim=-1)  # first EOS
