"""Build the demo's stand-in synthetic domain: 16 generated images per class for the demo's 10
classes, written as an image folder per class (`examples/fashion_synthetic/`).

SYNC-CLIP's second domain is text-to-image output (Stable Diffusion, or CaFo's DALL-E release)
for every class, base and new. No text-to-image model can be had offline, so this stands in for
one: per class, a Gaussian sampler in pixel space (the class mean plus the top principal
components, fitted on 300 Fashion-MNIST training images of that class, none of them the demo's)
draws new images, and a rendering shift (gamma 0.6, which brightens mid-tones, and a 3x3 blur)
makes them a domain of their own, as generated images are: plausible members of their class,
smoother and differently lit than the photographs. Seeded and deterministic; the output is
committed and this script regenerates it byte for byte.

    python examples/make_fashion_synthetic.py   # after apt-get install dataset-fashion-mnist
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from make_fashion_demo import CLASSNAMES, SOURCE, demo_indices, read_idx
from PIL import Image

HERE = Path(__file__).resolve().parent
PER_CLASS = 16  # SYNC-CLIP's count per class
FIT = 300  # training images per class the sampler is fitted on
COMPONENTS = 24  # principal components kept per class
GAMMA = 0.6


def fit_and_sample(images: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """A Gaussian in pixel space (mean + top principal directions) fitted on `images` (N, 28, 28)
    uint8 -> `count` samples (count, 28, 28) float in 0..255."""
    x = images.reshape(len(images), -1).astype(np.float64)
    mean = x.mean(axis=0)
    _u, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    scale = s[:COMPONENTS] / np.sqrt(len(x) - 1)  # standard deviation along each direction
    z = rng.standard_normal((count, COMPONENTS)) * scale
    return np.clip(mean + z @ vt[:COMPONENTS], 0, 255).reshape(count, *images.shape[1:])


def render(sample: np.ndarray) -> np.ndarray:
    """The rendering shift: gamma, then a 3x3 box blur (edges replicated) -> uint8."""
    shifted = 255.0 * (sample / 255.0) ** GAMMA
    padded = np.pad(shifted, 1, mode="edge")
    h, w = shifted.shape
    blurred = sum(padded[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0
    return np.clip(np.rint(blurred), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", type=Path, default=SOURCE,
                        help="folder with Fashion-MNIST's IDX files")
    parser.add_argument("--split", type=Path, default=HERE / "fashion_demo" / "split_zhou_FashionDemo.json",
                        help="the demo's split file: its images are never fitted on")
    parser.add_argument("--out", type=Path, default=HERE / "fashion_synthetic")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images = read_idx(args.source / "train-images-idx3-ubyte.gz")
    labels = read_idx(args.source / "train-labels-idx1-ubyte.gz")
    excluded = demo_indices(args.split)
    rng = np.random.default_rng(args.seed)
    written = 0
    for label, name in enumerate(CLASSNAMES):
        pool = np.array([i for i in np.flatnonzero(labels == label) if int(i) not in excluded])
        fit = np.sort(rng.permutation(pool)[:FIT])
        folder = args.out / name.replace(" ", "_")  # the reader reads `_` as a space
        folder.mkdir(parents=True, exist_ok=True)
        for k, sample in enumerate(fit_and_sample(images[fit], PER_CLASS, rng)):
            Image.fromarray(render(sample), mode="L").save(folder / f"gen_{k:02d}.png", optimize=True)
            written += 1
    print(f"wrote {written} images to {args.out} ({PER_CLASS} per class, {len(CLASSNAMES)} classes)")


if __name__ == "__main__":
    main()
