"""SYNC-CLIP-FS, shipyard's feature-space variant of SYNC-CLIP: its synthetic domains (a stored
pool of synthetic features, or SHIP's generator sampled at every step) and its training loop,
on the losses of `sync_losses.py` (METHODS.md, section SYNC-CLIP)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .configs import HeadConfig
from .errors import UsageError
from .features import FewShotSet
from .head_training import make_optimizer, pick_views, step_lr, steps_per_epoch
from .heads import SyncClipFS
from .progress import Progress, Silent
from .sync_losses import SyncWeights, align_loss, batch_labels, pool_rows, syn_loss, total_loss


@dataclass(frozen=True)
class DomainPool:
    """Stored synthetic samples (an ingested synthetic-domain dataset, or a stored SHIP set):
    unit features (S, D), their raw norms (S,), labels (S,) over all classes."""

    unit: torch.Tensor
    norms: torch.Tensor
    labels: torch.Tensor

    def draw(self, wanted: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        rows = pool_rows(wanted, self.labels, rng)
        return self.unit[rows], self.norms[rows]


@dataclass(frozen=True)
class FreshDomain:
    """SHIP's generator as the synthetic domain: new samples of the wanted classes at every
    step. SHIP's features are unit vectors; their raw norm is taken as the real shots' mean."""

    sample: Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # labels (N,) -> (N, D)
    norm: float

    def draw(self, wanted: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        unit = F.normalize(self.sample(wanted, rng).float(), dim=-1)
        return unit, torch.full((len(wanted),), self.norm, device=unit.device)


Domain = DomainPool | FreshDomain


def train_sync(head: SyncClipFS, real: FewShotSet, domain: Domain, new_classes: list[int],
               cfg: HeadConfig, weights: SyncWeights, progress: Progress | None = None) -> dict[str, Any]:
    """Train `head` in place on the real shots (one cached view per image per epoch, raw norms
    from the store) and the synthetic domain, with L_real + WEIGHT L_syn + KLWEIGHT L_align and
    the head's optimiser and schedule (Dassl's SGD for SYNC-CLIP). Returns the per-epoch log."""
    progress = progress or Silent()
    device = real.labels.device
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    rng = torch.Generator(device=device)
    rng.manual_seed(cfg.seed)
    n_base = len(real.classnames)
    new = torch.tensor(new_classes, dtype=torch.long, device=device)
    m = real.size
    if real.clean_norms is None:
        raise UsageError("SYNC-CLIP's alignment needs the stored feature norms (re-extract)")
    steps = steps_per_epoch(m, cfg.batch_size, cfg.drop_last)
    log: list[dict[str, float]] = []
    task = progress.task("train sync-clip-fs", cfg.epochs, "epoch")
    try:
        for epoch in range(cfg.epochs):
            t0 = time.perf_counter()
            head.train()
            unit, norms = _epoch_views(real, rng)
            order = torch.randperm(m, generator=rng, device=device)
            totals = torch.zeros(5, device=device)  # loss, real, syn, align, correct
            for step, idx in enumerate(order.split(cfg.batch_size)[:steps]):
                for group in optimizer.param_groups:
                    group["lr"] = step_lr(cfg, epoch, step, steps)
                y = real.labels[idx]
                text = head.text()  # (C, D), both domains' classifier
                real_raw = head.adapt(unit[idx], norms[idx], synthetic=False)
                real_logits = head.logits(real_raw, text[:n_base])
                l_real = F.cross_entropy(real_logits, y)
                wanted = batch_labels(y, new, rng)
                s_unit, s_norms = domain.draw(wanted, rng)
                syn_raw = head.adapt(s_unit, s_norms, synthetic=True)
                l_syn = syn_loss(head.logits(syn_raw, text), wanted)
                l_align = align_loss(syn_raw[: len(y)], real_raw, y)
                loss = total_loss(l_real, l_syn, l_align, weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                parts = torch.stack([loss, l_real, l_syn, l_align]).detach() * len(y)
                totals += torch.cat([parts, (real_logits.argmax(1) == y).sum()[None].float()])
            count = max(1, min(m, steps * cfg.batch_size))
            t = (totals / count).tolist()
            log.append({"epoch": epoch + 1, "loss": t[0], "real": t[1], "syn": t[2], "align": t[3],
                        "train_acc": 100 * t[4], "seconds": time.perf_counter() - t0})
            task.advance(1)
    finally:
        task.close()
    head.eval()
    return {"log": log, "selected_epoch": cfg.epochs}


def _epoch_views(real: FewShotSet, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One cached view per image for this epoch, with its norm: (M, D), (M,)."""
    if real.views.shape[1] == 0 or real.view_norms is None:
        assert real.clean_norms is not None
        return real.clean, real.clean_norms
    chosen = pick_views(real.views, rng)
    return real.views[chosen], real.view_norms[chosen].to(real.views)
