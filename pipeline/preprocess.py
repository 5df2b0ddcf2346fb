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

# PIL's own guard only warns up to twice its limit; `decode` enforces the manifest's limit itself,
# from the header, before any pixel is decoded.
Image.MAX_IMAGE_PIXELS = None
HIGH_BIT_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535}


def decode(data: bytes, name: str, max_pixels: int = 178_956_970) -> Image.Image:
    """Bytes -> fully loaded RGB image. Raises ImageError with a short reason: empty, not an
    image, truncated, or more pixels than `max_pixels` (checked from the header, so a small file
    that would decode to gigabytes is refused without decoding it)."""
    if not data:
        raise ImageError(f"{name}: empty file")
    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise ImageError(f"{name}: {img.width} x {img.height} pixels exceed the limit of "
                             f"{max_pixels} (extraction.max_pixels)")
        img.load()  # truncated data fails here, not lazily later
        return _to_rgb(img)
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a recognised image format") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"{name}: cannot decode image ({exc})") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB with 8 bits per channel. High-bit-depth grey (16-bit PNG/TIFF, 32-bit int or float) is
    scaled to 0..255 first: PIL's own conversion clips it, turning most of an image white."""
    if img.mode in HIGH_BIT_MODES or img.mode in ("I", "F"):
        values = np.asarray(img, dtype=np.float64)
        top = HIGH_BIT_MODES.get(img.mode) or (65535 if values.max(initial=0) > 255 else 255)
        if img.mode == "F" and values.max(initial=0) <= 1.0:
            top = 1
        grey = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")  # uint8 grey: mode L
    return img.convert("RGB")


def interpolation_mode(pre: Preprocess) -> InterpolationMode:
    return InterpolationMode.BICUBIC if pre.interpolation == "bicubic" else InterpolationMode.BILINEAR


def _to_input(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    return TF.normalize(TF.to_tensor(img), list(pre.mean), list(pre.std))


def clean_view(img: Image.Image, pre: Preprocess) -> torch.Tensor:
    """Resize the short side to `size` (bicubic), center crop, normalize: (3, S, S)."""
    img = TF.resize(img, pre.size, interpolation=interpolation_mode(pre))
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
                               [pre.size, pre.size], interpolation=interpolation_mode(pre))
        if box.flip:
            crop = TF.hflip(crop)
        out.append(_to_input(crop, pre))
    return torch.stack(out)
