"""Sampling synthetic image features from a trained SHIP generator, for any class name.

Each class's samples come from an RNG seeded by (seed, class name), so a class gets the same
features whichever other classes are sampled with it, and adding classes later never changes
the ones already sampled. `fresh` draws new samples from a caller's RNG instead (for heads that
want new synthetic features every step).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch

from .ship import ShipGenerator
from .text_encoder import ClassPrompts


def class_rng(seed: int, classname: str, device: torch.device) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}\x00{classname}".encode()).digest()
    rng = torch.Generator(device=device)
    rng.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return rng


class Synthesizer:
    """A trained generator plus the prompts of the classes it will be asked for."""

    def __init__(self, generator: ShipGenerator, classnames: Sequence[str]) -> None:
        self.generator = generator.eval()
        self.classnames = tuple(classnames)
        self.prompts: ClassPrompts = generator.decoder.class_prompts(self.classnames,
                                                                     generator.config.n_ctx)

    @property
    def device(self) -> torch.device:
        return self.generator.decoder.device

    @torch.no_grad()
    def per_class(self, index: int, count: int, seed: int, batch: int = 256) -> torch.Tensor:
        """`count` features (count, D) for class `index`, reproducible from (seed, class name)."""
        rng = class_rng(seed, self.classnames[index], self.device)
        out = []
        for start in range(0, count, batch):
            n = min(batch, count - start)
            labels = torch.full((n,), index, dtype=torch.long, device=self.device)
            out.append(self.generator.sample(labels, self.prompts, generator=rng))
        return torch.cat(out)

    @torch.no_grad()
    def fresh(self, labels: torch.Tensor, rng: torch.Generator | None = None) -> torch.Tensor:
        """New samples for the given class indices (B,) -> (B, D), from the caller's RNG."""
        return self.generator.sample(labels.to(self.device), self.prompts, generator=rng)

    def drawer(self, label_ids: Sequence[int]) -> Callable[[int, torch.Generator],
                                                           tuple[torch.Tensor, torch.Tensor]]:
        """A per-step sampler: `count` features of classes drawn uniformly from this synthesizer's
        classes, labelled with `label_ids` (one per class, e.g. the dataset's new-class ids),
        all from the caller's RNG: reproducible from its seed, new at every call."""
        ids = torch.tensor(list(label_ids), dtype=torch.long, device=self.device)
        if len(ids) != len(self.classnames):
            raise ValueError(f"{len(ids)} label ids for {len(self.classnames)} classes")

        def draw(count: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
            index = torch.randint(len(ids), (count,), generator=rng, device=self.device)
            return self.fresh(index, rng), ids[index]

        return draw
