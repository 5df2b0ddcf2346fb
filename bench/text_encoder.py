"""Benchmark of prompt-injected text encoding (SHIP / CoOp hot path): forward + backward time per
batch, full 77-token sequences against sequences cut after the batch's (or group's) last EOS.

    python bench/text_encoder.py --models shipyard-tiny ViT-B-16 --reps 5 [--threads 1]

When other processes share the cores, `--threads 1` gives steadier figures: multi-threaded
kernels stall at every barrier whose partner thread was descheduled.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in the repo

from shipyard.pipeline.manifest import ModelSpec
from shipyard.pipeline.models import load_clip
from shipyard.pipeline.text_encoder import ClassPrompts, PromptEncoder

# Realistic names from the 11 base-to-new datasets, one to six words long.
CLASS_NAMES = [
    "cat", "goldfish", "tabby cat", "golden retriever", "american pit bull terrier",
    "Boeing 737-800", "pink primrose", "bird of paradise", "apple pie", "eggs benedict",
    "banded", "Annual Crop Land", "Permanent Crop Land", "Apply Eye Makeup",
    "Playing Daf", "2012 Tesla Model S", "1994 Audi 100 Sedan", "great white shark",
    "indoor cathedral", "outdoor athletic field",
]


def _step(encoder: PromptEncoder, ctx: torch.Tensor, bias: torch.Tensor | None,
          labels: torch.Tensor, prompts: ClassPrompts, truncate: bool) -> torch.Tensor:
    ctx.grad = None
    if bias is not None:
        bias.grad = None
    out = encoder(ctx, labels, prompts, bias, truncate=truncate)  # (B, D)
    out.sum().backward()
    return out.detach()


def _time_modes(modes: dict[str, tuple[PromptEncoder, bool]], inputs: tuple, reps: int,
                warmup: int) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Median wall time (ms) per mode and each mode's first output. Repetitions are interleaved
    across modes, so load from other processes weighs on every mode alike."""
    outputs = {key: _step(enc, *inputs, cut) for key, (enc, cut) in modes.items()}  # warm-up 1
    for _ in range(warmup - 1):
        for enc, cut in modes.values():
            _step(enc, *inputs, cut)
    times: dict[str, list[float]] = {key: [] for key in modes}
    for _ in range(reps):
        for key, (enc, cut) in modes.items():
            start = time.perf_counter()
            _step(enc, *inputs, cut)
            if inputs[2].is_cuda:  # labels: kernels are asynchronous, wait for them
                torch.cuda.synchronize()
            times[key].append(time.perf_counter() - start)
    return {key: 1e3 * statistics.median(t) for key, t in times.items()}, outputs


def bench_model(name: str, args: argparse.Namespace) -> dict[str, float | int | str]:
    device = torch.device(args.device)
    clip = load_clip(ModelSpec(name=name), device)
    single = PromptEncoder.from_clip(clip)
    grouped = PromptEncoder.from_clip(clip, length_groups=args.groups)
    prompts = single.class_prompts(CLASS_NAMES, n_ctx=args.n_ctx)
    reps = args.reps if single.width < 512 else args.large_reps
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(len(CLASS_NAMES), (args.batch,), generator=gen).to(device)  # (B,)
    ctx = (0.02 * torch.randn(args.n_ctx, single.width, generator=gen)).to(device).requires_grad_(True)
    bias = None
    if args.bias:
        bias = (0.02 * torch.randn(args.batch, single.width, generator=gen)).to(device).requires_grad_(True)
    modes = {"full_ms": (single, False), "cut_ms": (single, True), "grouped_ms": (grouped, True)}
    medians, outputs = _time_modes(modes, (ctx, bias, labels, prompts), reps, args.warmup)
    diff = max(float((outputs[key] - outputs["full_ms"]).abs().max()) for key in modes)
    return {"model": name, "W": single.width, "layers": len(single.transformer.resblocks),
            "L": int(prompts.eos[labels].max()) + 1, "reps": reps, **medians, "max_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["shipyard-tiny", "ViT-B-16"],
                        help="open_clip model names (random weights) or shipped configs")
    parser.add_argument("--batch", type=int, default=256, help="prompts per batch")
    parser.add_argument("--n-ctx", type=int, default=4, help="context vectors per prompt")
    parser.add_argument("--reps", type=int, default=7, help="timed repetitions (small models)")
    parser.add_argument("--large-reps", type=int, default=2,
                        help="timed repetitions for models with text width >= 512")
    parser.add_argument("--warmup", type=int, default=1, help="untimed repetitions first (>= 1)")
    parser.add_argument("--groups", type=int, default=4,
                        help="length groups for the third column (PromptEncoder.length_groups)")
    parser.add_argument("--bias", action=argparse.BooleanOptionalAction, default=True,
                        help="add a per-sample bias to the context (SHIP) or not (CoOp)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # open_clip warns about random weights
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
          f"{args.n_ctx} context tokens, bias={args.bias}, {len(CLASS_NAMES)} class names; "
          f"median forward+backward time per batch; load average {os.getloadavg()[0]:.1f}")
    header = (f"{'model':<16}{'W':>5}{'layers':>7}{'L':>4}{'reps':>5}{'full ms':>10}"
              f"{'cut ms':>10}{'speedup':>8}{f'cut/{args.groups}g ms':>12}{'speedup':>8}"
              f"{'max|diff|':>10}")
    print(header)
    print("-" * len(header))
    for name in args.models:
        r = bench_model(name, args)
        full, cut, grouped = (float(r[k]) for k in ("full_ms", "cut_ms", "grouped_ms"))
        print(f"{r['model']:<16}{r['W']:>5}{r['layers']:>7}{r['L']:>4}{r['reps']:>5}"
              f"{full:>10.1f}{cut:>10.1f}{full / cut:>7.1f}x{grouped:>12.1f}{full / grouped:>7.1f}x"
              f"{r['max_diff']:>10.1e}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f} (other processes share these cores)")


if __name__ == "__main__":
    main()
