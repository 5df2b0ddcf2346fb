"""SYNC-CLIP's costs, measured side by side in one run, on random weights (no download):

1. the prompted training step (SYNC-CLIP's: B real + 2B synthetic images through the prompted
   ViT, the deep-prompted text encoder over every class, the three losses, backward, SGD step)
   in images/s, against a bare open_clip `encode_image` forward + backward on the same images;
   the ratio is the prompts' overhead (target >= 0.8);
2. one training epoch of the feature-space variant (sync-clip-fs, on cached features) against
   one of the paper's method (sync-clip, the ViT in the loop, crops included), same shots.

    python bench/sync_clip.py                          # random ViT-B-16 on the CPU
    python bench/sync_clip.py --model shipyard-tiny --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shipyard.pipeline.configs import HeadConfig, PromptDesign  # noqa: E402
from shipyard.pipeline.features import FewShotSet  # noqa: E402
from shipyard.pipeline.head_training import make_optimizer  # noqa: E402
from shipyard.pipeline.heads import SyncClipFS  # noqa: E402
from shipyard.pipeline.image_sets import ImageRows, normalize, stack_crops  # noqa: E402
from shipyard.pipeline.manifest import ModelSpec  # noqa: E402
from shipyard.pipeline.models import load_clip  # noqa: E402
from shipyard.pipeline.sync_clip import DomainPool, train_sync  # noqa: E402
from shipyard.pipeline.sync_losses import SyncWeights, total_loss  # noqa: E402
from shipyard.pipeline.sync_prompted import SyncImages, _losses, autocast_for, train_prompted  # noqa: E402
from shipyard.pipeline.sync_prompts import PromptedVision, SyncClip  # noqa: E402
from shipyard.pipeline.text_encoder import PromptEncoder  # noqa: E402

DEMO = ROOT / "examples" / "fashion_demo" / "images"
NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
         "ankle boot")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn: Any, reps: int, device: torch.device) -> float:
    """Median seconds of `fn()` over `reps` runs, after one warm-up run."""
    fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _demo_images(n: int) -> list[Image.Image]:
    files = sorted(DEMO.rglob("*.png"))[:n]
    return [Image.open(f).convert("RGB") for f in files]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=8, help="real images per step (SYNC-CLIP: 8)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--shots", type=int, default=4, help="shots per base class for the epochs")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clip = load_clip(ModelSpec(name=args.model), device)
    pre, cfg = clip.preprocess, HeadConfig(epochs=1, batch_size=args.batch, warmup_epochs=0)
    torch.manual_seed(0)
    text, vision = PromptEncoder.from_clip(clip), PromptedVision(clip.model.visual)
    head = SyncClip(text, vision, NAMES, cfg, PromptDesign()).to(device).train()
    b = args.batch
    g = torch.Generator().manual_seed(0)
    real = torch.randn(b, 3, pre.size, pre.size, generator=g).to(device)
    syn = torch.randn(2 * b, 3, pre.size, pre.size, generator=g).to(device)
    y = torch.arange(b, device=device) % 5
    wanted = torch.cat([y, 5 + torch.arange(b, device=device) % 5])
    optimizer = make_optimizer([p for p in head.parameters() if p.requires_grad], cfg)
    weights = SyncWeights()

    def prompted_step() -> None:
        with autocast_for(device):
            parts = _losses(head, real, syn, y, wanted, n_base=5)
        loss = total_loss(parts[0], parts[1], parts[2], weights)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    both = torch.cat([real, syn])

    def bare_step() -> None:
        x = both.detach().requires_grad_(True)  # gradients through every block, as the prompts'
        with autocast_for(device):
            out = clip.model.encode_image(x, normalize=False)
        out.float().pow(2).mean().backward()

    def text_step() -> None:  # the deep-prompted text encoder over every class, and back
        head.class_features().pow(2).mean().backward()

    images = 3 * b
    t_text = _timed(text_step, args.reps, device)
    t_prompted = _timed(prompted_step, args.reps, device)
    t_bare = _timed(bare_step, args.reps, device)
    print(f"{args.model} on {device}, {torch.get_num_threads()} threads, {b} real + {2 * b} "
          f"synthetic images per step, {len(NAMES)} classes, prompt depth {head.depths()}")
    print(f"  prompted SYNC-CLIP step: {t_prompted:.3f} s ({images / t_prompted:.1f} images/s)")
    print(f"  bare forward + backward: {t_bare:.3f} s ({images / t_bare:.1f} images/s)")
    print(f"  of the prompted step, the text encoder over {len(NAMES)} classes: {t_text:.3f} s")
    print(f"  ratio prompted / bare images/s: {t_bare / t_prompted:.3f} (target >= 0.8)")

    # One epoch each on the same shots: 5 base classes x shots, 16 synthetic per class.
    m = 5 * args.shots
    pictures = _demo_images(m + 16 * 10)
    keys = np.stack([np.frombuffer(i.to_bytes(32, "little"), np.uint8) for i in range(len(pictures))])
    rows = ImageRows(tuple(pictures[:m]), keys[:m], torch.arange(5).repeat_interleave(args.shots))
    syn_rows = ImageRows(tuple(pictures[m:]), keys[m:], torch.arange(10).repeat_interleave(16))
    data = SyncImages(rows, stack_crops(syn_rows, 0, 0, pre), syn_rows.labels, pre)
    cfg_epoch = HeadConfig(epochs=1, batch_size=b, warmup_epochs=0)

    def online_epoch() -> None:
        fresh = SyncClip(text, vision, NAMES, cfg_epoch, PromptDesign()).to(device)
        train_prompted(fresh, data, 5, [5, 6, 7, 8, 9], cfg_epoch, weights)

    dim = clip.embed_dim
    with torch.no_grad():
        feats = F.normalize(clip.model.encode_image(normalize(
            stack_crops(rows, 0, 0, pre), pre, device)).float(), dim=-1)
        pool = F.normalize(clip.model.encode_image(normalize(data.synthetic, pre, device)).float(),
                           dim=-1)
    shots = FewShotSet(NAMES[:5], rows.labels.to(device), feats, torch.zeros(m, 0, dim, device=device),
                       "bench", clean_norms=torch.ones(m, device=device),
                       view_norms=torch.zeros(m, 0, device=device))
    domain = DomainPool(pool, torch.ones(len(pool), device=device), syn_rows.labels.to(device))

    def feature_epoch() -> None:
        fs = SyncClipFS(text, NAMES, cfg_epoch).to(device)
        train_sync(fs, shots, domain, [5, 6, 7, 8, 9], cfg_epoch, weights)

    reps = max(1, args.reps - 1)
    t_online, t_fs = _timed(online_epoch, reps, device), _timed(feature_epoch, reps, device)
    print(f"one epoch, {m} real shots, batch {b} ({m // b} steps):")
    print(f"  sync-clip (ViT in the loop): {t_online:.3f} s")
    print(f"  sync-clip-fs (cached features): {t_fs:.4f} s")
    print(f"  ratio online / feature-space epoch time: {t_online / t_fs:.1f}x")


if __name__ == "__main__":
    main()
