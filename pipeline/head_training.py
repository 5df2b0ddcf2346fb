"""Training a head on cached features (real views, plus synthesized features when given) with
every batch drawn on the device. Synthetic features either join the training set (Tip-Adapter-F,
CLIP-Adapter, linear probe) or are paired with each real batch, labels uniform over the new
classes (CoOp+SHIP, as the public SHIP code does)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .configs import HeadConfig
from .progress import Progress, Silent


@dataclass(frozen=True)
class HeadData:
    views: torch.Tensor  # (M, V, D) real training views (V may be 0)
    clean: torch.Tensor  # (M, D)
    labels: torch.Tensor  # (M,) class ids over all classes
    synthetic: torch.Tensor  # (S, D) synthesized features, S may be 0
    synthetic_labels: torch.Tensor  # (S,)
    mix: str = "join"  # join | pair


def _real(data: HeadData, rng: torch.Generator) -> torch.Tensor:
    """One cached view per image for this epoch: (M, D)."""
    m = data.labels.shape[0]
    if data.views.shape[1] == 0:
        return data.clean
    pick = torch.randint(data.views.shape[1], (m,), generator=rng, device=data.labels.device)
    return data.views[torch.arange(m, device=pick.device), pick]


Batch = tuple[torch.Tensor, torch.Tensor]  # features (B, D), labels (B,)


def epoch_batches(data: HeadData, batch: int, rng: torch.Generator) -> list[Batch]:
    device = data.labels.device
    x, y = _real(data, rng), data.labels
    if data.mix == "join" and data.synthetic.shape[0]:
        x, y = torch.cat([x, data.synthetic]), torch.cat([y, data.synthetic_labels])
    order = torch.randperm(y.shape[0], generator=rng, device=device)
    batches = [(x[i], y[i]) for i in order.split(batch)]
    if data.mix == "pair" and data.synthetic.shape[0]:
        batches = [_pair(xb, yb, data, rng) for xb, yb in batches]
    return batches


def _pair(x: torch.Tensor, y: torch.Tensor, data: HeadData,
          rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Append len(x) synthetic samples: a class uniform over the synthetic classes, then one of
    its samples uniformly."""
    classes = torch.unique(data.synthetic_labels)  # (K,)
    chosen = classes[torch.randint(len(classes), (len(y),), generator=rng, device=y.device)]
    # For each chosen class, a uniformly random row among that class's rows.
    weights = (data.synthetic_labels[None, :] == chosen[:, None]).float()  # (B, S)
    rows = torch.multinomial(weights, 1, generator=rng).squeeze(1)  # (B,)
    return torch.cat([x, data.synthetic[rows]]), torch.cat([y, data.synthetic_labels[rows]])


def make_optimizer(params: list[nn.Parameter], cfg: HeadConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, eps=1e-4, weight_decay=cfg.weight_decay)


def epoch_lr(cfg: HeadConfig, epoch: int) -> float:
    """Constant 1e-5 for the warm-up epochs, then cosine from lr to 0 over the rest."""
    if epoch < cfg.warmup_epochs:
        return 1e-5
    span = max(1, cfg.epochs - cfg.warmup_epochs)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * (epoch - cfg.warmup_epochs) / span))


def train_head(head: nn.Module, data: HeadData, cfg: HeadConfig,
               select: Callable[[nn.Module], float] | None = None,
               progress: Progress | None = None) -> dict[str, Any]:
    """Train `head` in place. With `select` (the `paper` protocol) the state with the best
    selection score over epochs is restored at the end; otherwise the last epoch is kept."""
    progress = progress or Silent()
    params = [p for p in head.parameters() if p.requires_grad]
    log: list[dict[str, float]] = []
    if not params or cfg.epochs == 0:
        return {"log": log, "selected_epoch": 0}
    optimizer = make_optimizer(params, cfg)
    rng = torch.Generator(device=data.labels.device)
    rng.manual_seed(cfg.seed)
    best: tuple[float, int, dict[str, Any]] | None = None
    task = progress.task("train head", cfg.epochs, "epoch")
    try:
        for epoch in range(cfg.epochs):
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = epoch_lr(cfg, epoch)
            head.train()
            totals = torch.zeros(2, device=data.labels.device)  # loss sum, correct
            count = 0
            for x, y in epoch_batches(data, cfg.batch_size, rng):
                logits = head(x)
                loss = F.cross_entropy(logits, y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                totals += torch.stack([loss.detach() * len(y), (logits.argmax(1) == y).sum()])
                count += len(y)
            head.eval()
            entry = {"epoch": epoch + 1, "loss": totals[0].item() / count,
                     "train_acc": 100 * totals[1].item() / count, "seconds": time.perf_counter() - t0}
            if select is not None:
                entry["select"] = select(head)
                if best is None or entry["select"] > best[0]:
                    best = (entry["select"], epoch + 1, copy.deepcopy(head.state_dict()))
            log.append(entry)
            task.advance(1)
    finally:
        task.close()
    if best is not None:
        head.load_state_dict(best[2])
    return {"log": log, "selected_epoch": best[1] if best else cfg.epochs}
