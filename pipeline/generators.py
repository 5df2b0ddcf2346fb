"""Stored SHIP generators: the final weights (and the `paper` protocol's per-epoch snapshots), and
loading a committed generator back onto a CLIP model. Training checkpoints: `checkpoints.py`."""

from __future__ import annotations

from .artifacts import GENERATOR, Ref, record_of
from .configs import ShipConfig
from .errors import UsageError
from .models import ClipModel
from .ship import ShipGenerator
from .store import FeatureStore
from .text_encoder import PromptEncoder
from .weights import load_tensors


def snapshot_name(epoch: int) -> str:
    return f"snapshot_{epoch}"


def load_generator(store: FeatureStore, key: str, clip: ClipModel, extractor: str,
                   epoch: int | None = None) -> ShipGenerator:
    """A trained generator from the store, on the model's device, in eval mode; with `epoch`, its
    weights as they were after that epoch (kept when the `paper` protocol selects over them)."""
    group = store.lookup(Ref.of(GENERATOR, key))
    if group is None:
        raise UsageError(f"{store.location} has no trained generator {key[:12]} "
                         "(run `shipyard train-generator`)")
    record = record_of(group)
    if record["inputs"]["extractor"] != extractor:
        raise UsageError(f"generator {key[:12]} was trained on extractor "
                         f"{record['inputs']['extractor'][:12]}, not on this manifest's "
                         f"{extractor[:12]}")
    model = ShipGenerator(PromptEncoder.from_clip(clip), ShipConfig(**record["params"]["ship"]))
    name = "weights"
    if epoch is not None and epoch != record["params"]["train"]["epochs"]:
        name = snapshot_name(epoch)
        if name not in group:
            raise UsageError(f"generator {key[:12]} kept no weights of epoch {epoch} (kept: "
                             f"{record['params'].get('snapshots', [])}); run `shipyard "
                             "train-generator --force` under protocol paper")
    model.load_state_dict(load_tensors(group, name, clip.device))
    return model.eval()
