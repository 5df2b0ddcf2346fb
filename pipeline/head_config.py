"""Head settings as data: one frozen dataclass and the per-method defaults of METHODS.md.
Kept free of torch so the manifest can validate overrides without importing it."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
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


# Method defaults (METHODS.md); the manifest's `heads.<method>` entries override them.
DEFAULTS: dict[str, HeadConfig] = {
    "zero-shot": HeadConfig(epochs=0),
    "linear-probe": HeadConfig(epochs=100, batch_size=256, lr=1e-3, optimizer="adamw",
                               weight_decay=1e-4, warmup_epochs=0),
    "clip-adapter": HeadConfig(epochs=50, batch_size=32, lr=1e-3, optimizer="adamw",
                               weight_decay=1e-4, warmup_epochs=0),
    "coop": HeadConfig(),
    "tip-adapter": HeadConfig(epochs=0),
    "tip-adapter-f": HeadConfig(epochs=20, batch_size=256, lr=1e-3, optimizer="adamw",
                                weight_decay=1e-2, warmup_epochs=0),
}


def head_config(method: str, overrides: dict[str, dict[str, Any]]) -> HeadConfig:
    """The defaults of `method` (without '+ship') with the manifest's overrides applied."""
    base = method.removesuffix("+ship")
    return replace(DEFAULTS[base], **overrides.get(base, {}))
