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

# Fresh synthetic features: (count, rng) -> features (count, D) and labels (count,), drawn anew on
# the device at every call (labels uniform over the new classes, z ~ N(0, I)).
Draw = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class HeadData:
    views: torch.Tensor  # (M, V, D) real training views (V may be 0)
    clean: torch.Tensor  # (M, D)
    labels: torch.Tensor  # (M,) class ids over all classes
    synthetic: torch.Tensor  # (S, D) synthesized features, S may be 0
    synthetic_labels: torch.Tensor  # (S,)
    mix: str = "join"  # join | pair
    draw: Draw | None = None  # pair: fresh samples every step instead of the stored pool


def pick_views(views: torch.Tensor, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Which cached view each image trains on this epoch: (rows, picks), both (M,), to index
    views (M, V, D) or their norms (M, V). V must be > 0."""
    m = views.shape[0]
    pick = torch.randint(views.shape[1], (m,), generator=rng, device=views.device)
    return torch.arange(m, device=views.device), pick


def _real(data: HeadData, rng: torch.Generator) -> torch.Tensor:
    """One cached view per image for this epoch: (M, D)."""
    if data.views.shape[1] == 0:
        return data.clean
    return data.views[pick_views(data.views, rng)]


Batch = tuple[torch.Tensor, torch.Tensor]  # features (B, D), labels (B,)


def epoch_size(data: HeadData) -> int:
    """Samples one epoch shuffles: the real images, and the synthetic features that join them."""
    joined = data.synthetic.shape[0] if data.mix == "join" else 0
    return int(data.labels.shape[0]) + int(joined)


def steps_per_epoch(size: int, batch: int, drop_last: bool) -> int:
    """Batches per epoch. Dassl drops the last partial batch only when the set fills at least one
    (`drop_last=is_train and len(data) >= batch_size`); the SHIP and Tip-Adapter loaders keep it."""
    if drop_last and size >= batch:
        return size // batch
    return math.ceil(size / batch)


def epoch_batches(data: HeadData, batch: int, rng: torch.Generator,
                  drop_last: bool = False) -> list[Batch]:
    device = data.labels.device
    x, y = _real(data, rng), data.labels
    if data.mix == "join" and data.synthetic.shape[0]:
        x, y = torch.cat([x, data.synthetic]), torch.cat([y, data.synthetic_labels])
    order = torch.randperm(y.shape[0], generator=rng, device=device)
    batches = [(x[i], y[i]) for i in order.split(batch)]
    batches = batches[:steps_per_epoch(len(order), batch, drop_last)]
    if data.mix == "pair" and data.draw is not None:
        return [_fresh(xb, yb, data.draw, rng) for xb, yb in batches]
    if data.mix == "pair" and data.synthetic.shape[0]:
        batches = [_pair(xb, yb, data, rng) for xb, yb in batches]
    return batches


def _fresh(x: torch.Tensor, y: torch.Tensor, draw: Draw,
           rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Append len(x) synthetic features sampled now, as SHIP's `run_coop` does at every step."""
    xs, ys = draw(len(y), rng)
    return torch.cat([x, xs.to(x)]), torch.cat([y, ys.to(y)])


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
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, eps=1e-4, weight_decay=cfg.weight_decay)


WARMUP_LR = 1e-5


def step_lr(cfg: HeadConfig, epoch: int, step: int, steps: int) -> float:
    """The learning rate of step `step` (0-based, of `steps` per epoch) in epoch `epoch`.

    schedule `epoch` (Dassl): constant 1e-5 for the warm-up epochs, then cosine stepped once per
    epoch with T = epochs; Dassl's warm-up wrapper starts the cosine at its first step, so epoch e
    >= W trains at 0.5 lr (1 + cos(pi (e - W + 1) / epochs)) after W >= 1 warm-up epochs and at
    0.5 lr (1 + cos(pi e / epochs)) without. schedule `step` (Tip-Adapter-F, SHIP's CoOp):
    CosineAnnealingLR over every step, 0.5 lr (1 + cos(pi t / T)) with t the global step and T
    all steps after the warm-up."""
    warm = cfg.warmup_epochs
    if epoch < warm:
        return WARMUP_LR
    if cfg.schedule == "epoch":
        done = epoch - warm + 1 if warm else epoch
        return 0.5 * cfg.lr * (1 + math.cos(math.pi * done / cfg.epochs))
    t, total = (epoch - warm) * steps + step, max(1, (cfg.epochs - warm) * steps)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * t / total))


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
        steps = steps_per_epoch(epoch_size(data), cfg.batch_size, cfg.drop_last)
        for epoch in range(cfg.epochs):
            t0 = time.perf_counter()
            head.train()
            totals = torch.zeros(2, device=data.labels.device)  # loss sum, correct
            count = 0
            for step, (x, y) in enumerate(epoch_batches(data, cfg.batch_size, rng,
                                                        cfg.drop_last)):
                for group in optimizer.param_groups:
                    group["lr"] = step_lr(cfg, epoch, step, steps)
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
