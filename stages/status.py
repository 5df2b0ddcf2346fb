"""`status`: what the manifest asks for, what the store holds, and what is stale and why."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError
from pipeline.fingerprint import fingerprint
from pipeline.manifest import Manifest
from pipeline.progress import Progress, Silent
from pipeline.store import FeatureStore
from stages.base import StageSpec
from stages.common import ModelContext, model_context
from stages.plan import plan_datasets, records_table, select_datasets, view_keys

SPEC = StageSpec(
    name="status",
    version=1,
    inputs=("manifest", "store"),
    params=(),
    outputs=(),
    summary="compare the manifest with the store; writes nothing",
)


@dataclass(frozen=True)
class StatusOptions:
    datasets: tuple[str, ...] = ()
    device: str = "auto"
    cache_dir: Path | None = None


def run(manifest: Manifest, opts: StatusOptions, progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or Silent()
    plans = plan_datasets(select_datasets(manifest, list(opts.datasets)),
                          manifest.extraction.workers, progress, opts.cache_dir)
    ctx = model_context(manifest, opts.device)
    fp = ctx.extractor_fp
    out: dict[str, Any] = {"stage": "status", "store": manifest.store, "extractor": fp,
                           "up_to_date": False, "datasets": []}
    try:
        store = FeatureStore.open(manifest.store, read_only=True, options=manifest.store_options)
    except StoreError as exc:
        out["reason"] = str(exc)
        return out
    with store:
        out["extractors_in_store"] = store.extractor_fps()
        if not store.has_extractor(fp):
            others = ", ".join(f[:12] for f in store.extractor_fps()) or "none"
            out["reason"] = (f"no extractor {fp[:12]} for this model and preprocessing "
                             f"(store has: {others}); `extract` builds it, the others stay intact")
            return out
        ex = store.extractor(fp)
        have = set(ex.images.index())
        have_views = set(ex.view_table.index()) if ex.views else set()
        for plan in plans:
            # Images that failed to decode last time are reported there, not counted as missing.
            known_bad = _known_failures(store, plan.spec.name)
            keys = {k for r, k in plan.hashed() if str(plan.data.file(r)) not in known_bad}
            arrays, _attrs, version = records_table(plan, have, manifest.extraction.views_for)
            rows = view_keys(plan, arrays, manifest.extraction.views_for) if ex.views else []
            missing_views = len({arrays["keys"][r].tobytes() for r in rows} - have_views)
            texts = [t for t in plan.spec.templates if ex.texts(t, plan.data.classnames) is None]
            entry: dict[str, Any] = {
                "name": plan.spec.name,
                "records": len(plan.data.records) + len(plan.data.rejected),
                "unusable": len(plan.failures),
                "missing_features": len(keys - have),
                "missing_views": missing_views,
                "missing_text_sets": len(texts),
                "records_current": store.dataset_version(plan.spec.name) == version,
            }
            entry["stale"] = _reasons(entry)
            if not entry["stale"]:  # later stages only mean something on current features
                entry["stale"] += _artefacts(store, ctx, manifest, plan.spec, ex)
            out["datasets"].append(entry)
        out["up_to_date"] = all(not d["stale"] for d in out["datasets"])
    return out


def _artefacts(store: FeatureStore, ctx: ModelContext, manifest: Manifest, spec: Any,
               ex: Any) -> list[str]:
    """What `run` would still train or build for this dataset, per seed and head."""
    from stages.build_cache import cache_description
    from stages.head_inputs import head_inputs, synthetic_fp
    from stages.train_adapter import adapter_fp

    missing = []
    h = manifest.heads
    for seed in spec.seeds:
        inputs = head_inputs(store, ex, spec, seed, ctx.clip.device)
        syn = synthetic_fp(ctx, manifest, inputs)
        ship_needed = any(m.endswith("+ship") for m in h.methods)
        if ship_needed and store.artifact("synthetic", syn) is None:
            missing.append(f"seed {seed}: no SHIP synthetic set for the current settings")
        for method in h.methods:
            base, uses = method.removesuffix("+ship"), syn if method.endswith("+ship") else None
            if base == "zero-shot":
                continue
            if base == "tip-adapter":
                fp = fingerprint(cache_description(ctx, inputs, uses, h.cache_index, h.cache_topk,
                                                   h.tip_scale))
                present = store.artifact("caches", fp) is not None
            else:
                present = store.artifact("adapters", adapter_fp(ctx, manifest, inputs, base,
                                                                uses)) is not None
            if not present:
                missing.append(f"seed {seed}: {method} not trained/built for the current settings")
    return missing


def _known_failures(store: FeatureStore, name: str) -> set[str]:
    if store.dataset_version(name) is None:
        return set()
    return {f["path"] for f in store.dataset(name).failures}


def _reasons(entry: dict[str, Any]) -> list[str]:
    reasons = []
    if entry["missing_features"]:
        reasons.append(f"{entry['missing_features']} images have no features")
    if entry["missing_views"]:
        reasons.append(f"{entry['missing_views']} training images have no augmented views")
    if entry["missing_text_sets"]:
        reasons.append(f"{entry['missing_text_sets']} templates have no text features")
    if not entry["records_current"]:
        reasons.append("stored records differ from the split (files added, renamed or relabelled)")
    return reasons
