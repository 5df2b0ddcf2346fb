"""Classifier heads over cached CLIP features: zero-shot, linear probe, CLIP-Adapter, CoOp,
Tip-Adapter(-F), SYNC-CLIP-FS and SYNC-CLIP (whose prompted towers are in `sync_prompts.py`).
Every head maps (B, D) unit-norm image features to (B, C)
logits over all C classes of a dataset (base then new). One registry names them; configs are
frozen dataclasses. SYNC-CLIP-FS trains in `sync_clip.py`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .configs import HeadConfig
from .errors import UsageError
from .text_encoder import PromptEncoder
from .tip import tip_logits

LOGIT_SCALE = 100.0


def zero_shot_weights(sets: list[torch.Tensor]) -> torch.Tensor:
    """The zero-shot classifier of a template ensemble: normalize each template's (C, D) class
    features, average over templates, normalize again."""
    return F.normalize(torch.stack([F.normalize(s.float(), dim=-1) for s in sets]).mean(0), dim=-1)


class ZeroShot(nn.Module):
    """logits = 100 f W^T with W the normalized class-name text features (C, D)."""

    text: torch.Tensor

    def __init__(self, text: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("text", F.normalize(text, dim=-1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return LOGIT_SCALE * f @ self.text.T  # (B, D) @ (D, C)


class LinearProbe(nn.Module):
    """CoOp's linear probe (lpclip): logits W f + b on normalized features, W and b fitted by
    L-BFGS logistic regression (`lpclip.search_logistic`), not by the epoch loop."""

    def __init__(self, text: torch.Tensor) -> None:
        super().__init__()
        classes, dim = text.shape
        self.weight = nn.Parameter(torch.zeros(classes, dim), requires_grad=False)  # (C, D)
        self.bias = nn.Parameter(torch.zeros(classes), requires_grad=False)  # (C,)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f, dim=-1) @ self.weight.T + self.bias


class ClipAdapter(nn.Module):
    """f' = a A(f) + (1 - a) f, A = Linear(D, D/4) ReLU Linear(D/4, D) ReLU (no biases)."""

    text: torch.Tensor

    def __init__(self, text: torch.Tensor, ratio: float) -> None:
        super().__init__()
        dim = text.shape[1]
        self.adapter = nn.Sequential(nn.Linear(dim, dim // 4, bias=False), nn.ReLU(),
                                     nn.Linear(dim // 4, dim, bias=False), nn.ReLU())
        self.ratio = ratio
        self.register_buffer("text", F.normalize(text, dim=-1))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        mixed = self.ratio * self.adapter(f) + (1 - self.ratio) * f  # (B, D)
        return LOGIT_SCALE * F.normalize(mixed, dim=-1) @ self.text.T


class CoOp(nn.Module):
    """Learnable context shared by all classes, `[SOS] ctx {class}. [EOS]` through the frozen
    text encoder; the class text features are recomputed from the context at every step.

    With `train_classes` m, training sees only the first m classes (the base classes): the
    softmax is over them, as CoOp's baseline builds its model from the base class names alone.
    Evaluation always scores every class."""

    def __init__(self, encoder: PromptEncoder, classnames: tuple[str, ...], cfg: HeadConfig,
                 train_classes: int | None = None) -> None:
        super().__init__()
        self.train_classes = train_classes
        init = encoder.context_from_text(cfg.ctx_init)
        if init.shape[0] != cfg.n_ctx:
            raise UsageError(f"ctx_init {cfg.ctx_init!r} has {init.shape[0]} tokens, n_ctx is "
                             f"{cfg.n_ctx}")
        self.ctx = nn.Parameter(init)  # (n, W)
        object.__setattr__(self, "encoder", encoder)  # frozen CLIP weights stay unregistered
        self.prompts = encoder.class_prompts(classnames, cfg.n_ctx)
        self._frozen: torch.Tensor | None = None

    def class_features(self, count: int | None = None) -> torch.Tensor:
        labels = torch.arange(count or len(self.prompts), device=self.ctx.device)
        return self.encoder(self.ctx, labels, self.prompts)  # type: ignore[operator]

    def train(self, mode: bool = True) -> CoOp:
        self._frozen = None  # text features are cached only while evaluating
        return super().train(mode)

    def text(self) -> torch.Tensor:
        """The class features it scores against: recomputed from the context while training (the
        training classes), cached for every class in eval (reset by `train()`)."""
        if self.training:
            return self.class_features(self.train_classes)
        if self._frozen is None:
            with torch.no_grad():
                self._frozen = self.class_features()
        return self._frozen

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return LOGIT_SCALE * f @ self.text().T  # (B, D) @ (D, C)


class ResidualAdapter(nn.Module):
    """f + Linear(D, D/4)-ReLU-Linear(D/4, D)(f), the last layer zero-initialised: the identity
    until it trains."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, max(1, dim // 4))
        self.up = nn.Linear(max(1, dim // 4), dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return f + self.up(F.relu(self.down(f)))


class SyncClipFS(nn.Module):
    """SYNC-CLIP on cached features (shipyard's own design, not the paper's method): CoOp's
    shared context for the class prompts of both domains, and a residual adapter per domain
    over the unit image features. `adapt` rebuilds raw features from the stored norms (raw =
    norm * adapted), which SYNC-CLIP's alignment loss compares; logits read the adapted
    direction, so scoring needs no norms. Evaluation scores real images (the real adapter)."""

    def __init__(self, encoder: PromptEncoder, classnames: tuple[str, ...], cfg: HeadConfig) -> None:
        super().__init__()
        self.coop = CoOp(encoder, classnames, cfg)
        dim = int(encoder.embed_dim)
        self.real = ResidualAdapter(dim)
        self.synthetic = ResidualAdapter(dim)

    def adapt(self, unit: torch.Tensor, norms: torch.Tensor, synthetic: bool) -> torch.Tensor:
        """(B, D) unit features and (B,) norms -> (B, D) raw adapted features."""
        adapter = self.synthetic if synthetic else self.real
        return norms[:, None] * adapter(unit)

    def logits(self, raw: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return LOGIT_SCALE * F.normalize(raw, dim=-1) @ text.T

    def text(self) -> torch.Tensor:
        """(C, D) class features of every class, as CoOp computes and caches them."""
        return self.coop.text()

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.logits(self.real(f), self.text())


class TipAdapter(nn.Module):
    """logits = 100 f W^T + alpha exp(-beta (1 - f K^T)) V. With `trainable` (Tip-Adapter-F)
    the keys K are a bias-free linear layer initialised from the cache; values stay fixed."""

    text: torch.Tensor
    key_labels: torch.Tensor

    def __init__(self, text: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor,
                 alpha: float, beta: float, trainable: bool) -> None:
        super().__init__()
        self.register_buffer("text", F.normalize(text, dim=-1))
        self.register_buffer("key_labels", key_labels)
        self.keys = nn.Parameter(keys.clone(), requires_grad=trainable)  # (N, D)
        self.alpha, self.beta = alpha, beta

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return tip_logits(f, self.keys, self.key_labels, self.text, self.alpha, self.beta,
                          LOGIT_SCALE)


def cache_keys(views: torch.Tensor, clean: torch.Tensor, view_norms: torch.Tensor | None = None,
               recipe: str = "raw-mean") -> torch.Tensor:
    """Tip-Adapter keys from the cached augmented views (M, V, D), unit vectors with their norms
    (M, V); the clean features when there are no views.

    raw-mean (Tip-Adapter's utils.py): the average of the raw views, unit * norm, then
    normalized. unit-mean (SHIP's copy): each view normalized first, then averaged, normalized."""
    if views.shape[1] == 0:
        return clean
    if recipe == "raw-mean":
        if view_norms is None:
            raise UsageError("raw-mean cache keys need the views' norms")
        raw = views * view_norms.to(views)[..., None]  # (M, V, D)
        return F.normalize(raw.mean(dim=1), dim=-1)
    return F.normalize(views.mean(dim=1), dim=-1)  # (M, V, D) -> (M, D)


def _sync_clip(cfg: HeadConfig, encoder: PromptEncoder, classnames: tuple[str, ...], vision: Any,
               design: Any, **_: Any) -> nn.Module:
    from .sync_prompts import SyncClip  # the prompted towers (it imports this module)

    return SyncClip(encoder, vision, classnames, cfg, design)


Builder = Callable[..., nn.Module]
# The model of each head method of the registry (`registry.heads()`, presets/heads.json).
BUILDERS: dict[str, Builder] = {
    "zero-shot": lambda text, **_: ZeroShot(text),
    "linear-probe": lambda text, **_: LinearProbe(text),
    "clip-adapter": lambda text, cfg, **_: ClipAdapter(text, cfg.ratio),
    "coop": lambda text, cfg, encoder, classnames, train_classes=None, **_: CoOp(
        encoder, classnames, cfg, train_classes),
    "sync-clip-fs": lambda text, cfg, encoder, classnames, **_: SyncClipFS(encoder, classnames, cfg),
    "sync-clip": _sync_clip,
    "tip-adapter": lambda text, cfg, keys, key_labels, **_: TipAdapter(
        text, keys, key_labels, cfg.alpha, cfg.beta, trainable=False),
    "tip-adapter-f": lambda text, cfg, keys, key_labels, **_: TipAdapter(
        text, keys, key_labels, cfg.alpha, cfg.beta, trainable=True),
}


def build_head(method: str, **inputs: Any) -> nn.Module:
    if method not in BUILDERS:
        raise UsageError(f"unknown method {method!r} (known: {', '.join(BUILDERS)})")
    return BUILDERS[method](**inputs)
