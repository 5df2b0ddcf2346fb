"""`build-cache`: Tip-Adapter's key-value cache (few-shot keys, one-hot values, optionally with
SHIP's synthesized new-class features) with a serialized FAISS index and alpha/beta tuned on val."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.fingerprint import fingerprint
from pipeline.heads import LOGIT_SCALE, cache_keys
from pipeline.manifest import Manifest
from pipeline.progress import Progress
from pipeline.store import FeatureStore, attrs_of, child_array, read_array
from pipeline.tip import (
    CacheIndex,
    cache_logits,
    resolve_topk,
    search_alpha_beta,
    tip_logits,
    top1_agreement,
)
from stages.base import StageSpec
from stages.common import ModelContext, dataset_seeds, model_context, require_extractor
from stages.head_inputs import (
    HeadInputs,
    checked_artifact,
    head_inputs,
    resolve_synthetic,
    synthetic_features,
)

SPEC = StageSpec(
    name="build-cache",
    version=1,
    inputs=("extractors/<fp>/views", "datasets/<name>", "synthetic/<fp>"),
    params=("heads.cache_index", "heads.cache_topk", "heads.tip_scale", "synthetic", "seed"),
    outputs=("caches/<fp>",),
    summary="Tip-Adapter cache: keys, values, FAISS index, alpha/beta searched on val",
)


@dataclass(frozen=True)
class BuildCacheOptions:
    synthetic: str = "none"  # none | auto | a synthetic set fingerprint
    index: str | None = None  # flat | ivf | hnsw; default heads.cache_index
    topk: int | None = None  # default heads.cache_topk
    datasets: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    device: str = "auto"
    force: bool = False


@torch.no_grad()
def tune_alpha_beta(keys: torch.Tensor, key_labels: torch.Tensor, inputs: HeadInputs,
                    scale: tuple[float, float], with_new: bool) -> dict[str, float]:
    """Tip-Adapter's grid search on val over the classes the cache covers (base, + new when
    synthesized features are in it); labels are remapped to those classes."""
    classes = torch.tensor(inputs.base + (inputs.new if with_new else []),
                           device=inputs.val.labels.device)
    keep = torch.isin(inputs.val.labels, classes)
    if not bool(keep.any()):
        return {"alpha": 1.0, "beta": 1.0, "val_accuracy": float("nan")}
    remap = torch.full((len(inputs.classnames),), -1, dtype=torch.long, device=classes.device)
    remap[classes] = torch.arange(len(classes), device=classes.device)
    alpha, beta, acc = search_alpha_beta(inputs.val.features[keep], remap[inputs.val.labels[keep]],
                                         keys, remap[key_labels], inputs.text[classes],
                                         scale[0], scale[1])
    return {"alpha": float(alpha), "beta": float(beta), "val_accuracy": float(acc)}


def cache_description(ctx: ModelContext, inputs: HeadInputs, synthetic: str | None, kind: str,
                      topk: int | None, scale: tuple[float, float]) -> dict[str, Any]:
    return {"stage": SPEC.name, "version": SPEC.version, "extractor": ctx.extractor_fp,
            "inputs": inputs.key(), "dataset": inputs.dataset, "seed": inputs.seed,
            "synthetic": synthetic, "index": kind, "topk": topk, "tip_scale": list(scale),
            "classnames": list(inputs.classnames)}


def run(manifest: Manifest, opts: BuildCacheOptions,
        progress: Progress | None = None) -> dict[str, Any]:
    ctx = model_context(manifest, opts.device)
    kind = opts.index or manifest.heads.cache_index
    topk = opts.topk if opts.topk is not None else manifest.heads.cache_topk
    results = []
    with FeatureStore.open(manifest.store, read_only=False, options=manifest.store_options) as store:
        ex = require_extractor(store, ctx)
        for spec, seed in dataset_seeds(manifest, opts.datasets, opts.seeds):
            inputs = head_inputs(store, ex, spec, seed, ctx.clip.device)
            syn = resolve_synthetic(store, ctx, manifest, inputs, opts.synthetic)
            out = build_cache(store, ctx, manifest, inputs, syn, kind, topk, opts.force)
            results.append({"dataset": spec.name, "seed": seed, **out})
    return {"stage": SPEC.name, "index": kind, "topk": topk, "caches": results}


def build_cache(store: FeatureStore, ctx: ModelContext, manifest: Manifest, inputs: HeadInputs,
                synthetic: str | None, kind: str, topk: int | None, force: bool) -> dict[str, Any]:
    scale = manifest.heads.tip_scale
    desc = cache_description(ctx, inputs, synthetic, kind, topk, scale)
    fp = fingerprint(desc)
    done = store.artifact("caches", fp)
    if done is not None and not force:
        a = attrs_of(done)
        return {"cache": fp, "status": "up to date", "keys": a["keys"], "alpha": a["alpha"],
                "beta": a["beta"], "agreement": a.get("agreement"), "seconds": 0.0}
    started = time.perf_counter()
    keys = cache_keys(inputs.train.views, inputs.train.clean)  # (M, D)
    labels = inputs.train.labels
    if synthetic:
        syn, syn_labels = synthetic_features(store, synthetic, inputs, ctx.clip.device)
        keys, labels = torch.cat([keys, syn]), torch.cat([labels, syn_labels])
    tuned = tune_alpha_beta(keys, labels, inputs, scale, with_new=synthetic is not None)
    index = CacheIndex.build(keys.cpu().numpy().astype(np.float32), kind)
    agreement = None
    if not index.exact:
        agreement = _agreement(index, keys, labels, inputs, tuned, topk)
    group = store.create_artifact("caches", fp, desc)
    group.create_array("keys", data=keys.cpu().numpy().astype(np.float32),
                       chunks=(max(1, min(len(keys), 65536)), keys.shape[1]))
    group.create_array("labels", data=labels.cpu().numpy(), chunks=(max(1, min(len(labels), 1 << 20)),))
    blob = index.to_bytes()
    group.create_array("index", data=blob, chunks=(max(1, min(len(blob), 1 << 24)),))
    group.update_attributes({"keys": len(keys), **tuned, "agreement": agreement})
    group.attrs["complete"] = True
    return {"cache": fp, "status": "built", "keys": len(keys), **tuned, "agreement": agreement,
            "seconds": round(time.perf_counter() - started, 3)}


def _agreement(index: CacheIndex, keys: torch.Tensor, labels: torch.Tensor, inputs: HeadInputs,
               tuned: dict[str, float], topk: int | None) -> dict[str, Any]:
    """Top-1 agreement of the approximate cache with the exact dense result on test queries."""
    q = inputs.test.features[:2048]
    exact = tip_logits(q, keys, labels, inputs.text, tuned["alpha"], tuned["beta"], LOGIT_SCALE)
    approx = cache_logits(index, q.cpu().numpy(), labels.cpu().numpy(), inputs.text.cpu().numpy(),
                          tuned["alpha"], tuned["beta"], topk=topk)
    return {"sample": len(q), "topk": resolve_topk(index, topk),
            "top1_agreement": top1_agreement(torch.as_tensor(approx), exact.cpu())}


class CachedTip(torch.nn.Module):
    """Training-free Tip-Adapter answering through a stored FAISS cache."""

    def __init__(self, index: CacheIndex, labels: np.ndarray, text: torch.Tensor, alpha: float,
                 beta: float, topk: int | None) -> None:
        super().__init__()
        self.index, self.labels, self.text = index, labels, text
        self.alpha, self.beta, self.topk = alpha, beta, topk

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        out = cache_logits(self.index, f.cpu().numpy(), self.labels, self.text.cpu().numpy(),
                           self.alpha, self.beta, topk=self.topk)
        return torch.as_tensor(out).to(f.device)


def load_cache(store: FeatureStore, fp: str, ctx: ModelContext, inputs: HeadInputs) -> CachedTip:
    a = checked_artifact(store, "caches", fp, ctx, inputs)
    desc = a["fingerprint"]
    group = store.artifact("caches", fp)
    assert group is not None  # checked_artifact found it
    index = CacheIndex.from_bytes(read_array(child_array(group, "index")))
    return CachedTip(index, read_array(child_array(group, "labels")), inputs.text,
                     float(a["alpha"]), float(a["beta"]), desc["topk"])
