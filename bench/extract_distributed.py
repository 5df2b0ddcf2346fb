"""`extract` in-process against `extract --workers N`, side by side on the same images: images/s
of each (clean features only, no views), their ratios to the in-process rate, and the per-block
scheduling overhead (no-op blocks through the same submit window). Two rates per run: the whole
encode phase (for workers it includes each worker loading the model on its first block) and the
steady state, from the commit times of the blocks after the first four.

    python bench/extract_distributed.py                     # random ViT-B-16, 256 demo images
    python bench/extract_distributed.py --model shipyard-tiny --images 600
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
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shipyard.pipeline.cluster import ClusterSpec, session  # noqa: E402
from shipyard.pipeline.manifest_files import load_manifest  # noqa: E402
from shipyard.pipeline.progress import SilentTask  # noqa: E402
from shipyard.stages.commands import stage_command  # noqa: E402
from shipyard.stages.runner import Request  # noqa: E402

DEMO = ROOT / "examples" / "fashion_demo"


def _manifest(work: Path, name: str, model: str, images: int, batch: int, threads: int) -> Path:
    split = json.loads((DEMO / "split_zhou_FashionDemo.json").read_text())
    rows = (split["train"] + split["val"] + split["test"])[:images]
    (work / "split.json").write_text(json.dumps({"train": rows, "val": [], "test": []}))
    manifest = {"store": str(work / f"{name}.zarr"), "model": {"name": model},
                "extraction": {"views": 0, "batch_size": batch, "chunk_rows": batch,
                               "workers": threads},
                "datasets": [{"name": "demo", "format": "coop", "root": str(DEMO / "images"),
                              "split_file": str(work / "split.json"), "shots": 1, "seeds": [1]}]}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


class Commits:
    """A Progress that records when each committed block advanced the encode task."""

    def __init__(self) -> None:
        self.times: list[tuple[float, int]] = []

    def task(self, description: str, total: int | None, unit: str) -> Any:
        owner, mine = self, description == "encode images"

        class _Task(SilentTask):
            def advance(self, n: int = 1) -> None:
                if mine:
                    owner.times.append((time.perf_counter(), n))

        return _Task()

    def gaps(self) -> list[int]:
        return [round(1000 * (b[0] - a[0])) for a, b in zip(self.times, self.times[1:], strict=False)]

    def steady_rate(self, skip: int = 4) -> float:
        if len(self.times) <= skip + 1:
            return float("nan")
        (t0, _), rest = self.times[skip], self.times[skip + 1 :]
        return sum(n for _, n in rest) / (rest[-1][0] - t0)


def _noop(_block: int) -> int:
    return _block


def overhead(workers: int, blocks: int) -> float:
    """Seconds per block the scheduler and the transfers add: no-op blocks, a window of two per
    worker in flight, as the driver submits them."""
    with session(ClusterSpec(workers=workers)) as client:
        client.submit(_noop, -1, pure=False).result()  # warm
        t0 = time.perf_counter()
        window: list[Any] = []
        for b in range(blocks):
            window.append(client.submit(_noop, b, pure=False))
            if len(window) >= 2 * workers:
                window.pop(0).result()
        for f in window:
            f.result()
        return (time.perf_counter() - t0) / blocks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32, help="images per block (and chunk rows)")
    ap.add_argument("--verbose", action="store_true", help="print the gaps between commits")
    args = ap.parse_args()
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        configs = [("in-process, 2 threads", None, 2), ("1 worker", ClusterSpec(workers=1), 1),
                   ("2 workers", ClusterSpec(workers=2), 1)]
        for label, cluster, threads in configs:
            torch.set_num_threads(threads)
            name = label.split(",")[0].replace(" ", "-")
            path = _manifest(work, name, args.model, args.images, args.batch, threads)
            commits = Commits()
            t0 = time.perf_counter()
            out = stage_command(load_manifest(path), "extract", Request(methods=()), device="cpu",
                                cache_dir=work / "cache", cluster=cluster, progress=commits)
            wall = time.perf_counter() - t0
            encode = out["timings"]["encode"]
            rows.append((label, out["extracted"] / encode, commits.steady_rate(), encode, wall))
            if args.verbose:
                print(label, "ms between commits:", commits.gaps())
            shutil.rmtree(work / f"{name}.zarr")
        per_block = statistics.median(overhead(2, 64) for _ in range(3))
    base, steady_base = rows[0][1], rows[0][2]
    print(f"{args.model}, {args.images} images, blocks of {args.batch} (clean features only)")
    for label, rate, steady, encode, wall in rows:
        print(f"  {label:22s} encode {rate:7.2f} images/s (ratio {rate / base:.3f}), steady "
              f"{steady:7.2f} images/s (ratio {steady / steady_base:.3f}); encode {encode:6.1f} s, "
              f"command {wall:6.1f} s")
    print(f"  per-block scheduling overhead (2 workers, no-op blocks): {1000 * per_block:.1f} ms")


if __name__ == "__main__":
    main()
