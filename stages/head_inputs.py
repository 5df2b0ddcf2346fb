"""The tensors every head stage starts from, for one dataset and few-shot seed: base-class shots,
val and test features, the zero-shot text classifier, and the SHIP synthetic features."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.datasets import Split
from pipeline.errors import StoreError, UsageError
from pipeline.features import FewShotSet, fewshot_set
from pipeline.fingerprint import fingerprint
from pipeline.manifest import DatasetSpec, Manifest
from pipeline.store import Extractor, FeatureStore, attrs_of
from stages.common import ModelContext
from stages.synthesize import read_synthetic, synthetic_description
from stages.train_generator import generator_description, ship_config, train_config


@dataclass(frozen=True)
class SplitFeatures:
    features: torch.Tensor  # (N, D) unit norm
    labels: torch.Tensor  # (N,) over all classes


@dataclass(frozen=True)
class HeadInputs:
    dataset: str
    seed: int
    classnames: tuple[str, ...]
    base: list[int]
    new: list[int]
    text: torch.Tensor  # (C, D) zero-shot classifier: template ensemble, normalized
    train: FewShotSet  # base-class K-shot set; labels are the dataset's ids (base = 0..m-1)
    val: SplitFeatures
    test: SplitFeatures

    def key(self) -> str:
        """Content key of everything a head is trained and evaluated on."""
        return fingerprint({"train": self.train.content_key, "classnames": list(self.classnames),
                            "text": _digest(self.text)})


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().numpy().tobytes()).hexdigest()


def head_inputs(store: FeatureStore, ex: Extractor, spec: DatasetSpec, seed: int,
                device: torch.device) -> HeadInputs:
    ds = store.dataset(spec.name)
    base, new = ds.base_labels, ds.new_labels
    train = fewshot_set(store, ex, spec.name, spec.shots, seed, base, device)
    text = zero_shot_text(ex, spec, ds.classnames, device)
    return HeadInputs(spec.name, seed, ds.classnames, base, new, text, train,
                      _split(store, ex, spec.name, Split.VAL, device),
                      _split(store, ex, spec.name, Split.TEST, device))


def zero_shot_text(ex: Extractor, spec: DatasetSpec, classnames: tuple[str, ...],
                   device: torch.device) -> torch.Tensor:
    """Normalize each template's class features, average over templates, normalize: (C, D)."""
    sets = []
    for template in spec.templates:
        texts = ex.texts(template, classnames)
        if texts is None:
            raise StoreError(f"dataset {spec.name}: no text features for template {template!r} "
                             "(run `shipyard extract`)")
        sets.append(F.normalize(torch.from_numpy(texts.features.astype(np.float32)), dim=-1))
    return F.normalize(torch.stack(sets).mean(0), dim=-1).to(device)


def _split(store: FeatureStore, ex: Extractor, dataset: str, split: Split,
           device: torch.device) -> SplitFeatures:
    ds = store.dataset(dataset)
    rows = np.flatnonzero(ds.splits() == split)
    index = ex.images.index()
    keys = ds.keys()[rows]
    missing = sum(k.tobytes() not in index for k in keys)
    if missing:
        raise StoreError(f"dataset {dataset}: {missing} {split.name.lower()} images have no "
                         f"features in extractor {ex.fp[:12]} (run `shipyard extract`)")
    feats = ex.images.read("features", np.array([index[k.tobytes()] for k in keys], np.int64))
    return SplitFeatures(F.normalize(torch.from_numpy(feats.astype(np.float32)), dim=-1).to(device),
                  torch.from_numpy(ds.labels()[rows].astype(np.int64)).to(device))


def synthetic_fp(ctx: ModelContext, manifest: Manifest, inputs: HeadInputs) -> str:
    """The synthetic set `synthesize` writes for this dataset and seed under this manifest."""
    spec = manifest.dataset(inputs.dataset)
    gen = fingerprint(generator_description(ctx, inputs.train, inputs.dataset, spec.shots,
                                            inputs.seed, ship_config(manifest.ship.variant),
                                            train_config(manifest)))
    syn = manifest.ship.synthesize
    return fingerprint(synthetic_description(gen, syn.per_class, syn.seed))


def synthetic_features(store: FeatureStore, fp: str, inputs: HeadInputs,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthesized features of the dataset's new classes: (S, D) and their labels (S,)."""
    names = [inputs.classnames[i] for i in inputs.new]
    found = read_synthetic(store, fp, names)
    absent = [n for n in names if n not in found]
    if absent:
        raise UsageError(f"synthetic set {fp[:12]} lacks {len(absent)} new classes of "
                         f"{inputs.dataset} (e.g. {absent[0]!r}); run `shipyard synthesize`")
    feats = np.concatenate([found[n] for n in names]).astype(np.float32)
    labels = np.concatenate([np.full(len(found[n]), i)
                             for n, i in zip(names, inputs.new, strict=True)])
    return (F.normalize(torch.from_numpy(feats), dim=-1).to(device),
            torch.from_numpy(labels.astype(np.int64)).to(device))


def resolve_synthetic(store: FeatureStore, ctx: ModelContext, manifest: Manifest,
                      inputs: HeadInputs, choice: str) -> str | None:
    """`none` -> None; `auto` -> this manifest's synthetic set (must exist); else an explicit fp."""
    if choice == "none":
        return None
    fp = synthetic_fp(ctx, manifest, inputs) if choice == "auto" else choice
    if store.artifact("synthetic", fp) is None:
        raise UsageError(f"dataset {inputs.dataset} seed {inputs.seed}: no synthetic set "
                         f"{fp[:12]} in the store (run `shipyard synthesize`)")
    return fp


def checked_artifact(store: FeatureStore, kind: str, fp: str, ctx: ModelContext,
                     inputs: HeadInputs) -> dict[str, Any]:
    """Attributes of a stored head or cache, refused unless it was made from this extractor's
    features for exactly this dataset's classes."""
    what = {"adapters": ("adapter", "train-adapter"), "caches": ("cache", "build-cache")}[kind]
    group = store.artifact(kind, fp)
    if group is None:
        raise UsageError(f"{store.location} has no {what[0]} {fp[:12]} (run `shipyard {what[1]}`)")
    attrs = attrs_of(group)
    desc = attrs["fingerprint"]
    if desc["extractor"] != ctx.extractor_fp:
        raise UsageError(f"{what[0]} {fp[:12]} was made from features of extractor "
                         f"{desc['extractor'][:12]}, not this manifest's {ctx.extractor_fp[:12]}")
    if desc["classnames"] != list(inputs.classnames):
        raise UsageError(f"{what[0]} {fp[:12]} was made for other classes than dataset "
                         f"{inputs.dataset}'s")
    return attrs
