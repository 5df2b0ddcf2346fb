"""Image decoding and CLIP preprocessing: the clean test-time view and seeded augmented views.

Each augmented view is drawn from an RNG seeded by (recipe seed, image key, view index), so the
same image always gets the same views, in any batch, on any worker, after any restart.
"""

from __future__ import annotations

import hashlib
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import InterpolationMode

from .errors import ImageError
from .identity import Preprocess
from .manifest import AugmentSpec

# Decompression-bomb guard: refuse images over ~180 megapixels instead of exhausting memory.
Image.MAX_IMAGE_PIXELS = 180_000_000


def decode(data: bytes, name: str) -> Image.Image:
    """Bytes -> fully loaded RGB image. Raises ImageError with a short reason."""
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        img = Image.open(io.BytesIO(data))
        img.load()  # truncated data fails here, not lazily later
        return img.convert("RGB")
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name}: cannot decode image ({exc})") from None


def _interpolation(pre: Preprocess) -> InterpolationMode:
    return InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else InterpolationMode.BILINEAR


def _to_input(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(img), list(pre.mean), list(pre.std))


def clean_view(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    """Resize the short side to `size` (bicubic), center crop, normalize: (3, S, S)."""
    img = TF.resize(img, pre.size, interpolation=_interpolation(pre))
    return _to_input(TF.center_crop(img, [pre.size, pre.size]), pre)


@dataclass(frozen=True)
class CropBox:
    top: int
    left: int
    height: int
    width: int
    flip: bool


def view_rng(seed: int, key: bytes, view: int) -> np.random.Generator:
    digest = hashlib.sha256(seed.to_bytes(8, "little") + key + view.to_bytes(4, "little")).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def random_resized_crop(width: int, height: int, aug: AugmentSpec,
                        rng: np.random.Generator) -> CropBox:
    """RandomResizedCrop's box: area fraction in `scale`, log-uniform aspect ratio in `ratio`,
    up to 10 tries, then a center crop clamped to the ratio range."""
    area = width * height
    log_lo, log_hi = math.log(aug.ratio[0]), math.log(aug.ratio[1])
    flip = bool(aug.flip and rng.random() < 0.5)
    for _ in range(10):
        target = area * rng.uniform(aug.scale[0], aug.scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return CropBox(top, left, h, w, flip)
    in_ratio = width / height
    if in_ratio < aug.ratio[0]:
        w, h = width, round(width / aug.ratio[0])
    elif in_ratio > aug.ratio[1]:
        w, h = round(height * aug.ratio[1]), height
    else:
        w, h = width, height
    return CropBox((height - h) // 2, (width - w) // 2, h, w, flip)


def augmented_views(img: Image.Image, key: bytes, views: int, seed: int, aug: AugmentSpec,
                    pre: Preprocess) -> torch.Tensor:
    """V seeded RandomResizedCrop(+flip) views of one image: (V, 3, S, S)."""
    out = []
    for v in range(views):
        box = random_resized_crop(img.width, img.height, aug, view_rng(seed, key, v))
        crop = TF.resized_crop(img, box.top, box.left, box.height, box.width,
                               [pre.size, pre.size], interpolation=_interpolation(pre))
        if box.flip:
            crop = TF.hflip(crop)
        out.append(_to_input(crop, pre))
    return torch.stack(out)
