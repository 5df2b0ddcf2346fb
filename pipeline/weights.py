"""Tensors in the store without pickles: each tensor of a state dict is one Zarr array.

Used for trained weights, optimizer state and RNG state, so a checkpoint is as readable by any
Zarr v3 reader as the features are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import zarr

from .zarr_nodes import attrs_of, child_array, child_group, read_sealed, write_sealed

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
        write_sealed(group, _name(key), data.reshape(data.shape or (1,)),
                     chunks=data.shape or (1,), compressors=None,
                     attributes={"shape": list(data.shape)})  # restores 0-d tensors
    return group


def load_tensors(parent: zarr.Group, name: str,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    group = child_group(parent, name)
    out: dict[str, torch.Tensor] = {}
    for key in group.attrs["keys"]:  # type: ignore[union-attr]
        arr = child_array(group, _name(str(key)))
        shape = tuple(arr.attrs["shape"])  # type: ignore[arg-type]
        out[str(key)] = torch.from_numpy(read_sealed(arr).reshape(shape)).to(device)
    return out


def flatten_optimizer(state: Mapping[str, object]) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """torch optimizer state_dict -> (tensors by 'param.key', JSON-able rest). One-element
    tensors (AdamW's step counts) travel as JSON numbers with their dtype: one array less each."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, object] = {}
    for param, entries in state["state"].items():  # type: ignore[attr-defined]
        for key, value in entries.items():
            if torch.is_tensor(value) and value.ndim == 0 and value.dtype in _DTYPES:
                scalars[f"{param}.{key}"] = {"tensor": value.item(), "dtype": _DTYPES[value.dtype]}
            elif torch.is_tensor(value):
                tensors[f"{param}.{key}"] = value
            else:
                scalars[f"{param}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, object]) -> dict[str, object]:
    state: dict[int, dict[str, object]] = {}
    items: list[tuple[str, object]] = [*tensors.items(), *meta["scalars"].items()]  # type: ignore[attr-defined]
    for name, value in items:
        param, key = name.split(".", 1)
        if isinstance(value, dict) and set(value) == {"tensor", "dtype"}:
            value = torch.tensor(value["tensor"], dtype=getattr(torch, str(value["dtype"])))
        state.setdefault(int(param), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def pack_tensors(parent: zarr.Group, name: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write tensors as one flat array per dtype plus a JSON index (key -> dtype, offset, shape):
    a handful of objects instead of one per tensor, which is what keeps checkpoints cheap on
    object storage. `unpack_tensors` reads them back."""
    flat: dict[str, list[np.ndarray]] = {}
    index: dict[str, list[object]] = {}
    sizes: dict[str, int] = {}
    for key, tensor in tensors.items():
        t = tensor.detach().cpu().contiguous()
        if t.dtype not in _DTYPES:
            t = t.float()
        dtype = _DTYPES[t.dtype]
        data = t.numpy().reshape(-1)
        index[key] = [dtype, sizes.get(dtype, 0), list(t.shape)]
        sizes[dtype] = sizes.get(dtype, 0) + data.size
        flat.setdefault(dtype, []).append(data)
    group = parent.create_group(name, overwrite=True, attributes={"index": index})
    for dtype, parts in flat.items():
        data = np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)
        write_sealed(group, dtype, data, chunks=(max(1, data.size),), compressors=None)


def unpack_tensors(parent: zarr.Group, name: str,
                   device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    group = child_group(parent, name)
    index: dict[str, list[Any]] = dict(attrs_of(group)["index"])
    arrays = {dtype: read_sealed(child_array(group, dtype)) for dtype in {v[0] for v in index.values()}}
    out: dict[str, torch.Tensor] = {}
    for key, (dtype, offset, shape) in index.items():
        size = int(np.prod(shape)) if shape else 1
        data = arrays[dtype][int(offset) : int(offset) + size].reshape(tuple(shape))
        out[key] = torch.from_numpy(data.copy()).to(device)
    return out
