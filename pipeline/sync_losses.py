"""SYNC-CLIP's training signal: the synthetic batch drawn beside each real batch and the three
losses L = L_real + WEIGHT * L_syn + KLWEIGHT * L_align (METHODS.md, section SYNC-CLIP). They do
not depend on where the features come from: shipyard's feature-space variant trains on them
(`sync_clip.py`), and the paper's prompted-ViT method can too.

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

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UsageError


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
