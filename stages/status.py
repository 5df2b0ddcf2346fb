"""`status`: what the manifest asks for, what the store holds, and what is stale and why."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import StoreError
from pipeline.extraction import extractor_description
from pipeline.fingerprint import fingerprint
from pipeline.manifest import Manifest
from pipeline.models import load_clip, resolve_device
from pipeline.progress import Progress, Silent
from pipeline.store import FeatureStore
from stages.base import StageSpec
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
    clip = load_clip(manifest.model, resolve_device(opts.device))
    fp = fingerprint(extractor_description(clip, manifest.extraction))
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
            entry = {
                "name": plan.spec.name,
                "records": len(plan.data.records) + len(plan.data.rejected),
                "unusable": len(plan.failures),
                "missing_features": len(keys - have),
                "missing_views": missing_views,
                "missing_text_sets": len(texts),
                "records_current": store.dataset_version(plan.spec.name) == version,
            }
            entry["stale"] = _reasons(entry)
            out["datasets"].append(entry)
        out["up_to_date"] = all(not d["stale"] for d in out["datasets"])
    return out


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
