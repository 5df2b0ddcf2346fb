"""The paper's SYNC-CLIP training loop (METHODS.md, section SYNC-CLIP): the prompted ViT in the
loop, real base-class shots re-cropped every epoch, synthetic images cropped once at start-up,
L = L_real + WEIGHT L_syn + KLWEIGHT L_align (`sync_losses.py`) under Dassl's SGD schedule.

Determinism, so that a killed run resumed from its last epoch checkpoint ends where an
uninterrupted one does: each real image's crop in epoch e is seeded by (seed, image key, e),
each synthetic image's one crop by (seed, key, 0), and every other draw (the epoch's order, the
synthetic batch) comes from one torch.Generator whose state the checkpoint keeps."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoints import Checkpoint, restore
from .configs import HeadConfig
from .head_training import make_optimizer, step_lr, steps_per_epoch
from .identity import Preprocess
from .image_sets import ImageRows, normalize, stack_crops
from .progress import Progress, Silent
from .sync_losses import SyncWeights, align_loss, batch_labels, pool_rows, syn_loss, total_loss
from .sync_prompts import SyncClip

SYNTHETIC_VIEW = 0  # the one crop each synthetic image gets


@dataclass(frozen=True)
class SyncImages:
    """What the loop reads: the real shots (labels: base class ids), the synthetic domain's
    images cropped once (uint8, labels over all classes), and the model's preprocessing."""

    real: ImageRows
    synthetic: torch.Tensor  # (S, 3, H, W) uint8
    synthetic_labels: torch.Tensor  # (S,) int64
    pre: Preprocess


def synthetic_pixels(rows: ImageRows, seed: int, pre: Preprocess) -> torch.Tensor:
    """Every synthetic image transformed once (one seeded crop + flip), as SYNC-CLIP does."""
    return stack_crops(rows, seed, SYNTHETIC_VIEW, pre)


def autocast_for(device: torch.device) -> Any:
    """Mixed precision on CUDA (bfloat16 where supported, else float16), none on the CPU. The
    prompts and the optimizer stay float32; bfloat16 needs no loss scaling."""
    if device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def train_prompted(head: SyncClip, data: SyncImages, n_base: int, new_classes: list[int],
                   cfg: HeadConfig, weights: SyncWeights, resume: Checkpoint | None = None,
                   on_epoch: Callable[[Checkpoint], None] | None = None,
                   progress: Progress | None = None) -> dict[str, Any]:
    """Train `head`'s prompts in place; returns the per-epoch log and the selected epoch (the
    last, as the public code). `on_epoch` receives a checkpoint after every epoch."""
    progress = progress or Silent()
    device = head.ctx.device
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, cfg)
    rng = torch.Generator(device=device)
    rng.manual_seed(cfg.seed)
    log, start = restore(resume, head, optimizer, rng)
    real_labels = data.real.labels.to(device)
    syn_labels = data.synthetic_labels.to(device)
    new = torch.tensor(new_classes, dtype=torch.long, device=device)
    m = len(data.real)
    steps = steps_per_epoch(m, cfg.batch_size, cfg.drop_last)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and
                                  not torch.cuda.is_bf16_supported())
    task = progress.task("train sync-clip", cfg.epochs, "epoch")
    task.advance(start)
    head.train()
    try:
        with ThreadPoolExecutor(1, thread_name_prefix="sync-crops") as pool:
            for epoch in range(start, cfg.epochs):
                t0 = time.perf_counter()
                order = torch.randperm(m, generator=rng, device=device)
                batches = order.split(cfg.batch_size)[:steps]
                totals = torch.zeros(5, device=device)  # loss, real, syn, align, correct
                for step, (idx, pixels) in enumerate(_crops(pool, data, cfg.seed, epoch, batches)):
                    for group in optimizer.param_groups:
                        group["lr"] = step_lr(cfg, epoch, step, steps)
                    y = real_labels[idx]
                    wanted = batch_labels(y, new, rng)
                    syn = data.synthetic[pool_rows(wanted, syn_labels, rng).cpu()]
                    with autocast_for(device):
                        parts = _losses(head, normalize(pixels, data.pre, device),
                                        normalize(syn, data.pre, device), y, wanted, n_base)
                    loss = total_loss(parts[0], parts[1], parts[2], weights)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    stats = torch.stack([loss, *parts[:3]]).detach().float() * len(y)
                    totals += torch.cat([stats, parts[3][None].float()])
                count = max(1, min(m, steps * cfg.batch_size))
                t = (totals / count).tolist()  # one sync per epoch
                log.append({"epoch": epoch + 1, "loss": t[0], "real": t[1], "syn": t[2],
                            "align": t[3], "train_acc": 100 * t[4],
                            "seconds": time.perf_counter() - t0})
                task.advance(1)
                task.note(f"loss {t[0]:.4f}")
                if on_epoch is not None:
                    on_epoch(Checkpoint(epoch + 1, head.state_dict(), optimizer.state_dict(),
                                        rng.get_state(), list(log)))
    finally:
        task.close()
    head.eval()
    return {"log": log, "selected_epoch": cfg.epochs}


def _losses(head: SyncClip, real: torch.Tensor, syn: torch.Tensor, y: torch.Tensor,
            wanted: torch.Tensor, n_base: int) -> tuple[torch.Tensor, ...]:
    """One step's (L_real, L_syn, L_align, correct real predictions)."""
    text = head.text()  # (C, D) both domains' classifier, recomputed from the prompts
    real_raw, syn_raw = (f.float() for f in head.encode_both(real, syn))  # one tower forward
    real_logits = head.logits(real_raw, text[:n_base])
    l_real = F.cross_entropy(real_logits, y)
    l_syn = syn_loss(head.logits(syn_raw, text), wanted)
    l_align = align_loss(syn_raw[: len(y)], real_raw, y)  # raw features, nothing detached
    return l_real, l_syn, l_align, (real_logits.argmax(1) == y).sum()


def _crops(pool: ThreadPoolExecutor, data: SyncImages, seed: int, epoch: int,
           batches: tuple[torch.Tensor, ...]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(batch indices, their uint8 crops) for each batch, the next batch cropped in a thread
    while the model runs on this one."""

    def crop(idx: torch.Tensor) -> torch.Tensor:
        return stack_crops(data.real, seed, epoch, data.pre, index=idx.tolist())

    ahead: Future[torch.Tensor] | None = pool.submit(crop, batches[0]) if batches else None
    for i, idx in enumerate(batches):
        assert ahead is not None
        pixels = ahead.result()
        ahead = pool.submit(crop, batches[i + 1]) if i + 1 < len(batches) else None
        yield idx, pixels
