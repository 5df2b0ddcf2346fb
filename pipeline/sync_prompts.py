"""SYNC-CLIP's prompted CLIP (the paper's method, METHODS.md section SYNC-CLIP): independent
vision-language deep prompts over the frozen open_clip towers, as the public code has them.

- Text: the n context tokens of `[SOS] ctx {class}. [EOS]` start from `a photo of a`; blocks
  1..depth-1 of the text transformer replace them with their own n tokens (N(0, 0.02)).
- Vision: n prompt tokens are appended after [CLS] + patches, after the positional embedding
  and before `ln_pre`; blocks 1..depth-1 replace them with their own. Synthetic images replace
  the FIRST k of the n tokens, at the input and at every prompted block, by synthetic-specific
  ones; the last n - k stay shared. Real images (train and test) read the n shared tokens.

Every width and depth is read from the model: the prompt depth is capped at each tower's depth,
so the tiny test model (2 blocks) is prompted at both of its blocks. The towers stay frozen and
outside the state dict; only the prompts train and are stored.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .configs import HeadConfig, PromptDesign
from .errors import UsageError
from .heads import LOGIT_SCALE
from .identity import Preprocess
from .image_sets import normalize
from .text_encoder import PromptEncoder

PROMPT_STD = 0.02


def _vision_parts(visual: Any) -> Any:
    """The open_clip VisionTransformer, refused in one line when it is not one we can prompt."""
    needed = ("conv1", "class_embedding", "positional_embedding", "ln_pre", "transformer",
              "ln_post")
    if not all(hasattr(visual, name) for name in needed):
        raise UsageError(f"{type(visual).__name__}: SYNC-CLIP's visual prompts need an open_clip "
                         "ViT image tower (ResNet and timm towers have no token sequence)")
    if getattr(visual, "attn_pool", None) is not None:
        raise UsageError("SYNC-CLIP's visual prompts: ViTs with attentional pooling are not "
                         "supported")
    if getattr(visual, "pool_type", "tok") not in ("tok", "avg"):
        raise UsageError(f"SYNC-CLIP's visual prompts: pool type {visual.pool_type!r} is not "
                         "supported (tok or avg)")
    if not getattr(visual.transformer, "batch_first", True):
        raise UsageError("SYNC-CLIP's visual prompts need a batch-first transformer (open_clip 3)")
    return visual


class PromptedVision(nn.Module):
    """The frozen open_clip ViT reading prompt tokens: no trainable parameters of its own.

    `forward(images, shared, synthetic)`: images (B, 3, S, S); shared (L, n, W) the vision
    prompts of the input (row 0) and of blocks 1..L-1; synthetic (L, k, W) or None, replacing
    the first k tokens at every prompted layer, for the rows from `first_synthetic` on (the
    rows before it are real images: one forward serves both domains). Returns (B, D) raw
    features (before the L2 normalization), as `encode_image(normalize=False)`. With n = 0 it
    is `encode_image`."""

    visual: Any  # open_clip's VisionTransformer

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "visual", _vision_parts(visual))  # frozen weights, unregistered
        self.width = int(self.visual.positional_embedding.shape[-1])
        self.layers = len(self.visual.transformer.resblocks)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def forward(self, images: torch.Tensor, shared: torch.Tensor,
                synthetic: torch.Tensor | None = None, first_synthetic: int = 0) -> torch.Tensor:
        v = self.visual
        depth, n = int(shared.shape[0]), int(shared.shape[1])
        if shared.dim() != 3 or shared.shape[2] != self.width or not 1 <= depth <= self.layers:
            raise ValueError(f"vision prompts of shape {tuple(shared.shape)}: expected (L, n, "
                             f"{self.width}) with 1 <= L <= {self.layers}")
        if synthetic is not None and (synthetic.shape[0] != depth or synthetic.shape[1] > n):
            raise ValueError(f"synthetic prompts of shape {tuple(synthetic.shape)} for vision "
                             f"prompts {tuple(shared.shape)}")
        x = v.conv1(images.to(self.dtype))  # (B, W, g, g)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # (B, g*g, W)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)  # (B, 1+g*g, W)
        tokens = int(x.shape[1])
        split = first_synthetic if synthetic is not None else x.shape[0]
        x = v.ln_pre(torch.cat([x, self._layer(shared, synthetic, 0, x, split)], dim=1)) if n \
            else v.ln_pre(x)
        for i, block in enumerate(v.transformer.resblocks):  # batch first: (B, L, W)
            if n and 0 < i < depth:  # the previous layer's prompt outputs are replaced
                x = torch.cat([x[:, :tokens], self._layer(shared, synthetic, i, x, split)], dim=1)
            x = block(x)
        return self._pool(x, tokens)

    @staticmethod
    def _layer(shared: torch.Tensor, synthetic: torch.Tensor | None, i: int, x: torch.Tensor,
               split: int) -> torch.Tensor:
        """Layer i's prompt tokens for the batch: (B, n, W), the real tokens for rows before
        `split`, the synthetic ones (first k replaced) from it on."""
        real = shared[i].to(x.dtype).unsqueeze(0).expand(split, -1, -1)
        if synthetic is None or split == x.shape[0]:
            return real
        mixed = torch.cat([synthetic[i], shared[i][synthetic.shape[1] :]]).to(x.dtype)
        mixed = mixed.unsqueeze(0).expand(x.shape[0] - split, -1, -1)
        return torch.cat([real, mixed]) if split else mixed

    def _pool(self, x: torch.Tensor, tokens: int) -> torch.Tensor:
        """open_clip's pooling, over [CLS] + patches only (prompt tokens are never pooled)."""
        v = self.visual
        x = x[:, :tokens]
        if getattr(v, "final_ln_after_pool", False):
            pooled = v.ln_post(x[:, 0] if v.pool_type == "tok" else x[:, 1:].mean(dim=1))
        else:
            x = v.ln_post(x)
            pooled = x[:, 0] if getattr(v, "pool_type", "tok") == "tok" else x[:, 1:].mean(dim=1)
        return pooled @ v.proj if v.proj is not None else pooled


class SyncClip(nn.Module):
    """SYNC-CLIP's trainable prompts over a frozen CLIP. `encode(images, synthetic)` gives raw
    (B, D) image features through the real or the synthetic prompts; `text()` the (C, D) class
    features of every class through the deep text prompts; `forward(f)` scores unit features
    `f` from `encode` (real prompts) against them, at logit scale 100."""

    encoder: PromptEncoder
    vision: PromptedVision

    def __init__(self, text: PromptEncoder, vision: PromptedVision, classnames: tuple[str, ...],
                 cfg: HeadConfig, design: PromptDesign) -> None:
        super().__init__()
        object.__setattr__(self, "encoder", text)  # frozen towers stay out of the state dict
        object.__setattr__(self, "vision", vision)
        text_depth = min(design.depth, text.layers)
        self.vision_depth = min(design.depth, vision.layers)
        init = text.context_from_text(cfg.ctx_init)
        if init.shape[0] != cfg.n_ctx:
            raise UsageError(f"ctx_init {cfg.ctx_init!r} has {init.shape[0]} tokens, n_ctx is "
                             f"{cfg.n_ctx}")
        device = init.device
        self.ctx = nn.Parameter(init)  # (n, Wt) the text prompts of the input layer
        self.text_deep = nn.Parameter(_normal(text_depth - 1, cfg.n_ctx, text.width, device))
        self.vision_prompts = nn.Parameter(
            _normal(self.vision_depth, design.vision_tokens, vision.width, device))
        self.synthetic_prompts = nn.Parameter(
            _normal(self.vision_depth, design.synthetic_tokens, vision.width, device))
        self.prompts = text.class_prompts(classnames, cfg.n_ctx)
        self._frozen: torch.Tensor | None = None

    def depths(self) -> dict[str, int]:
        """The prompt depth each tower has (the design's, capped at the tower's blocks)."""
        return {"text": int(self.text_deep.shape[0]) + 1, "vision": self.vision_depth}

    def encode(self, images: torch.Tensor, synthetic: bool = False) -> torch.Tensor:
        """(B, 3, S, S) normalized images -> (B, D) raw features."""
        return self.vision(images, self.vision_prompts,
                           self.synthetic_prompts if synthetic else None)

    def encode_both(self, real: torch.Tensor, synthetic: torch.Tensor,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw features of real images (R, 3, S, S) through the real prompts and of synthetic
        ones (S', 3, S, S) through the synthetic prompts, in one forward of the tower."""
        both = torch.cat([real, synthetic])
        raw = self.vision(both, self.vision_prompts, self.synthetic_prompts, len(real))
        return raw[: len(real)], raw[len(real) :]

    def class_features(self) -> torch.Tensor:
        labels = torch.arange(len(self.prompts), device=self.ctx.device)
        deep = self.text_deep if self.text_deep.shape[0] else None
        return self.encoder(self.ctx, labels, self.prompts, deep=deep)

    def train(self, mode: bool = True) -> SyncClip:
        self._frozen = None  # text features are cached only while evaluating
        return super().train(mode)

    def text(self) -> torch.Tensor:
        if self.training:
            return self.class_features()
        if self._frozen is None:
            with torch.no_grad():
                self._frozen = self.class_features()
        return self._frozen

    @torch.no_grad()
    def image_features(self, pixels: torch.Tensor, pre: Preprocess,
                       batch: int = 128) -> torch.Tensor:
        """Unit features (N, D) of uint8 images (N, 3, S, S) through the real prompts: what it
        is scored on, in place of the cached features of a plain CLIP."""
        device = self.ctx.device
        parts = [F.normalize(self.encode(normalize(x, pre, device)).float(), dim=-1)
                 for x in pixels.split(batch)]
        return torch.cat(parts) if parts else torch.zeros(0, self.encoder.embed_dim,
                                                          device=device)

    def logits(self, raw: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return LOGIT_SCALE * F.normalize(raw.float(), dim=-1) @ text.T

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return LOGIT_SCALE * f @ self.text().T



def _normal(*shape: Any) -> torch.Tensor:
    *dims, device = shape
    t = torch.empty(*dims, device=device)
    nn.init.normal_(t, std=PROMPT_STD)
    return t
