"""Tip-Adapter's math: the cache logits (dense, and sparse over given neighbours) and the
alpha/beta grid search on val. Tensors in and out, the device taken from the inputs. The FAISS
index that finds neighbours in large caches is `cache_index.py`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import UsageError


def affinity(sims: Any, beta: float) -> Any:
    """A = exp(-beta (1 - sims)) for cosine similarities: 1 at sim 1, exp(-2 beta) at sim -1."""
    if isinstance(sims, np.ndarray):
        return np.exp(-beta * (1.0 - sims))
    return torch.exp(-beta * (1.0 - sims))


def _class_sum(weights: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Sum weights per class: (B, N) with shared labels (N,), or (B, k) with per-row labels (B, k)
    where a negative label (FAISS's "no neighbour") adds nothing. Equals weights @ one_hot(labels)
    without building the (N, C) one-hot."""
    out = weights.new_zeros(weights.shape[0], n_classes)  # (B, C)
    if labels.ndim == 1:
        return out.index_add(1, labels, weights)
    keep = labels >= 0
    return out.scatter_add(1, labels.clamp(min=0), torch.where(keep, weights, 0.0))


def tip_logits(queries: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor,
               text_weights: torch.Tensor, alpha: float, beta: float,
               logit_scale: float = 100.0) -> torch.Tensor:
    """Dense Tip-Adapter: logit_scale f W^T + alpha A V over all N keys, V = one-hot(labels).
    Queries, keys and text weights are L2-normalised by the caller. Differentiable in the keys."""
    text = text_weights.to(queries)
    clip = logit_scale * queries @ text.T  # (B, D) @ (D, C) -> (B, C)
    sims = queries @ keys.to(queries).T  # (B, D) @ (D, N) -> (B, N)
    cache = _class_sum(affinity(sims, beta), labels.to(queries.device).long(), text.shape[0])
    return clip + alpha * cache


def tip_logits_blocked(queries: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor,
                       text_weights: torch.Tensor, alpha: float, beta: float,
                       logit_scale: float = 100.0, max_elements: int = 1 << 25) -> torch.Tensor:
    """`tip_logits` with the keys taken in blocks of about max_elements / B: each block's
    similarities are made, turned into affinities and summed per class, then freed. Every key
    is read once per call however many queries there are, and memory stays bounded."""
    text = text_weights.to(queries)
    out = logit_scale * queries @ text.T  # (B, D) @ (D, C) -> (B, C)
    labels = labels.to(queries.device).long()
    step = max(1, max_elements // max(1, len(queries)))
    cache = out.new_zeros(out.shape)
    for start in range(0, keys.shape[0], step):
        block = keys[start:start + step].to(queries)
        sims = queries @ block.T  # (B, D) @ (D, n) -> (B, n)
        cache += _class_sum(affinity(sims, beta), labels[start:start + step], text.shape[0])
    return out + alpha * cache


def tip_logits_sparse(queries: torch.Tensor, neighbour_sims: torch.Tensor,
                      neighbour_labels: torch.Tensor, text_weights: torch.Tensor, alpha: float,
                      beta: float, logit_scale: float = 100.0) -> torch.Tensor:
    """Tip-Adapter over each query's k neighbours only: sims (B, k), labels (B, k), label -1 for a
    missing neighbour. With k = N it equals `tip_logits`; with k < N the far keys are dropped."""
    text = text_weights.to(queries)
    clip = logit_scale * queries @ text.T  # (B, D) @ (D, C) -> (B, C)
    weights = affinity(neighbour_sims.to(queries), beta)  # (B, k)
    cache = _class_sum(weights, neighbour_labels.to(queries.device).long(), text.shape[0])
    return clip + alpha * cache


# --- alpha / beta search -----------------------------------------------------------------------

def search_grid(s_beta: float, s_alpha: float, beta_steps: int = 200,
                alpha_steps: int = 20) -> tuple[list[float], list[float]]:
    """beta_i = 0.1 + i (S_beta - 0.1) / beta_steps, alpha_j likewise, i and j from 0 to steps - 1:
    the public code's `range(steps)`, so S itself is never tried."""
    betas = [0.1 + i * (s_beta - 0.1) / beta_steps for i in range(beta_steps)]
    alphas = [0.1 + j * (s_alpha - 0.1) / alpha_steps for j in range(alpha_steps)]
    return betas, alphas


@torch.no_grad()
def search_alpha_beta(val_feats: torch.Tensor, val_labels: torch.Tensor, keys: torch.Tensor,
                      key_labels: torch.Tensor, text_weights: torch.Tensor, s_beta: float,
                      s_alpha: float, beta_steps: int = 200, alpha_steps: int = 20,
                      logit_scale: float = 100.0,
                      max_elements: int = 1 << 24) -> tuple[float, float, float]:
    """Tip-Adapter's grid search: (best_alpha, best_beta, best val accuracy in [0, 1]). Ties keep
    the first point in beta-major order, as the public code's strict `>` does. Val-to-key sims are
    computed once per row block and reused over the whole grid; all alphas are scored at once."""
    if len(val_feats) == 0:
        raise UsageError("the alpha/beta search needs at least one val feature")
    betas, alphas = search_grid(s_beta, s_alpha, beta_steps, alpha_steps)
    dev, n_classes = val_feats.device, text_weights.shape[0]
    keys, text = keys.to(val_feats), text_weights.to(val_feats)
    key_labels, val_labels = key_labels.to(dev).long(), val_labels.to(dev).long()
    alpha_t = torch.tensor(alphas, dtype=val_feats.dtype, device=dev)[:, None, None]  # (J, 1, 1)
    correct = torch.zeros(len(betas), len(alphas), dtype=torch.long, device=dev)  # (I, J)
    rows = max(1, max_elements // (len(alphas) * n_classes + keys.shape[0]))
    for f, y in zip(val_feats.split(rows), val_labels.split(rows), strict=True):
        clip = logit_scale * f @ text.T  # (b, D) @ (D, C) -> (b, C)
        shifted = f @ keys.T - 1.0  # (b, D) @ (D, N) -> (b, N): sims - 1, once for the grid
        weights = torch.empty_like(shifted)
        for i, beta in enumerate(betas):
            torch.mul(shifted, beta, out=weights).exp_()  # A = exp(-beta (1 - sims))
            cache = _class_sum(weights, key_labels, n_classes)  # (b, C)
            logits = clip + alpha_t * cache  # (J, b, C)
            correct[i] += (logits.argmax(dim=2) == y).sum(dim=1)
    best = int(correct.flatten().argmax())  # first maximum in (beta, alpha) order
    i, j = divmod(best, len(alphas))
    return alphas[j], betas[i], float(correct[i, j]) / len(val_feats)


@torch.no_grad()
def tune_alpha_beta(keys: torch.Tensor, key_labels: torch.Tensor, val_feats: torch.Tensor,
                    val_labels: torch.Tensor, text: torch.Tensor, classes: list[int],
                    scale: tuple[float, float], init: tuple[float, float]) -> dict[str, float]:
    """Tip-Adapter's grid search on the val images of `classes` over those classes' logits only
    (labels remapped to positions in `classes`). Keys of other classes add only to other classes'
    logits, so they are left out of the search. With no val image of `classes` nothing is
    searched: (alpha, beta) stay at `init` and val_accuracy is NaN."""
    cls = torch.tensor(classes, device=val_labels.device)
    keep = torch.isin(val_labels, cls)
    if not bool(keep.any()):
        return {"alpha": float(init[0]), "beta": float(init[1]), "val_accuracy": float("nan")}
    remap = torch.full((text.shape[0],), -1, dtype=torch.long, device=cls.device)
    remap[cls] = torch.arange(len(cls), device=cls.device)
    key_pos = remap[key_labels.to(cls.device).long()]
    mine = key_pos >= 0
    alpha, beta, acc = search_alpha_beta(val_feats[keep], remap[val_labels[keep]], keys[mine],
                                         key_pos[mine], text[cls], scale[0], scale[1])
    return {"alpha": float(alpha), "beta": float(beta), "val_accuracy": float(acc)}
