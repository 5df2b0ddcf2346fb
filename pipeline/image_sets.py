"""Images read back for methods that run the image encoder in their loop (SYNC-CLIP's prompted
ViT): a stored dataset's rows, read from the manifest's image root and checked against the
content keys they were stored under, so a method trains and scores on exactly the images the
plan named. Pixels are kept as uint8 (3, S, S) after the crop; normalizing on the device gives
the same tensor as `preprocess.clean_view`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image

from .errors import ImageError, UsageError
from .identity import Preprocess
from .manifest import AugmentSpec, DatasetSpec
from .preprocess import decode, interpolation_mode, random_resized_crop, view_rng
from .records import StoredDataset

# Dassl's RandomResizedCrop + flip, which SYNC-CLIP's real and synthetic images go through.
DASSL_CROP = AugmentSpec(scale=(0.08, 1.0))


@dataclass(frozen=True)
class ImageRows:
    """Decoded images of some rows of a stored dataset, with their keys and labels."""

    images: tuple[Image.Image, ...]
    keys: np.ndarray  # (N, 32) uint8 content keys
    labels: torch.Tensor  # (N,) int64, the dataset's class ids

    def __len__(self) -> int:
        return len(self.images)


def read_rows(spec: DatasetSpec, ds: StoredDataset, rows: np.ndarray,
              max_pixels: int) -> ImageRows:
    """The images of `rows`, each file's sha256 checked against its stored key: an image that
    changed, vanished or no longer decodes since `extract` stored it is refused in one line."""
    paths, keys = ds.paths(), ds.keys()[rows]
    images = []
    for row, key in zip(rows.tolist(), keys, strict=True):
        name = paths[row]
        try:
            data = (spec.images / name).read_bytes()
        except OSError as exc:
            raise UsageError(f"dataset {spec.name}: cannot read {name} "
                             f"({exc.strerror or exc}); run `shipyard extract`") from None
        if hashlib.sha256(data).digest() != key.tobytes():
            raise UsageError(f"dataset {spec.name}: {name} changed since it was extracted; run "
                             "`shipyard extract`")
        try:
            images.append(decode(data, name, max_pixels))
        except ImageError as exc:
            raise UsageError(f"dataset {spec.name}: {exc}") from None
    return ImageRows(tuple(images), keys, torch.from_numpy(ds.labels()[rows].astype(np.int64)))


def _pixels(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (3, H, W) uint8."""
    return torch.from_numpy(np.array(img, dtype=np.uint8, copy=True)).permute(2, 0, 1)


def clean_pixels(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    """The clean test-time view (short side resize, center crop) as uint8 (3, S, S)."""
    img = TF.resize(img, pre.size, interpolation=interpolation_mode(pre))
    return _pixels(TF.center_crop(img, [pre.size, pre.size]))


def crop_pixels(img: Image.Image, key: bytes, seed: int, view: int, aug: AugmentSpec,
                pre: Preprocess) -> torch.Tensor:
    """One seeded RandomResizedCrop(+flip) of an image as uint8 (3, S, S): the same crop for the
    same (seed, key, view) in any process, so a resumed training sees what it would have."""
    box = random_resized_crop(img.width, img.height, aug, view_rng(seed, key, view))
    crop = TF.resized_crop(img, box.top, box.left, box.height, box.width, [pre.size, pre.size],
                           interpolation=interpolation_mode(pre))
    return _pixels(TF.hflip(crop) if box.flip else crop)


def stack_clean(rows: ImageRows, pre: Preprocess) -> torch.Tensor:
    """(N, 3, S, S) uint8 clean views of every image."""
    if not len(rows):
        return torch.zeros(0, 3, pre.size, pre.size, dtype=torch.uint8)
    return torch.stack([clean_pixels(img, pre) for img in rows.images])


def stack_crops(rows: ImageRows, seed: int, view: int, pre: Preprocess,
                aug: AugmentSpec = DASSL_CROP, index: list[int] | None = None) -> torch.Tensor:
    """(N, 3, S, S) uint8: one seeded crop of each image (of `index`, all when None)."""
    chosen = range(len(rows)) if index is None else index
    return torch.stack([crop_pixels(rows.images[i], rows.keys[i].tobytes(), seed, view, aug, pre)
                        for i in chosen])


def normalize(pixels: torch.Tensor, pre: Preprocess, device: torch.device) -> torch.Tensor:
    """uint8 (B, 3, S, S) -> the model's float input on `device`, as `clean_view` computes it:
    to_tensor's x / 255, then (x - mean) / std."""
    x = pixels.to(device, non_blocking=True).float().div(255)
    mean = torch.tensor(pre.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)
