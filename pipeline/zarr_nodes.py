"""Typed access to zarr nodes: zarr's own annotations are unions of every JSON and node type."""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Iterator
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


def digest(data: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and bytes: what a sealed array must read back as."""
    return digest_blocks(data.dtype, data.shape, [data])


def digest_blocks(dtype: np.dtype, shape: tuple[int, ...], blocks: Iterable[np.ndarray]) -> str:
    """`digest` of an array given as consecutive blocks along its first axis (never whole in
    memory): the same bytes in the same order."""
    h = hashlib.sha256(f"{np.dtype(dtype).str}|{tuple(shape)}|".encode())
    for block in blocks:
        h.update(np.ascontiguousarray(block).tobytes())
    return h.hexdigest()


def row_blocks(arr: zarr.Array, stop: int, step: int) -> Iterator[tuple[int, np.ndarray]]:
    """Rows [0, stop) of an array, `step` rows at a time: (start, block)."""
    for start in range(0, stop, max(1, step)):
        yield start, np.asarray(arr[start:min(stop, start + step)])


def write_sealed(group: zarr.Group, name: str, data: np.ndarray, **kwargs: Any) -> zarr.Array:
    """An array written whole, with the digest of its content in its attributes."""
    attributes = {**kwargs.pop("attributes", {}), "sha256": digest(data)}
    return group.create_array(name, data=data, attributes=attributes, **kwargs)


def read_sealed(arr: zarr.Array) -> np.ndarray:
    """The whole array, refused unless it matches its digest: zarr reads a missing chunk as its
    fill value, and a damaged chunk may still decode, so only the digest tells."""
    data = read_array(arr)
    want = attrs_of(arr).get("sha256")
    if want is not None and digest(data) != want:
        raise StoreError(f"{arr.path}: stored values do not match their digest (missing or damaged "
                         "chunks); run `shipyard store verify`")
    return data


def require_unit_rows(rows: np.ndarray, where: str, tolerance: float = 0.05) -> np.ndarray:
    """Stored features are L2-normalized rows; a row far from unit norm is a chunk read as zeros
    (missing) or damaged. Refuse it rather than train or score on it."""
    if rows.size:
        norms = np.linalg.norm(rows.reshape(-1, rows.shape[-1]).astype(np.float32), axis=1)
        if not np.isfinite(norms).all() or (np.abs(norms - 1) > tolerance).any():
            raise StoreError(f"{where}: stored features are not unit-norm (missing or damaged "
                             "chunks); run `shipyard store verify`")
    return rows
