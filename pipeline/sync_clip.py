"""SYNC-CLIP's training signal: the synthetic batch drawn beside each real batch and the three
losses L = L_real + WEIGHT * L_syn + KLWEIGHT * L_align (METHODS.md, section SYNC-CLIP), and the
training loop of shipyard's feature-space variant (`sync-clip-fs`). The losses do not depend on
where the features come from, so the paper's prompted-ViT method can train on them too.

Per step, with B real base images of labels y:
- the synthetic batch is 2B synthetic samples: for each real label one synthetic sample of that
  label (paired with the real image), then B samples of labels uniform over the new classes;
- L_real = CE(real logits over the base classes, y);
- L_syn = CE(first B synthetic, all-class logits) + CE(last B synthetic, all-class logits): a sum
  of the two halves' means;
- L_align on the UNNORMALIZED features of the B paired synthetic samples s and the B real r:
  d(a, b) = mean |a - b|, pos_i = d(s_i, r_i), neg_i = min over real j of another class than
  i's of d(s_i, r_j) (no such j: neg_i = pos_i), L_align = mean(relu(pos - neg) + pos).
  Nothing is detached: the gradient reaches both domains.
"""

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


@dataclass(frozen=True)
class SyncWeights:
    weight: float = 0.4  # WEIGHT: L_syn (SYNC-CLIP's default; per dataset in the presets)
    kl_weight: float = 0.1  # KLWEIGHT: L_align


def mean_abs_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, D), (M, D) -> (N, M): d(a_i, b_j) = mean over dims of |a_i - b_j|."""
    return (a[:, None, :] - b[None, :, :]).abs().mean(dim=-1)


def align_loss(synthetic: torch.Tensor, real: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_align for B paired rows: synthetic (B, D) and real (B, D) unnormalized features, row i
    of both of class labels[i] (B,)."""
    if synthetic.shape != real.shape or synthetic.ndim != 2 or labels.shape != real.shape[:1]:
        raise ValueError(f"align_loss: synthetic {tuple(synthetic.shape)}, real "
                         f"{tuple(real.shape)} and labels {tuple(labels.shape)} must pair row by row")
    d = mean_abs_distance(synthetic, real)  # (B, B)
    pos = d.diagonal()  # (B,)
    other = labels[:, None] != labels[None, :]  # (B, B) real j of another class than i
    neg = torch.where(other, d, torch.full_like(d, float("inf"))).amin(dim=1)  # (B,)
    neg = torch.where(other.any(dim=1), neg, pos)
    return (F.relu(pos - neg) + pos).mean()


def syn_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """L_syn over the 2B synthetic samples (paired half first): the sum of each half's CE."""
    if logits.shape[0] != labels.shape[0] or logits.shape[0] % 2:
        raise ValueError(f"syn_loss: expected 2B logits and labels, got {logits.shape[0]} and "
                         f"{labels.shape[0]}")
    half = logits.shape[0] // 2
    return F.cross_entropy(logits[:half], labels[:half]) + F.cross_entropy(logits[half:], labels[half:])


def total_loss(real: torch.Tensor, syn: torch.Tensor, align: torch.Tensor,
               weights: SyncWeights) -> torch.Tensor:
    """L = L_real + WEIGHT * L_syn + KLWEIGHT * L_align."""
    return real + weights.weight * syn + weights.kl_weight * align


def batch_labels(real_labels: torch.Tensor, new_classes: torch.Tensor,
                 rng: torch.Generator) -> torch.Tensor:
    """The synthetic batch's labels for B real labels: (2B,), the real labels in order, then B
    labels uniform over `new_classes`."""
    if new_classes.numel() == 0:
        raise UsageError("SYNC-CLIP's synthetic batch needs at least one new class")
    b = real_labels.shape[0]
    pick = new_classes[torch.randint(len(new_classes), (b,), generator=rng, device=rng.device)]
    return torch.cat([real_labels, pick.to(real_labels)])


def pool_rows(wanted: torch.Tensor, pool_labels: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
    """For each wanted label, a row of the pool (labels (S,)) of that label, uniformly."""
    members = pool_labels[None, :] == wanted[:, None]  # (N, S)
    missing = wanted[~members.any(dim=1)].unique()
    if missing.numel():
        raise UsageError(f"the synthetic domain has no image of class id(s) "
                         f"{', '.join(str(int(c)) for c in missing[:6])}: SYNC-CLIP needs every "
                         "class (base and new) in it")
    return torch.multinomial(members.float(), 1, generator=rng).squeeze(1)


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
