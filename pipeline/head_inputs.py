"""The tensors every head starts from, for one dataset and few-shot seed: the base-class shots,
the val and test features, and the zero-shot text classifier, each with the content key the
planner computed for it. A job whose planned inputs differ from what the store holds is refused."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .dataset_plan import require_planned, subset_key
from .dataset_plan import val_rows as planned_val_rows
from .datasets import Split
from .errors import StoreError
from .features import FewShotSet, fewshot_set
from .heads import zero_shot_weights
from .manifest import DatasetSpec
from .records import Extractor, StoredDataset, fewshot_val_name
from .store import FeatureStore
from .zarr_nodes import require_unit_rows


@dataclass(frozen=True)
class SplitFeatures:
    features: torch.Tensor  # (N, D) unit norm
    labels: torch.Tensor  # (N,) over all classes
    content_key: str


@dataclass(frozen=True)
class HeadInputs:
    dataset: str
    seed: int
    classnames: tuple[str, ...]
    base: list[int]
    new: list[int]
    text: torch.Tensor  # (C, D) zero-shot classifier: template ensemble, normalized
    text_keys: tuple[str, ...]  # one text set per template
    train: FewShotSet  # base-class K-shot set; labels are the dataset's ids (base = 0..m-1)
    val: SplitFeatures
    test: SplitFeatures

    def check(self, inputs: dict[str, Any], job: str) -> None:
        """Refuse to train or score on other data than the plan named (a stale store)."""
        have = {"train": self.train.content_key, "val": self.val.content_key,
                "test": self.test.content_key, "text": list(self.text_keys)}
        for name, key in have.items():
            if name in inputs:
                require_planned(job, name, key, inputs[name])


def head_inputs(store: FeatureStore, ex: Extractor, spec: DatasetSpec, seed: int,
                device: torch.device, views: str = "primary") -> HeadInputs:
    """`views`: the view recipe key of the training set's augmented views."""
    ds = store.dataset(spec.name)  # read once: its arrays serve the shots, val and test
    base, new = ds.base_labels, ds.new_labels
    train = fewshot_set(ds, ex, spec.shots, seed, base, device, views)
    text, text_keys = zero_shot_text(ex, spec, ds.classnames, device)
    return HeadInputs(spec.name, seed, ds.classnames, base, new, text, text_keys, train,
                      split_features(ds, ex, Split.VAL, device, rows=val_rows(ds, spec, seed)),
                      split_features(ds, ex, Split.TEST, device))


def val_rows(ds: StoredDataset, spec: DatasetSpec, seed: int) -> np.ndarray:
    """The base-class val rows a head of this seed tunes on (`dataset_plan.val_rows`, read from
    the store): the seed's few-shot val subset, or the whole val split without one."""
    arrays = {"labels": ds.labels(), "splits": ds.splits()}
    subset = ds.fewshot_val(spec.shots, seed)
    if subset is not None:
        arrays[fewshot_val_name(spec.shots, seed)] = subset
    return planned_val_rows(arrays, spec.shots, seed, ds.base_labels)


def transfer_inputs(store: FeatureStore, ex: Extractor, spec: DatasetSpec,
                    device: torch.device) -> HeadInputs:
    """What a transfer target evaluates on: its classes, text classifier and test images; no
    training or val set (nothing trains on a target)."""
    ds = store.dataset(spec.name)
    text, text_keys = zero_shot_text(ex, spec, ds.classnames, device)
    dim = text.shape[1]
    none = FewShotSet((), torch.zeros(0, dtype=torch.long, device=device),
                      torch.zeros(0, dim, device=device), torch.zeros(0, 0, dim, device=device),
                      "")
    empty = SplitFeatures(torch.zeros(0, dim, device=device),
                          torch.zeros(0, dtype=torch.long, device=device), "")
    return HeadInputs(spec.name, 0, ds.classnames, ds.base_labels, ds.new_labels, text,
                      text_keys, none, empty, split_features(ds, ex, Split.TEST, device))


def zero_shot_text(ex: Extractor, spec: DatasetSpec, classnames: tuple[str, ...],
                   device: torch.device) -> tuple[torch.Tensor, tuple[str, ...]]:
    """The zero-shot classifier (C, D) of the dataset's templates, and the text sets it read."""
    sets, keys = [], []
    for template in spec.templates:
        texts = ex.texts(template, classnames)
        if texts is None:
            raise StoreError(f"dataset {spec.name}: no text features for template {template!r} "
                             "(run `shipyard extract`)")
        sets.append(torch.from_numpy(texts.features.astype(np.float32)))
        keys.append(texts.key)
    return zero_shot_weights(sets).to(device), tuple(keys)


def split_features(ds: StoredDataset, ex: Extractor, split: Split, device: torch.device,
                   rows: np.ndarray | None = None) -> SplitFeatures:
    """Features of a split's rows (all of them unless `rows` is given), labels over all classes."""
    dataset = str(ds.attrs["name"])
    if rows is None:
        rows = np.flatnonzero(ds.splits() == split)
    index = ex.images.index()
    keys = ds.keys()[rows]
    missing = sum(k.tobytes() not in index for k in keys)
    if missing:
        raise StoreError(f"dataset {dataset}: {missing} {split.name.lower()} images have no "
                         f"features in extractor {ex.fp[:12]} (run `shipyard extract`)")
    feats = require_unit_rows(
        ex.images.read("features", np.array([index[k.tobytes()] for k in keys], np.int64)),
        f"extractor {ex.fp[:12]} images")
    labels = ds.labels()[rows]
    return SplitFeatures(F.normalize(torch.from_numpy(feats.astype(np.float32)), dim=-1).to(device),
                         torch.from_numpy(labels.astype(np.int64)).to(device),
                         subset_key(keys, labels, ds.classnames))
