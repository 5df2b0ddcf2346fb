"""Seconds per SHIP training epoch: shipyard's loop on cached features vs a reference loop that,
like the public SHIP code, re-reads and re-augments the images every step, runs the image encoder
on them, and runs the text encoder at full length. Same model, generator sizes, images and batch.

    python bench/generator.py                              # shipyard-tiny and random ViT-B-16
    python bench/generator.py --models ViT-B-16 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shipyard.pipeline.configs import ShipConfig, TrainConfig  # noqa: E402
from shipyard.pipeline.features import FewShotSet, fewshot_set  # noqa: E402
from shipyard.pipeline.generator_training import make_optimizer, train_ship  # noqa: E402
from shipyard.pipeline.manifest import AugmentSpec  # noqa: E402
from shipyard.pipeline.manifest_files import load_manifest  # noqa: E402
from shipyard.pipeline.models import load_clip  # noqa: E402
from shipyard.pipeline.preprocess import augmented_views, decode  # noqa: E402
from shipyard.pipeline.ship import ShipGenerator, ship_loss  # noqa: E402
from shipyard.pipeline.store import FeatureStore  # noqa: E402
from shipyard.pipeline.text_encoder import PromptEncoder  # noqa: E402
from shipyard.stages.commands import stage_command  # noqa: E402
from shipyard.stages.runner import Request  # noqa: E402

DEMO = ROOT / "examples" / "fashion_demo"


def prepare(work: Path, model: str, views: int, device: str = "cpu") -> tuple[Path, float]:
    """Extract the demo's 16-shot set (seed 1) with `model`; returns (manifest, seconds)."""
    manifest = {
        "store": str(work / "store.zarr"),
        "model": {"name": model},
        "extraction": {"views": views, "views_for": "fewshot", "batch_size": 32},
        "datasets": [{"name": "demo", "format": "coop", "root": str(DEMO / "images"),
                      "split_file": str(DEMO / "split_zhou_FashionDemo.json"),
                      "shots": 16, "seeds": [1]}],
    }
    split = json.loads((DEMO / "split_zhou_FashionDemo.json").read_text())
    (work / "split.json").write_text(json.dumps({"train": split["train"], "val": [], "test": []}))
    manifest["datasets"][0]["split_file"] = str(work / "split.json")  # type: ignore[index]
    path = work / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest))
    t0 = time.perf_counter()
    stage_command(load_manifest(path), "extract", Request(methods=()), device=device,
                  cache_dir=work / "cache")
    return path, time.perf_counter() - t0


def cached_epochs(gen: ShipGenerator, data: FewShotSet, epochs: int, batch: int) -> list[float]:
    prompts = gen.decoder.class_prompts(data.classnames, gen.config.n_ctx)
    log = train_ship(gen, data, prompts, TrainConfig(epochs=epochs + 1, batch_size=batch))
    return [e["seconds"] for e in log[1:]]  # the first epoch warms up


def reference_epochs(gen: ShipGenerator, clip: object, images: list[bytes], labels: torch.Tensor,
                     names: tuple[str, ...], epochs: int, batch: int) -> list[float]:
    """Per step: decode + RandomResizedCrop/flip, image encoder, full-length (77) text encoder."""
    prompts = gen.decoder.class_prompts(names, gen.config.n_ctx)
    optimizer = make_optimizer(gen, TrainConfig())
    aug, pre = AugmentSpec(scale=(0.5, 1.0)), clip.preprocess  # type: ignore[attr-defined]
    rng = torch.Generator().manual_seed(0)
    times = []
    for epoch in range(epochs + 1):
        t0 = time.perf_counter()
        for idx in torch.randperm(len(images), generator=rng).split(batch):
            view = int(torch.randint(1 << 30, (1,), generator=rng))
            x = torch.cat([augmented_views(decode(images[i], "img"), view.to_bytes(32, "little"),
                                           1, epoch, aug, pre) for i in idx.tolist()])
            with torch.no_grad():
                x = clip.model.encode_image(x.to(labels.device), normalize=True)  # type: ignore[attr-defined]
            mu, logvar = gen.encode(x)
            z = mu + torch.randn(mu.shape, generator=rng).to(mu) * torch.exp(0.5 * logvar)
            x_hat = gen.decoder(gen.prompt, labels[idx], prompts, bias=gen.bias_generator(z),
                                truncate=False)
            loss, _, _ = ship_loss(x_hat, x, mu, logvar)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if labels.is_cuda:  # kernels are asynchronous: wait for them before reading the clock
            torch.cuda.synchronize()
        if epoch:  # the first epoch warms up
            times.append(time.perf_counter() - t0)
    return times


def bench_model(name: str, epochs: int, views: int, batch: int,
                device: str = "cpu") -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path, extract_s = prepare(Path(tmp), name, views, device)
        m = load_manifest(path)
        clip = load_clip(m.model, torch.device(device))
        with FeatureStore.open(m.store) as store:
            ex = store.extractor(store.extractor_fps()[0])
            ds = store.dataset("demo")
            base = ds.base_labels
            data = fewshot_set(ds, ex, 16, 1, base, clip.device)
            rows = ds.fewshot(16, 1)
            rows = rows[torch.isin(torch.from_numpy(ds.labels()[rows]), torch.tensor(base)).numpy()]
            paths = [ds.paths()[r] for r in rows]
        images = [(DEMO / "images" / p).read_bytes() for p in paths]
        torch.manual_seed(0)
        gen = ShipGenerator(PromptEncoder.from_clip(clip), ShipConfig())
        cached = statistics.median(cached_epochs(gen, data, epochs, batch))
        torch.manual_seed(0)
        gen = ShipGenerator(PromptEncoder.from_clip(clip), ShipConfig())
        ref = statistics.median(reference_epochs(gen, clip, images, data.labels,
                                                 data.classnames, epochs, batch))
    return {"images": float(data.size), "extract_once_s": extract_s, "cached_s": cached,
            "reference_s": ref}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["shipyard-tiny", "ViT-B-16"])
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up)")
    parser.add_argument("--views", type=int, default=4, help="cached augmented views per image")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    print(f"SHIP epoch on the demo's base 16-shot set, batch {args.batch}, "
          f"{torch.get_num_threads()} torch threads; median of {args.epochs} epochs")
    print(f"{'model':16}{'images':>8}{'extract once':>14}{'reference':>12}{'cached':>10}{'ratio':>8}")
    for name in args.models:
        r = bench_model(name, args.epochs, args.views, args.batch, args.device)
        print(f"{name:16}{int(r['images']):>8}{r['extract_once_s']:>13.2f}s{r['reference_s']:>11.3f}s"
              f"{r['cached_s']:>9.3f}s{r['reference_s'] / r['cached_s']:>7.1f}x")
    print("target: cached >= 10x faster than the reference per epoch")


if __name__ == "__main__":
    main()
