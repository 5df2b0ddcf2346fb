"""CLIP models through open_clip: by name with a pretrained tag, a local checkpoint, or random
weights; plus model configs shipped with shipyard (e.g. `shipyard-tiny` for tests and the demo).

Whatever the source, the loaded weights are digested, so the extractor fingerprint names the
exact weights and a cache built with other weights is never reused silently.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import ModelLoadError, UsageError
from .identity import ModelIdentity, Preprocess, shipped_configs
from .manifest import Device, ModelSpec

log = logging.getLogger(__name__)


def resolve_device(device: Device | str) -> torch.device:
    device = Device(device)
    if device is Device.CUDA and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available on this machine")
    if device is Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device.value)


@dataclass
class ClipModel:
    spec: ModelSpec
    model: Any  # open_clip.CLIP (kept Any: open_clip ships no type information)
    tokenizer: Any
    preprocess: Preprocess
    weights_digest: str
    embed_dim: int  # D: joint embedding width
    text_width: int  # W: text transformer width
    device: torch.device

    def identity(self) -> ModelIdentity:
        """What names this model in an extractor fingerprint (cached by `IdentityCache`)."""
        return ModelIdentity(self.spec.name, self.weights_digest, self.spec.precision.value,
                             self.preprocess, self.embed_dim, self.text_width)


def load_clip(spec: ModelSpec, device: torch.device) -> ClipModel:
    """Build the CLIP model of a manifest's `model` section, frozen and in eval mode."""
    import open_clip  # deferred: importing it costs ~1 s and most commands never need it

    shipped = shipped_configs()
    if spec.name in shipped:
        open_clip.add_model_config(shipped[spec.name])
    if spec.name not in open_clip.list_models():
        raise UsageError(f"model.name: unknown model {spec.name!r} (open_clip names such as "
                         f"ViT-B-16, or shipped: {', '.join(sorted(shipped))})")
    if spec.pretrained and ("/" in spec.pretrained) and not Path(spec.pretrained).is_file():
        raise ModelLoadError(f"model.pretrained: checkpoint {spec.pretrained} not found")
    try:
        # Random initialisation is seeded without touching the caller's global RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.init_seed)
            model = open_clip.create_model(spec.name, pretrained=spec.pretrained,
                                           precision=spec.precision.value, device=device)
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(f"cannot load model {spec.name} "
                             f"(pretrained={spec.pretrained}): {first}") from None
    model.eval().requires_grad_(False)
    preprocess = preprocess_of(model)
    if preprocess.resize_mode != "shortest":
        raise UsageError(f"model {spec.name}: resize mode {preprocess.resize_mode!r} unsupported")
    return ClipModel(
        spec=spec,
        model=model,
        tokenizer=open_clip.get_tokenizer(spec.name),
        preprocess=preprocess,
        weights_digest=state_dict_digest(model),
        embed_dim=_embed_dim(model),
        text_width=int(_text_parts(model).token_embedding.weight.shape[1]),
        device=device,
    )


def preprocess_of(model: Any) -> Preprocess:
    """The clean-view preprocessing an open_clip model asks for (its visual preprocess config)."""
    cfg = model.visual.preprocess_cfg
    size = cfg["size"]
    return Preprocess(
        size=int(size[0] if isinstance(size, tuple | list) else size),
        mean=tuple(float(x) for x in cfg["mean"]),
        std=tuple(float(x) for x in cfg["std"]),
        interpolation=str(cfg.get("interpolation", "bicubic")),
        resize_mode=str(cfg.get("resize_mode", "shortest")),
    )


def _text_parts(model: Any) -> Any:
    """open_clip.CLIP keeps its text tower on itself; CustomTextCLIP in `model.text`."""
    return model if hasattr(model, "token_embedding") else model.text


def _embed_dim(model: Any) -> int:
    """D, read off the image tower's output: the same for every open_clip model family."""
    size = model.visual.preprocess_cfg["size"]
    side = size[0] if isinstance(size, tuple | list) else size
    with torch.no_grad():
        probe = torch.zeros(1, 3, side, side, device=next(model.parameters()).device,
                            dtype=next(model.visual.parameters()).dtype)
        return int(model.encode_image(probe).shape[-1])


def state_dict_digest(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict: names, dtypes, shapes and bytes, in order."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@torch.inference_mode()
def encode_images(clip: ClipModel, batch: torch.Tensor) -> np.ndarray:
    """(B, 3, S, S) preprocessed images -> (B, D) raw float32 features: the image tower's output
    before L2 normalization (Tip-Adapter averages raw views; SYNC-CLIP aligns raw features)."""
    dtype = next(clip.model.visual.parameters()).dtype
    features = clip.model.encode_image(batch.to(clip.device, dtype=dtype, non_blocking=True),
                                       normalize=False)
    out: np.ndarray = features.float().cpu().numpy()
    return out


@torch.inference_mode()
def encode_texts(clip: ClipModel, texts: list[str], batch_size: int = 256) -> np.ndarray:
    """Texts -> (T, D) L2-normalized float32 features, through the frozen text tower."""
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = clip.tokenizer(texts[start : start + batch_size]).to(clip.device)
        chunks.append(clip.model.encode_text(tokens, normalize=True).float().cpu().numpy())
    return np.concatenate(chunks) if chunks else np.zeros((0, clip.embed_dim), np.float32)
