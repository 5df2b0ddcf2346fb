"""Resumable training checkpoints inside an uncommitted artefact (a SHIP generator, a SYNC-CLIP
head): model and optimizer tensors packed in a few arrays, RNG state as an array, the epoch, log
and optimizer layout as JSON attributes. No pickles. The `checkpoint` attribute of the artefact
names the newest whole checkpoint: it moves only once that checkpoint is written."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import zarr

from .weights import flatten_optimizer, pack_tensors, unflatten_optimizer, unpack_tensors
from .zarr_nodes import attrs_of, child_group


@dataclass
class Checkpoint:
    """Everything needed to continue training after `epoch` epochs."""

    epoch: int
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # torch optimizer state_dict
    rng: torch.Tensor  # torch.Generator state
    log: list[dict[str, float]]


def restore(resume: Checkpoint | None, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            rng: torch.Generator) -> tuple[list[dict[str, float]], int]:
    """Put a training back where a checkpoint left it (model, optimizer and RNG state); returns
    the log so far and the epoch to start at: ([], 0) without one."""
    if resume is None:
        return [], 0
    model.load_state_dict(resume.model)
    optimizer.load_state_dict(resume.optimizer)
    rng.set_state(resume.rng.cpu())
    return list(resume.log), resume.epoch


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
