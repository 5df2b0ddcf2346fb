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
    optimizer: str = "sgd"  # sgd | adamw (eps 1e-4)
    momentum: float = 0.9  # SGD only; CoOp+SHIP's own recipe: 0
    weight_decay: float = 5e-4
    warmup_epochs: int = 1  # constant lr 1e-5 first (CoOp), then cosine
    schedule: str = "epoch"  # cosine stepped per epoch (Dassl) | per step (Tip-Adapter-F, SHIP)
    drop_last: bool = True  # Dassl: drop the last partial batch when the set fills one batch
    seed: int = 0
    ratio: float = 0.2  # CLIP-Adapter residual ratio a
    n_ctx: int = 4  # CoOp context tokens
    ctx_init: str = "a photo of a"
    alpha: float = 1.0  # Tip-Adapter: Tip-Adapter-F trains at these; the fallback with no val
    beta: float = 1.0
    keys: str = "raw-mean"  # Tip-Adapter's cache keys: raw-mean (its code) | unit-mean (SHIP's)
    views: str = "primary"  # the view recipe it trains on: primary | a name of extraction.recipes

    def __post_init__(self) -> None:
        choices = {"optimizer": ("sgd", "adamw"), "schedule": ("epoch", "step"),
                   "keys": ("raw-mean", "unit-mean")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(allowed)}, "
                                 f"got {getattr(self, name)!r}")
        positive = ("batch_size", "lr", "n_ctx")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)!r}")
        for name in ("epochs", "warmup_epochs", "momentum", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)!r}")

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


@dataclass(frozen=True)
class PromptDesign:
    """SYNC-CLIP's prompt shapes (configs/trainers/SynCLIP): depth 9 on both towers, 4 vision
    tokens, 2 of them synthetic-specific. The text context length is the head's n_ctx."""

    depth: int = 9
    vision_tokens: int = 4
    synthetic_tokens: int = 2

    def __post_init__(self) -> None:
        if self.depth < 1 or self.vision_tokens < 1:
            raise ValueError(f"prompt depth {self.depth} and vision tokens {self.vision_tokens} "
                             "must be >= 1")
        if not 0 <= self.synthetic_tokens <= self.vision_tokens:
            raise ValueError(f"synthetic tokens {self.synthetic_tokens}: must lie in 0.."
                             f"{self.vision_tokens} (they replace the first of the vision tokens)")

    def to_dict(self) -> dict[str, int]:
        return asdict(self)
