"""Tensors in the store without pickles: each tensor of a state dict is one Zarr array.

Used for trained weights, optimizer state and RNG state, so a checkpoint is as readable by any
Zarr v3 reader as the features are.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import zarr

from .zarr_nodes import child_array, child_group

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.int64: "int64",
           torch.uint8: "uint8", torch.int32: "int32", torch.float64: "float64"}


def _name(key: str) -> str:
    # Zarr reserves names starting with '__'; '/' would nest groups.
    return key.replace("/", "|")


def save_tensors(parent: zarr.Group, name: str, tensors: Mapping[str, torch.Tensor]) -> zarr.Group:
    """Write tensors as arrays of a new group `name` (replacing one of that name)."""
    group = parent.create_group(name, overwrite=True, attributes={"keys": list(tensors)})
    for key, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        if t.dtype not in _DTYPES:
            t = t.float()
        data = t.numpy()
        # Uncompressed: trained float32 weights barely compress and checkpoints are on the
        # training loop's clock.
        group.create_array(_name(key), data=data.reshape(data.shape or (1,)),
                           chunks=data.shape or (1,), compressors=None)
        group[_name(key)].attrs["shape"] = list(data.shape)  # restores 0-d tensors
    return group


def load_tensors(parent: zarr.Group, name: str,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    group = child_group(parent, name)
    out: dict[str, torch.Tensor] = {}
    for key in group.attrs["keys"]:  # type: ignore[union-attr]
        arr = child_array(group, _name(str(key)))
        shape = tuple(arr.attrs["shape"])  # type: ignore[arg-type]
        out[str(key)] = torch.from_numpy(np.asarray(arr[...]).reshape(shape)).to(device)
    return out


def flatten_optimizer(state: Mapping[str, object]) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """torch optimizer state_dict -> (tensors by 'param.key', JSON-able rest)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, object] = {}
    for param, entries in state["state"].items():  # type: ignore[attr-defined]
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{param}.{key}"] = value
            else:
                scalars[f"{param}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, object]) -> dict[str, object]:
    state: dict[int, dict[str, object]] = {}
    items: list[tuple[str, object]] = [*tensors.items(), *meta["scalars"].items()]  # type: ignore[attr-defined]
    for name, value in items:
        param, key = name.split(".", 1)
        state.setdefault(int(param), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}
