"""Settings as frozen, typed dataclasses: training heads, the SHIP generator and its training.
Kept free of torch, so that the manifest, the registries and the planner never import it; every
one serialises to the JSON that goes into artefact keys."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class HeadConfig:
    """Optimisation settings shared by every trained head (defaults: CoOp's, METHODS.md)."""

    epochs: int = 200
    batch_size: int = 32
    lr: float = 2e-3
    optimizer: str = "sgd"  # sgd (momentum 0.9, weight decay 5e-4) | adamw (eps 1e-4)
    weight_decay: float = 5e-4
    warmup_epochs: int = 1  # constant lr 1e-5 first (CoOp), then cosine over the rest
    seed: int = 0
    ratio: float = 0.2  # CLIP-Adapter residual ratio a
    n_ctx: int = 4  # CoOp context tokens
    ctx_init: str = "a photo of a"
    alpha: float = 1.0  # Tip-Adapter
    beta: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ShipConfig:
    latent_dim: int = 512  # L, size of z
    encoder_hidden: int = 2048  # ImageNet variant: 4096
    generator_hidden: int = 4096
    n_ctx: int = 4  # global prompt vectors, each shifted by the same local bias
    leaky: bool = False  # generator activation LeakyReLU(0.2) instead of ReLU (ImageNet variant)
    kl_weight: float = 1.0
    init_std: float = 0.02  # N(0, std) for the global prompt and every Linear weight

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 50  # over the base K-shot set (ImageNet: 10)
    batch_size: int = 256
    lr: float = 1e-3  # AdamW, other settings at their defaults
    seed: int = 0  # batch order, view choice and reparameterisation noise

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
