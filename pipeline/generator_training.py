"""The SHIP training loop on cached tensors: every batch is drawn on the device from features that
were loaded once; one augmented view per image per epoch; one RNG for everything, so a run resumed
from a checkpoint follows exactly the path of an uninterrupted one."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from .checkpoints import Checkpoint, restore
from .configs import TrainConfig
from .features import FewShotSet
from .progress import Progress, Silent
from .ship import ShipGenerator, ship_loss
from .text_encoder import ClassPrompts


def make_optimizer(model: ShipGenerator, cfg: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr)


def epoch_batches(data: FewShotSet, batch_size: int,
                  rng: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch: a permutation of the images, each with one of its augmented views (or its clean
    feature when the store has no views). Returns [(x (B, D), labels (B,)), ...]."""
    device = data.labels.device
    order = torch.randperm(data.size, generator=rng, device=device)  # (M,)
    if data.views.shape[1] > 0:
        pick = torch.randint(data.views.shape[1], (data.size,), generator=rng, device=device)
        x = data.views[torch.arange(data.size, device=device), pick]  # (M, D)
    else:
        x = data.clean
    return [(x[idx], data.labels[idx]) for idx in order.split(batch_size)]


def train_ship(model: ShipGenerator, data: FewShotSet, prompts: ClassPrompts, cfg: TrainConfig,
               resume: Checkpoint | None = None,
               on_epoch: Callable[[Checkpoint], None] | None = None,
               progress: Progress | None = None) -> list[dict[str, float]]:
    """Train (or continue training) `model`; returns the per-epoch log. `on_epoch` receives a
    checkpoint after every epoch (the caller decides where it goes)."""
    progress = progress or Silent()
    device = data.labels.device
    optimizer = make_optimizer(model, cfg)
    rng = torch.Generator(device=device)
    rng.manual_seed(cfg.seed)
    log, start = restore(resume, model, optimizer, rng)
    model.train()
    task = progress.task("train generator", cfg.epochs, "epoch")
    task.advance(start)
    try:
        for epoch in range(start, cfg.epochs):
            t0 = time.perf_counter()
            totals = torch.zeros(3, device=device)  # loss, recon, kl (sums over samples)
            for x, y in epoch_batches(data, cfg.batch_size, rng):
                x_hat, mu, logvar = model(x, y, prompts, generator=rng)
                loss, recon, kl = ship_loss(x_hat, x, mu, logvar, model.config.kl_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                totals += torch.stack([loss, recon, kl]).detach() * len(y)
            loss_v, recon_v, kl_v = (totals / data.size).tolist()  # one sync per epoch
            log.append({"epoch": epoch + 1, "loss": loss_v, "recon": recon_v, "kl": kl_v,
                        "seconds": time.perf_counter() - t0})
            task.advance(1)
            task.note(f"loss {loss_v:.4f}")
            if on_epoch is not None:
                on_epoch(Checkpoint(epoch + 1, model.state_dict(), optimizer.state_dict(),
                                    rng.get_state(), list(log)))
    finally:
        task.close()
    model.eval()
    return log
