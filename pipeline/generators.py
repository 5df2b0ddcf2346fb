"""Stored SHIP generators: resumable checkpoints inside an uncommitted generator artefact, the final
weights, and loading a committed generator back onto a CLIP model. No pickles: weights, AdamW
state and RNG state are arrays, the rest JSON attributes."""

from __future__ import annotations

import torch
import zarr

from .artifacts import GENERATOR, Ref, record_of
from .configs import ShipConfig
from .errors import UsageError
from .generator_training import Checkpoint
from .models import ClipModel
from .ship import ShipGenerator
from .store import FeatureStore
from .text_encoder import PromptEncoder
from .weights import flatten_optimizer, load_tensors, pack_tensors, unflatten_optimizer, unpack_tensors
from .zarr_nodes import attrs_of, child_group


def save_checkpoint(group: zarr.Group, state: Checkpoint) -> None:
    """Write checkpoint_<epoch>, point `checkpoint` at it (the commit), drop older ones."""
    name = f"checkpoint_{state.epoch:05d}"
    tensors, meta = flatten_optimizer(state.optimizer)
    packed = {**{f"model.{k}": v for k, v in state.model.items()},
              **{f"optimizer.{k}": v for k, v in tensors.items()}, "rng": state.rng}
    pack_tensors(group, name, packed)  # a few arrays, not one per tensor
    child_group(group, name).update_attributes({"epoch": state.epoch, "log": state.log,
                                                "optimizer": meta})
    group.attrs["checkpoint"] = name
    drop_checkpoints(group, keep=name)


def load_checkpoint(group: zarr.Group, device: torch.device) -> Checkpoint | None:
    """The checkpoint an interrupted training left, or None (none written, or half-written)."""
    name = attrs_of(group).get("checkpoint")
    if not name or name not in group:
        return None
    attrs = attrs_of(child_group(group, str(name)))
    if "epoch" not in attrs:  # killed while writing it (the pointer moves only after)
        return None
    tensors = unpack_tensors(group, str(name), device)
    model = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    optimizer = unflatten_optimizer({k.removeprefix("optimizer."): v for k, v in tensors.items()
                                     if k.startswith("optimizer.")}, attrs["optimizer"])
    return Checkpoint(int(attrs["epoch"]), model, optimizer, tensors["rng"].cpu(),
                      list(attrs["log"]))


def drop_checkpoints(group: zarr.Group, keep: str | None) -> None:
    for name in list(group.group_keys()):
        if name.startswith("checkpoint_") and name != keep:
            del group[name]


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
