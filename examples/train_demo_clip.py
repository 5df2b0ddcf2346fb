"""Train the demo's CLIP: `shipyard-tiny` (a config shipped in the package) trained from scratch
with the CLIP contrastive loss on Fashion-MNIST training images paired with captions of their
class names, written as fp16 safetensors with a model card beside it.

Why a model of its own: no package on the registry carries pretrained CLIP weights and nothing
can be downloaded at run time, so with random weights the demo's table is noise. This model has
learned to match clothing images with their class names, which is what the papers' methods need
to show anything: zero-shot on every class, a fine-tuned head on the base classes, and what that
does to the new ones.

The choices, and why:

- Data: Fashion-MNIST's training set (Debian's `dataset-fashion-mnist`, IDX files) minus every
  image the demo uses (`--exclude-split`), so the demo never scores images the model was trained
  on. Its test set is never read; the demo's test images come from it.
- Captions: every image gets one of several phrasings of its class name per step, the demo's
  template among them (CLIP is trained on captions; the templates the heads use are phrasings).
  Half of them also name the shade of what the image shows (dark / grey / light, by brightness
  tercile of the crop's foreground): with the class name as the only varying word the text
  tower learns to read nothing else (measured: every phrasing of a class gave the same feature,
  cosine 1.0000), and the prompt learners (CoOp's context, SHIP's generated bias) then have
  nothing to steer. All 10 classes are trained, as CLIP's pretraining covers the classes the
  demo calls "new": base/new is a split of the fine-tuning data, not of pretraining.
- Preprocessing: exactly the extractor's clean view (bicubic resize to 64 px, grey to RGB, CLIP's
  mean/std), done once per image and kept as uint8. Training augments it with RandomResizedCrop
  (area 0.08-1, the union of the two view recipes the heads train on) and flips: a model trained
  on clean images alone scored 0.88 on clean test images but 0.48 on SHIP-style crops, so every
  head trained on augmented views learned from features the model could not read.
- Loss: CLIP's symmetric cross-entropy over the batch at a FIXED logit scale of 100, CLIP's
  learned value, which every head recipe assumes (CoOp, Tip-Adapter and SHIP all score with
  100). Learned from 1/0.07 as in CLIP, it stopped at 12.8 here: at 100 the heads then saw logits
  8x sharper than the model was trained for, and CoOp's training accuracy fell from 68% to 50%.
  AdamW (betas 0.9/0.98, eps 1e-6, weight decay on matrices only), linear warm-up, cosine.
- Speed-ups that change nothing in the result: each distinct caption is encoded once per step and
  gathered per image, and the text is cut after the longest EOS (the text tower is causal). Only
  the token-embedding rows the captions use are trained (a 49,408-row table trained in full by
  Adam was most of the step time); the other rows keep their seeded initialisation and are
  never read by the demo.
- Storage: fp16 safetensors (about 7 MB; no pickle), loaded by open_clip into an fp32 model. The
  accuracy this script reports is measured after the fp16 round trip, i.e. of the shipped weights.
- Threads: one by default. Two are faster on an idle 2-core machine but collapse when another
  process shares the cores, and the thread count is part of what makes a run reproducible.

Usage: python examples/train_demo_clip.py [--steps N] [--out PATH] (see --help).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import struct
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# The demo's own builder: Fashion-MNIST's class names in label order, where Debian puts the IDX
# files, how to read them, and which training images the demo uses.
from make_fashion_demo import CLASSNAMES, SOURCE, demo_indices, read_idx

HERE = Path(__file__).resolve().parent
# Several phrasings per class; the demo manifest's template is the first.
PHRASINGS = ["a photo of a {}, a type of clothing.", "a photo of a {}.", "a {}.",
             "a picture of a {}.", "an image of a {}, a type of clothing.", "{}"]
# Words for what an image shows besides its class, by brightness tercile of its foreground, put
# before the class name in half the captions: without them every caption of a class says the same
# thing, the text tower learns to read the class name alone, and prompt learning (CoOp, SHIP's
# generator) has no input it responds to.
SHADES = ["dark", "grey", "light"]
FOREGROUND = 25  # pixel value above which a pixel is the garment, not the background
CONFIG = "shipyard-tiny"
# Stored in the checkpoint; shipyard's results and report show it beside the figures.
DESCRIPTION = ("shipyard-tiny trained by shipyard on Fashion-MNIST (examples/train_demo_clip.py), "
               "not OpenAI's CLIP: it knows 10 clothing classes, so the figures show how the methods "
               "behave on a small model that has learned, not how they do with CLIP")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--source", type=Path, default=SOURCE,
                   help="folder with Fashion-MNIST's IDX files (train-images-idx3-ubyte.gz, "
                        "train-labels-idx1-ubyte.gz)")
    p.add_argument("--exclude-split", type=Path,
                   default=HERE / "fashion_demo" / "split_zhou_FashionDemo.json",
                   help="CoOp split file whose train_NNNNN images are left out of training "
                        "(the demo's); 'none' to use every image")
    p.add_argument("--eval-split", type=Path,
                   default=HERE / "fashion_demo" / "split_zhou_FashionDemo.json",
                   help="CoOp split file whose test images measure zero-shot top-1 at the end; "
                        "'none' to skip")
    p.add_argument("--out", type=Path, default=HERE / "demo_clip" / "shipyard-tiny-fashion.safetensors",
                   help="where the fp16 safetensors checkpoint goes; its model card is written "
                        "beside it as MODEL_CARD.md")
    p.add_argument("--steps", type=int, default=1500, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=256, help="image-caption pairs per step")
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay (matrices)")
    p.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("LOW", "HIGH"),
                   help="RandomResizedCrop area range of the training augmentation (plus flips)")
    p.add_argument("--no-augment", action="store_true", help="train on clean views only")
    p.add_argument("--logit-scale", type=float, default=100.0,
                   help="fixed temperature of the contrastive loss (CLIP's learned value, which "
                        "every head recipe assumes); 0 learns it from 1/0.07 as CLIP does")
    p.add_argument("--shade-rate", type=float, default=0.5,
                   help="share of captions that name the image's shade (dark / grey / light)")
    p.add_argument("--seed", type=int, default=0, help="seeds initialisation, order and captions")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--limit", type=int, default=None,
                   help="train on the first N eligible images only (quick checks)")
    p.add_argument("--log-every", type=int, default=100, help="steps between progress lines")
    p.add_argument("--no-card", action="store_true", help="do not write MODEL_CARD.md")
    p.add_argument("--card-only", action="store_true",
                   help="train nothing: rewrite MODEL_CARD.md from the checkpoint at --out (its "
                        "recipe is stored in the file's metadata)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "threads", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.logit_scale < 0:
        p.error("--logit-scale must be >= 0")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    low, high = args.crop_scale
    if not 0 < low <= high <= 1:
        p.error(f"--crop-scale {low} {high}: expected 0 < LOW <= HIGH <= 1")
    args.crop_scale = (low, high)
    return args


def training_images(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, int]:
    """(N, 28, 28) uint8 images, (N,) labels of the eligible training images, count excluded."""
    images = read_idx(args.source / "train-images-idx3-ubyte.gz")
    labels = read_idx(args.source / "train-labels-idx1-ubyte.gz").astype(np.int64)
    if len(images) != len(labels) or images.ndim != 3:
        raise SystemExit(f"{args.source}: images {images.shape} and labels {labels.shape} disagree")
    drop = set() if args.exclude_split is None else demo_indices(args.exclude_split)
    keep = np.array([i for i in range(len(images)) if i not in drop], dtype=np.int64)
    if args.limit is not None:
        keep = keep[: args.limit]
    if len(keep) == 0:
        raise SystemExit("no training images left")
    return images[keep], labels[keep], len(drop)


def preprocess_grey(images: np.ndarray, size: int) -> torch.Tensor:
    """The extractor's clean view before normalisation, on grey images: (N, S, S) uint8. PIL
    resizes each channel alike, so one grey channel stands for all three of the RGB image."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    out = np.empty((len(images), size, size), dtype=np.uint8)
    for i, img in enumerate(images):
        pil = TF.resize(Image.fromarray(img, mode="L"), size, interpolation=InterpolationMode.BICUBIC)
        out[i] = np.asarray(TF.center_crop(pil, [size, size]))
    return torch.from_numpy(out)


def random_crops(grey: torch.Tensor, scale: tuple[float, float], rng: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop (area fraction in `scale`, aspect 3/4..4/3) plus horizontal flip, per
    image, batched: (B, S, S) uint8 -> (B, S, S) float32 in 0..255, bilinear. torchvision
    retries boxes that do not fit; here a side longer than the image is clamped to it."""
    b = grey.shape[0]
    area = torch.empty(b).uniform_(scale[0], scale[1], generator=rng)
    log_ratio = torch.empty(b).uniform_(math.log(3 / 4), math.log(4 / 3), generator=rng)
    w = (area * log_ratio.exp()).sqrt().clamp(max=1.0)  # box sides as fractions of the image
    h = (area / log_ratio.exp()).sqrt().clamp(max=1.0)
    cx = w / 2 + torch.rand(b, generator=rng) * (1 - w)  # box centres, inside the image
    cy = h / 2 + torch.rand(b, generator=rng) * (1 - h)
    flip = torch.where(torch.rand(b, generator=rng) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w * flip, 2 * cx - 1
    theta[:, 1, 1], theta[:, 1, 2] = h, 2 * cy - 1
    grid = F.affine_grid(theta, [b, 1, *grey.shape[1:]], align_corners=False)
    return F.grid_sample(grey.unsqueeze(1).float(), grid, mode="bilinear", padding_mode="border",
                         align_corners=False).squeeze(1)


def foreground_brightness(pixels: torch.Tensor) -> torch.Tensor:
    """(B, S, S) pixels 0..255 -> (B,) mean of the foreground pixels (all of them if none)."""
    pixels = pixels.float()
    fg = pixels > FOREGROUND
    count = fg.sum((1, 2))
    fg_mean = (pixels * fg).sum((1, 2)) / count.clamp(min=1)
    return torch.where(count > 0, fg_mean, pixels.mean((1, 2)))


def shade_thresholds(grey: torch.Tensor) -> torch.Tensor:
    """The terciles of the clean training images' foreground brightness: (2,)."""
    values = torch.cat([foreground_brightness(part) for part in grey.split(4096)])
    return torch.quantile(values, torch.tensor([1 / 3, 2 / 3]))


def shades_of(pixels: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(B, S, S) pixels -> (B,) index into SHADES of what the image (the crop) shows."""
    return torch.bucketize(foreground_brightness(pixels), thresholds)


def normalise(grey: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(B, S, S) uint8 (or float 0..255) -> (B, 3, S, S) float32, as torchvision's to_tensor +
    normalize."""
    x = grey.unsqueeze(1).float().div(255).expand(-1, 3, -1, -1)
    return (x - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)


class CaptionTable(torch.nn.Module):
    """The distinct captions' token ids, cut after the longest EOS, and the rows of the token
    embedding they use as a small trainable table (written back by `write_back`)."""

    def __init__(self, model: torch.nn.Module, tokens: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        eos = tokens.argmax(dim=-1)  # open_clip's argmax pool: EOT has the highest id
        length = int(eos.max()) + 1
        used, local = torch.unique(tokens[:, :length], return_inverse=True)
        self.register_buffer("used", used)  # (U,) vocabulary ids
        self.register_buffer("local", local)  # (T, L) ids into the small table
        self.register_buffer("eos", eos)  # (T,)
        self.rows = torch.nn.Parameter(model.token_embedding.weight.detach()[used].clone())
        self.length = length

    def forward(self) -> torch.Tensor:
        """(T, D) L2-normalised features of every caption, as open_clip's encode_text."""
        m, L = self.model, self.length
        x = F.embedding(self.local, self.rows) + m.positional_embedding[:L]
        x = m.transformer(x, attn_mask=m.attn_mask[:L, :L])
        x = m.ln_final(x[torch.arange(len(x)), self.eos])  # per-token LayerNorm: pool first
        return F.normalize(x @ m.text_projection, dim=-1)

    @torch.no_grad()
    def write_back(self) -> None:
        self.model.token_embedding.weight[self.used] = self.rows


def param_groups(model: torch.nn.Module, table: CaptionTable, wd: float) -> list[dict]:
    decay, no_decay = [table.rows], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "logit_scale" in name or "ln" in name or "bias" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return 0.5 * args.lr * (1 + math.cos(math.pi * progress))


def build_model(seed: int):
    import open_clip
    from shipyard.pipeline.identity import shipped_configs

    open_clip.add_model_config(shipped_configs()[CONFIG])
    torch.manual_seed(seed)
    model = open_clip.create_model(CONFIG, pretrained=None)
    return model, open_clip.get_tokenizer(CONFIG)


def train(args: argparse.Namespace, log=print) -> tuple[torch.nn.Module, dict]:
    """Train; returns the model (fp16-rounded weights, fp32 tensors) and the run's facts."""
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()
    images, labels, excluded = training_images(args)
    from shipyard.pipeline.models import preprocess_of

    model, tokenizer = build_model(args.seed)
    pre = preprocess_of(model)  # what extraction will feed the trained model
    mean, std = torch.tensor(pre.mean), torch.tensor(pre.std)
    grey = preprocess_grey(images, pre.size)
    labels_t = torch.from_numpy(labels)
    n_classes, n_phr = len(CLASSNAMES), len(PHRASINGS)
    shaded = ["", *(f"{shade} " for shade in SHADES)]  # index 0: no shade word
    captions = [p.format(a + c) for c in CLASSNAMES for p in PHRASINGS for a in shaded]
    thresholds = shade_thresholds(grey)
    tokens = tokenizer(captions)
    table = CaptionTable(model, tokens)
    check_caption_encoder(model, table, tokens)
    model.token_embedding.weight.requires_grad_(False)  # trained through `table.rows`
    if args.logit_scale:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(args.logit_scale))
        model.logit_scale.requires_grad_(False)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, table, args.weight_decay), lr=args.lr,
                            betas=(0.9, 0.98), eps=1e-6)
    rng = np.random.default_rng(args.seed)
    crop_rng = torch.Generator().manual_seed(args.seed)
    order, cursor, losses = rng.permutation(len(grey)), 0, []
    log(f"training {CONFIG} on {len(grey)} images ({excluded} demo images left out), "
        f"{len(captions)} captions, {args.steps} steps of {args.batch_size}, "
        f"{args.threads} thread(s)")
    for step in range(args.steps):
        if cursor + args.batch_size > len(order):
            order, cursor = rng.permutation(len(grey)), 0
        idx = torch.from_numpy(order[cursor : cursor + args.batch_size])
        cursor += args.batch_size
        phrasing = torch.from_numpy(rng.integers(0, n_phr, len(idx)))
        named = torch.from_numpy(rng.random(len(idx)) < args.shade_rate)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        pixels = grey[idx] if args.no_augment else random_crops(grey[idx], args.crop_scale, crop_rng)
        img = F.normalize(model.encode_image(normalise(pixels, mean, std)), dim=-1)
        shade = torch.where(named, shades_of(pixels, thresholds) + 1, 0)
        caption = (labels_t[idx] * n_phr + phrasing) * len(shaded) + shade
        txt = table()[caption]  # (B, D) each image's caption
        logits = model.logit_scale.exp() * img @ txt.T
        target = torch.arange(len(idx))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            rate = (step + 1) / (time.perf_counter() - start)
            log(f"step {step + 1}/{args.steps}  loss {np.mean(losses[-args.log_every:]):.4f}  "
                f"{rate:.1f} steps/s  eta {(args.steps - step - 1) / rate:.0f} s")
    table.write_back()
    model.eval().requires_grad_(False)
    with torch.no_grad():  # the shipped weights are fp16: evaluate exactly those
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.half().float())
    facts = {"images": len(grey), "excluded": excluded, "classes": n_classes,
             "captions": len(captions), "steps": args.steps, "batch_size": args.batch_size,
             "lr": args.lr, "warmup": args.warmup,
             "logit_scale": args.logit_scale or "learned", "shade_rate": args.shade_rate,
             "augment": None if args.no_augment else list(args.crop_scale), "weight_decay": args.weight_decay,
             "seed": args.seed, "threads": args.threads, "first_loss": losses[0],
             "last_loss": float(np.mean(losses[-min(len(losses), args.log_every):])),
             "seconds": round(time.perf_counter() - start, 1)}
    return model, facts


@torch.no_grad()
def check_caption_encoder(model, table: CaptionTable, tokens: torch.Tensor) -> None:
    """The cut, deduplicated caption encoder must equal open_clip's encode_text."""
    model.eval()
    ref = model.encode_text(tokens, normalize=True)
    if not torch.allclose(table(), ref, atol=1e-5):
        raise SystemExit("internal check failed: the caption encoder differs from encode_text")


@torch.no_grad()
def zero_shot(model, tokenizer, split_file: Path, template: str = PHRASINGS[0]) -> dict:
    """Top-1 of the demo's test images against its class names, through the extractor's own
    decoding and clean view."""
    from shipyard.pipeline.models import preprocess_of
    from shipyard.pipeline.preprocess import clean_view, decode

    split = json.loads(split_file.read_text("utf-8"))
    root = split_file.parent / "images"
    pre = preprocess_of(model)
    rows = split["test"]
    names = sorted({(label, name) for _rel, label, name in rows})
    text = model.encode_text(tokenizer([template.format(n) for _l, n in names]), normalize=True)
    batch = torch.stack([clean_view(decode((root / rel).read_bytes(), rel), pre)
                         for rel, _l, _n in rows])
    img = model.encode_image(batch, normalize=True)
    # Fractions counted here rather than metrics.base_new's percentages: they are stored in the
    # checkpoint's metadata, whose bytes a rerun must reproduce.
    logits = (img @ text.T).numpy()
    truth = np.array([label for _rel, label, _n in rows])
    half = len(names) // 2  # CoOp's base/new split: the first half of the labels is base
    base, new = truth < half, truth >= half
    return {"top1": float((logits.argmax(1) == truth).mean()), "images": len(rows),
            "base_restricted": float((logits[base, :half].argmax(1) == truth[base]).mean()),
            "new_restricted": float((logits[new, half:].argmax(1) + half == truth[new]).mean())}


SAFETENSORS_DTYPES = {torch.float16: "F16", torch.float32: "F32", torch.int64: "I64",
                      torch.int32: "I32", torch.bool: "BOOL", torch.uint8: "U8"}


def save(state: dict[str, torch.Tensor], out: Path, facts: dict) -> str:
    """fp16 safetensors; returns its sha256. Written here rather than by `safetensors.save_file`,
    whose metadata order varies between calls: with the header's keys sorted and the wall time
    left out, one seed and thread count give the same file, byte for byte."""
    out.parent.mkdir(parents=True, exist_ok=True)
    recipe = {k: v for k, v in facts.items() if k != "seconds"}
    header: dict[str, object] = {"__metadata__": {
        "config": CONFIG, "description": DESCRIPTION, "recipe": json.dumps(recipe, sort_keys=True)}}
    blobs, offset = [], 0
    for name in sorted(state):
        t = state[name].detach().cpu()
        t = (t.half() if t.is_floating_point() else t).contiguous()
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8-byte alignment
    tmp = out.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for data in blobs:
            f.write(data)
    tmp.chmod(0o644)
    tmp.replace(out)
    return hashlib.sha256(out.read_bytes()).hexdigest()


def model_card(out: Path, facts: dict, digest: str, accuracy: dict | None) -> str:
    acc = ("not measured (--eval-split none)" if accuracy is None else
           f"{accuracy['top1']:.4f} top-1 over all 10 classes on the demo's {accuracy['images']} "
           f"test images (chance 0.10); restricted to the 5 base classes "
           f"{accuracy['base_restricted']:.4f}, to the 5 new classes {accuracy['new_restricted']:.4f}")
    phrasings = ", ".join(f"`{p}`" for p in PHRASINGS)
    augment = ("nothing" if facts.get("augment") is None else
               f"RandomResizedCrop (area {facts['augment'][0]}-{facts['augment'][1]}) and flips")
    lines = [
        f"# {out.name}: the demo's CLIP",
        "",
        f"A `{CONFIG}` CLIP (the config shipped in `pipeline/model_configs/`) trained from scratch by "
        "`examples/train_demo_clip.py` on Fashion-MNIST. It is not OpenAI's CLIP and knows nothing but "
        "10 clothing classes: it exists so that the offline demo shows real effects. For real CLIP "
        "weights set `model.name` and `model.pretrained` in the manifest (README, \"Real CLIP weights\").",
        "",
        "- **Data**: Fashion-MNIST training images (Han Xiao, Kashif Rasul, Roland Vollgraf, "
        "arXiv:1708.07747; Copyright 2017 Zalando SE, MIT licence), read from Debian's "
        f"`dataset-fashion-mnist`: {facts['images']:,} images, the {facts['excluded']} the demo uses "
        "left out. The test set, which the demo's test images come from, is never read.",
        f"- **Captions**: per image and step one of {len(PHRASINGS)} phrasings of its class name: "
        f"{phrasings}; in {facts['shade_rate']:.0%} of them the class name is preceded by the shade "
        f"the image shows ({', '.join(SHADES)}).",
        f"- **Recipe**: CLIP's symmetric contrastive loss at logit scale {facts['logit_scale']}, AdamW "
        f"(betas 0.9/0.98, eps 1e-6, weight decay {facts['weight_decay']} on matrices), peak lr "
        f"{facts['lr']}, {facts['warmup']} warm-up steps then cosine, {facts['steps']} steps of "
        f"{facts['batch_size']}; inputs are the extractor's clean view (64 px bicubic), augmented by "
        f"{augment}. Only the token-embedding rows the captions use are trained; the rest keep their "
        "seeded initialisation.",
        "- **Why each choice**: the docstring of `examples/train_demo_clip.py`.",
        f"- **Seed** {facts['seed']}, {facts['threads']} CPU thread(s), deterministic algorithms; "
        f"**{facts['seconds']} s** on the machine that made it (2-core x86_64 CPU).",
        f"- **Loss**: {facts['first_loss']:.4f} at the first step, {facts['last_loss']:.4f} over the "
        "last steps.",
        f"- **Zero-shot accuracy** (template `{PHRASINGS[0]}`, after the fp16 round trip): {acc}.",
        f"- **Storage**: fp16 safetensors, {out.stat().st_size:,} bytes, no pickle; open_clip loads it "
        "into an fp32 model (`model.pretrained:` this file's path).",
        f"- **sha256**: `{digest}`",
        "",
        "Regenerate with `python examples/train_demo_clip.py` (after `apt-get install "
        "dataset-fashion-mnist`): the same seed and thread count give the same file, byte for byte.",
    ]
    return "\n".join(lines) + "\n"


def write_card_only(out: Path) -> int:
    from safetensors import safe_open

    if not out.is_file():
        raise SystemExit(f"--card-only: no checkpoint at {out}")
    with safe_open(str(out), "np") as f:
        facts = json.loads((f.metadata() or {}).get("recipe", "{}"))
    if "steps" not in facts:
        raise SystemExit(f"--card-only: {out} carries no recipe metadata")
    card = out.parent / "MODEL_CARD.md"  # the wall time is the card's, not the checkpoint's
    seconds = re.search(r"\*\*([0-9.]+) s\*\*", card.read_text("utf-8")) if card.is_file() else None
    facts["seconds"] = seconds.group(1) if seconds else "(not recorded)"
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    (out.parent / "MODEL_CARD.md").write_text(model_card(out, facts, digest, facts.get("zero_shot")))
    print(json.dumps({"out": str(out), "sha256": digest}))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for name in ("exclude_split", "eval_split"):
        value = getattr(args, name)
        setattr(args, name, None if str(value).lower() == "none" else value)
    if args.card_only:
        return write_card_only(args.out)
    model, facts = train(args, log=lambda m: print(m, file=sys.stderr, flush=True))
    accuracy = None
    if args.eval_split is not None:
        import open_clip

        accuracy = zero_shot(model, open_clip.get_tokenizer(CONFIG), args.eval_split)
        facts["zero_shot"] = accuracy
    digest = save(model.state_dict(), args.out, facts)
    if not args.no_card:
        (args.out.parent / "MODEL_CARD.md").write_text(model_card(args.out, facts, digest, accuracy))
    print(json.dumps({"out": str(args.out), "sha256": digest, **facts}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
