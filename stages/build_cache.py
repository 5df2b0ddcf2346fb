"""`build-cache`: Tip-Adapter's key-value cache (few-shot keys, one-hot values, optionally with
SHIP's synthesized new-class features) with alpha/beta tuned on val, and either a serialized
FAISS index or the classes index (keys grouped by class, sub-centroids, a tuned candidate count).

Model code is imported inside `compute`: planning imports none."""

from __future__ import annotations

from typing import Any

from ..pipeline.artifacts import CACHE
from ..pipeline.identity import view_recipe_key
from ..pipeline.recipes import head_config, tip_scale
from .base import Declared, Outcome, Scope, Slot, Stage, Work


def declare(slot: Slot) -> Declared | None:
    mine = slot.head("build-cache")
    if mine is None:
        return None
    spec, ship = mine
    heads = slot.manifest.heads
    topk = slot.options.get("topk")
    assert slot.method is not None
    cfg = head_config(slot.manifest, slot.spec, slot.method)
    params = {"head": spec.name, "index": slot.options.get("index") or heads.cache_index,
              "topk": topk if topk is not None else heads.cache_topk,
              "tip_scale": list(tip_scale(slot.manifest, slot.spec)),
              "init": [cfg.alpha, cfg.beta], "keys": cfg.keys}
    if params["index"] == "classes":
        candidates = slot.options.get("candidates")
        params |= {"candidates": candidates if candidates is not None else heads.cache_candidates,
                   "agreement_target": heads.cache_agreement}
    inputs, deps, requires = slot.head_inputs(spec, ship, reads_test=False)
    if cfg.views != "primary":
        inputs["views"] = view_recipe_key(slot.manifest.extraction, cfg.views)
    return Declared(params, inputs, deps, requires=requires)


def compute(work: Work) -> Outcome:
    import torch

    from ..pipeline.head_inputs import head_inputs
    from ..pipeline.head_store import synthetic_features
    from ..pipeline.heads import cache_keys
    from ..pipeline.tip import tune_alpha_beta

    job, env, store, group = work.job, work.env, work.store, work.group
    device = env.clip.device
    inputs = head_inputs(store, env.extractor(store), env.manifest.dataset(job.dataset),
                         int(job.seed or 0), device, job.inputs.get("views", "primary"))
    inputs.check(job.inputs, job.id)
    keys = cache_keys(inputs.train.views, inputs.train.clean, inputs.train.view_norms,
                      job.params["keys"])  # (M, D)
    labels = inputs.train.labels
    synthetic = job.inputs.get("synthetic")
    if synthetic:
        syn, syn_labels = synthetic_features(store, synthetic, inputs, device)
        keys, labels = torch.cat([keys, syn]), torch.cat([labels, syn_labels])
    # Tuned on base-class val only, with or without synthetic keys: nothing tuned here ever sees a
    # labelled new-class image.
    tuned = tune_alpha_beta(keys, labels, inputs.val.features, inputs.val.labels, inputs.text,
                            inputs.base, tuple(job.params["tip_scale"]),
                            tuple(job.params["init"]))
    write = _write_classes if job.params["index"] == "classes" else _write_faiss
    summary = {"keys": len(keys), **tuned, **write(group, keys, labels, inputs, tuned, job.params)}
    return Outcome({**summary, "classnames": list(inputs.classnames)}, summary)


def _write_faiss(group: Any, keys: Any, labels: Any, inputs: Any, tuned: dict[str, float],
                 params: dict[str, Any]) -> dict[str, Any]:
    """Keys, labels and the serialized FAISS index; an approximate one's agreement with dense."""
    import numpy as np

    from ..pipeline.cache_index import CacheIndex
    from ..pipeline.zarr_nodes import write_sealed

    index = CacheIndex.build(keys.cpu().numpy().astype(np.float32), params["index"])
    agreement = None if index.exact else _agreement(index, keys, labels, inputs, tuned,
                                                     params["topk"])
    _write_keys(group, keys.cpu().numpy().astype(np.float32), labels.cpu().numpy())
    blob = index.to_bytes()
    write_sealed(group, "index", blob, chunks=(max(1, min(len(blob), 1 << 24)),))
    return {"agreement": agreement}


def _write_classes(group: Any, keys: Any, labels: Any, inputs: Any, tuned: dict[str, float],
                   params: dict[str, Any]) -> dict[str, Any]:
    """Keys and labels grouped by class, the class offsets and sub-clusters, and the candidate
    count T: the given one, or the smallest power of two reaching the agreement target on val
    (as unlabelled queries: T is chosen by agreement with dense, never by accuracy)."""
    from ..pipeline.class_index import ClassIndex, tune_candidates, tuning_queries
    from ..pipeline.heads import LOGIT_SCALE
    from ..pipeline.zarr_nodes import write_sealed

    index = ClassIndex.build(keys, labels, len(inputs.classnames))
    scopes = {"all": None, "base": inputs.base, "new": inputs.new}
    fixed = params["candidates"]
    queries = tuning_queries(inputs.val.features, index.keys)
    found = tune_candidates(index, queries, inputs.text,
                            tuned["alpha"], tuned["beta"], scopes,
                            target=0.0 if fixed else params["agreement_target"], start=fixed or 1,
                            logit_scale=LOGIT_SCALE)
    _write_keys(group, index.keys.cpu().numpy(), index.labels().cpu().numpy())
    for name in ("offsets", "centroids", "counts", "owner"):
        value = getattr(index, name).cpu().numpy()
        write_sealed(group, name, value, chunks=(max(1, min(len(value), 1 << 16)), *value.shape[1:]))
    return {"candidates": found["candidates"],
            "agreement": {"sample": found["queries"], "candidates": found["candidates"],
                          "val": min(len(inputs.val.features), len(queries)),
                          "target": params["agreement_target"], "scopes": found["agreement"],
                          "top1_agreement": min(found["agreement"].values())}}


def _write_keys(group: Any, keys: Any, labels: Any) -> None:
    from ..pipeline.zarr_nodes import write_sealed

    write_sealed(group, "keys", keys, chunks=(max(1, min(len(keys), 65536)), keys.shape[1]))
    write_sealed(group, "labels", labels, chunks=(max(1, min(len(labels), 1 << 20)),))


def _agreement(index: Any, keys: Any, labels: Any, inputs: Any, tuned: dict[str, float],
               topk: int | None) -> dict[str, Any]:
    """Top-1 agreement of the approximate cache with the exact dense result on test queries."""
    import torch

    from ..pipeline.cache_index import cache_logits, resolve_topk, top1_agreement
    from ..pipeline.heads import LOGIT_SCALE
    from ..pipeline.tip import tip_logits

    q = inputs.test.features[:2048]
    exact = tip_logits(q, keys, labels, inputs.text, tuned["alpha"], tuned["beta"], LOGIT_SCALE)
    approx = cache_logits(index, q.cpu().numpy(), labels.cpu().numpy(), inputs.text.cpu().numpy(),
                          tuned["alpha"], tuned["beta"], topk=topk)
    return {"sample": len(q), "topk": resolve_topk(index, topk),
            "top1_agreement": top1_agreement(torch.as_tensor(approx), exact.cpu())}


STAGE = Stage(name="build-cache", kind=CACHE, scope=Scope.HEAD, declare=declare, compute=compute,
              summary="Tip-Adapter cache: keys, values, FAISS or classes index, alpha/beta searched on val")
