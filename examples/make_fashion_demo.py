"""Build the embedded demo: a seeded subset of Fashion-MNIST as PNG files in CoOp's split format.

Reads the IDX files of Debian's `dataset-fashion-mnist` package (apt-get install
dataset-fashion-mnist) and writes `examples/fashion_demo/`. The output is committed; this script
documents how it was made and regenerates it byte for byte.
"""

from __future__ import annotations

import argparse
import gzip
import json
import struct
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
# Fashion-MNIST's label order; names as CLIP prompts read them.
CLASSNAMES = ["t-shirt", "trouser", "pullover", "dress", "coat",
              "sandal", "shirt", "sneaker", "bag", "ankle boot"]
PER_CLASS = {"train": 32, "val": 8, "test": 60}


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    _zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if dtype_code != 0x08:
        raise ValueError(f"{path}: expected unsigned byte IDX data")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def demo_indices(split_file: Path) -> set[int]:
    """Indices into Fashion-MNIST's training set that a split written by this script uses (its
    files are named `<pool>_<index>.png`; the test pool is Fashion-MNIST's test set)."""
    split = json.loads(split_file.read_text("utf-8"))
    return {int(Path(rel).stem.removeprefix("train_")) for rows in split.values()
            for rel, _label, _name in rows if Path(rel).stem.startswith("train_")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "fashion_demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    pools = {
        "train": (read_idx(SOURCE / "train-images-idx3-ubyte.gz"),
                  read_idx(SOURCE / "train-labels-idx1-ubyte.gz")),
        "test": (read_idx(SOURCE / "t10k-images-idx3-ubyte.gz"),
                 read_idx(SOURCE / "t10k-labels-idx1-ubyte.gz")),
    }
    split: dict[str, list[list[object]]] = {"train": [], "val": [], "test": []}
    for label, name in enumerate(CLASSNAMES):
        folder = name.replace(" ", "_").replace("-", "_")
        # train and val are disjoint draws from Fashion-MNIST's train set, test from its test set.
        train_idx = rng.permutation(np.flatnonzero(pools["train"][1] == label))
        test_idx = rng.permutation(np.flatnonzero(pools["test"][1] == label))
        picks = {
            "train": ("train", train_idx[: PER_CLASS["train"]]),
            "val": ("train", train_idx[PER_CLASS["train"] : PER_CLASS["train"] + PER_CLASS["val"]]),
            "test": ("test", test_idx[: PER_CLASS["test"]]),
        }
        for split_name, (pool, indices) in picks.items():
            images = pools[pool][0]
            for i in sorted(int(j) for j in indices):
                rel = f"{folder}/{pool}_{i:05d}.png"
                dest = args.out / "images" / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(images[i], mode="L").save(dest, optimize=True)
                split[split_name].append([rel, label, name])
    (args.out / "split_zhou_FashionDemo.json").write_text(json.dumps(split, indent=1) + "\n")
    counts = {k: len(v) for k, v in split.items()}
    print(f"wrote {sum(counts.values())} images to {args.out}: {counts}")


if __name__ == "__main__":
    main()
