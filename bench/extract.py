"""`extract` throughput vs the bare model forward on the same images, measured side by side.

The bare forward gets images already decoded and preprocessed into one tensor; `extract` does
everything itself (hash, read, verify, decode, preprocess, forward, cast, chunked Zarr writes).
The ratio says how well that work hides behind the model (target >= 0.7 on a 2-core CPU).

    python bench/extract.py                     # random-init ViT-B-16, 256 demo images
    python bench/extract.py --model shipyard-tiny --images 1000
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shipyard.pipeline.manifest_files import load_manifest  # noqa: E402
from shipyard.pipeline.models import encode_images, load_clip  # noqa: E402
from shipyard.pipeline.preprocess import clean_view, decode  # noqa: E402
from shipyard.stages.commands import stage_command  # noqa: E402
from shipyard.stages.runner import Request  # noqa: E402

DEMO = ROOT / "examples" / "fashion_demo"


def make_manifest(work: Path, model: str, n: int, batch: int, workers: int) -> Path:
    split = json.loads((DEMO / "split_zhou_FashionDemo.json").read_text())
    rows = (split["test"] + split["train"])[:n]
    (work / "split.json").write_text(json.dumps({"train": [], "val": [], "test": rows}))
    manifest = {
        "store": str(work / "store.zarr"),
        "model": {"name": model},
        "extraction": {"views": 0, "batch_size": batch, "workers": workers},
        "datasets": [{"name": "bench", "format": "coop", "root": str(DEMO / "images"),
                      "split_file": str(work / "split.json")}],
    }
    path = work / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def bare_forward(manifest_path: Path, batch: int, reps: int, device: str = "cpu") -> float:
    """Images/s of model.encode_image alone on pre-made input tensors."""
    m = load_manifest(manifest_path)
    clip = load_clip(m.model, torch.device(device))
    split = json.loads(m.datasets[0].split_file.read_text())  # type: ignore[union-attr]
    paths = [m.datasets[0].root / row[0] for row in split["test"]]
    x = torch.stack([clean_view(decode(p.read_bytes(), str(p)), clip.preprocess) for p in paths])
    encode_images(clip, x[:batch])  # warm-up
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            encode_images(clip, x[i : i + batch])
        rates.append(len(x) / (time.perf_counter() - t0))
    return statistics.median(rates)


def extract_rate(manifest_path: Path, reps: int, device: str = "cpu") -> tuple[float, float]:
    """(encode-phase images/s, end-to-end images/s) of the extract stage on a fresh store."""
    m = load_manifest(manifest_path)
    phase, total = [], []
    for _ in range(reps):
        shutil.rmtree(m.store, ignore_errors=True)
        t0 = time.perf_counter()
        out = stage_command(m, "extract", Request(methods=()), device=device,
                            cache_dir=Path(m.store).parent / "cache")
        total.append(out["extracted"] / (time.perf_counter() - t0))
        phase.append(out["images_per_second"])
    return statistics.median(phase), statistics.median(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT-B-16")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (encode_images returns to the "
                        "host, so every timing includes the device sync)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = make_manifest(Path(tmp), args.model, args.images, args.batch, args.workers)
        extract_rate(path, 1, args.device) if args.model == "shipyard-tiny" else None  # warm cache
        bare = bare_forward(path, args.batch, args.reps, args.device)
        phase, total = extract_rate(path, args.reps, args.device)
    print(f"model {args.model}, {args.images} demo images, batch {args.batch}, "
          f"{args.workers} decode workers, {torch.get_num_threads()} torch threads")
    print(f"{'':34}{'images/s':>10}")
    print(f"{'bare model forward (pre-decoded)':34}{bare:>10.1f}")
    print(f"{'extract, encode phase':34}{phase:>10.1f}")
    print(f"{'extract, end to end (+load, hash)':34}{total:>10.1f}")
    print(f"ratio extract/bare: encode phase {phase / bare:.2f}, end to end {total / bare:.2f} "
          f"(target >= 0.7)")


if __name__ == "__main__":
    main()
