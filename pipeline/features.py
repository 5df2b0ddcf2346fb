"""Assembling tensors from the store: the few-shot training set of a dataset, on a device, once.

Training stages read everything they need here and then never touch the store in their loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .dataset_plan import relabel, subset_key
from .errors import StoreError
from .records import Extractor, StoredDataset
from .rows import RowTable
from .zarr_nodes import require_unit_rows


@dataclass(frozen=True)
class FewShotSet:
    """The K-shot training images of some classes, relabelled 0..C-1 in the given class order."""

    classnames: tuple[str, ...]
    labels: torch.Tensor  # (M,) int64, 0..C-1
    clean: torch.Tensor  # (M, D) float32, unit norm
    views: torch.Tensor  # (M, V, D) float32, unit norm; V = 0 when the extractor has no views
    content_key: str  # sha256 of the image keys, labels and class names: the set's identity
    clean_norms: torch.Tensor | None = None  # (M,) norms of the raw features: raw = unit * norm
    view_norms: torch.Tensor | None = None  # (M, V)

    @property
    def size(self) -> int:
        return int(self.labels.shape[0])


def fewshot_set(ds: StoredDataset, extractor: Extractor, shots: int, seed: int,
                labels: list[int], device: torch.device, views: str = "primary") -> FewShotSet:
    """The K-shot subset (seed) of a stored dataset restricted to `labels`, features gathered
    from `extractor`, augmented views from the recipe `views` (a view recipe key)."""
    dataset = str(ds.attrs["name"])
    rows = fewshot_rows(ds, shots, seed, labels)
    all_labels = ds.labels()
    keys = ds.keys()[rows]  # (M, 32)
    new_labels = relabel(all_labels[rows], labels)
    clean, clean_norms = _gather(extractor.images, keys, extractor, "images", dataset)
    if extractor.views:
        table = extractor.views_of(views)
        if table is None:
            raise StoreError(f"dataset {dataset}: extractor {extractor.fp[:12]} has no views of "
                             f"recipe {views[:12]} (run `shipyard extract`)")
        views_arr, view_norms = _gather(table, keys, extractor, "views", dataset)
    else:
        views_arr = np.zeros((len(rows), 0, extractor.dim), np.float16)
        view_norms = np.zeros((len(rows), 0), np.float32)
    classnames = tuple(ds.classnames[i] for i in labels)
    key = subset_key(keys, new_labels, classnames)
    return FewShotSet(
        classnames=classnames,
        labels=torch.from_numpy(new_labels).to(device),
        clean=_unit(clean, device),
        views=_unit(views_arr, device),
        content_key=key,
        clean_norms=torch.from_numpy(clean_norms).to(device),
        view_norms=torch.from_numpy(view_norms).to(device),
    )


def fewshot_rows(ds: StoredDataset, shots: int, seed: int, labels: list[int]) -> np.ndarray:
    """The stored rows of the K-shot subset (seed) whose label is one of `labels`, in order."""
    rows = ds.fewshot(shots, seed)
    rows = rows[np.isin(ds.labels()[rows], labels)]
    if rows.size == 0:
        raise StoreError(f"dataset {ds.attrs['name']}: no {shots}-shot training images of the "
                         "selected classes in the store (run `shipyard extract`)")
    return rows


def _gather(source: RowTable, keys: np.ndarray, extractor: Extractor, table: str,
            dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """The unit features and the norms of these images' rows in one of the extractor's tables."""
    index = source.index()
    missing = [k for k in keys if k.tobytes() not in index]
    if missing:
        raise StoreError(f"dataset {dataset}: {len(missing)} training images have no {table} in "
                         f"extractor {extractor.fp[:12]} (run `shipyard extract`)")
    rows = np.array([index[k.tobytes()] for k in keys], dtype=np.int64)
    where = f"extractor {extractor.fp[:12]} {table}"
    features = require_unit_rows(source.read("features", rows), where)
    if "norms" not in source.columns:
        raise StoreError(f"{where}: no stored norms (written by an older shipyard; run `shipyard "
                         "extract` to re-extract)")
    norms = source.read("norms", rows).astype(np.float32)
    if not np.isfinite(norms).all() or (norms < 0).any():
        raise StoreError(f"{where}: norms that are negative or not finite; run "
                         "`shipyard store verify`")
    return features, norms


def _unit(features: np.ndarray, device: torch.device) -> torch.Tensor:
    """float16 rows -> float32 on device, re-normalized (the cast to float16 moves norms ~1e-3)."""
    t = torch.from_numpy(features.astype(np.float32)).to(device)
    if t.numel() == 0:
        return t
    return torch.nn.functional.normalize(t, dim=-1)


def domain_images(ds: StoredDataset, extractor: Extractor, device: torch.device,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every image of a synthetic-domain dataset: its clean unit features (S, D), their raw norms
    (S,) and its labels (S,), the paired real dataset's class ids. The clean view stands for
    SYNC-CLIP's one fixed transform per synthetic image."""
    dataset = str(ds.attrs["name"])
    keys = ds.keys()
    if len(keys) == 0:
        raise StoreError(f"dataset {dataset}: no images")
    unit, norms = _gather(extractor.images, keys, extractor, "images", dataset)
    return (_unit(unit, device), torch.from_numpy(norms).to(device),
            torch.from_numpy(ds.labels().astype(np.int64)).to(device))
