"""Typed access to zarr nodes: zarr's own annotations are unions of every JSON and node type."""

from __future__ import annotations

import datetime as dt
from typing import Any

import numpy as np
import zarr

from .errors import StoreError


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def attrs_of(node: zarr.Group | zarr.Array) -> dict[str, Any]:
    return dict(node.attrs.asdict())


def child_array(group: zarr.Group, name: str) -> zarr.Array:
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{group.path}/{name}: expected an array")
    return node


def child_group(group: zarr.Group, name: str) -> zarr.Group:
    node = group[name]
    if not isinstance(node, zarr.Group):
        raise StoreError(f"{group.path}/{name}: expected a group")
    return node


def read_array(arr: zarr.Array, start: int = 0, stop: int | None = None) -> np.ndarray:
    return np.asarray(arr[start:stop])
