"""`extract`: encode the images and class names a manifest names, only those the store lacks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import ImageError
from pipeline.extraction import WorkItem, encode_clean, encode_views, extractor_description
from pipeline.fingerprint import fingerprint
from pipeline.manifest import Manifest
from pipeline.models import encode_texts, load_clip, resolve_device
from pipeline.progress import Progress, Silent
from pipeline.store import Extractor, FeatureStore
from stages.base import StageSpec
from stages.plan import DatasetPlan, plan_datasets, records_table, select_datasets, view_keys

SPEC = StageSpec(
    name="extract",
    version=1,
    inputs=("manifest.datasets", "manifest.model", "manifest.extraction"),
    params=("model", "extraction.views", "extraction.augment", "extraction.seed"),
    outputs=("extractors/<fp>/images", "extractors/<fp>/views", "extractors/<fp>/texts",
             "datasets/<name>"),
    summary="encode images (clean + augmented views) and class-name prompts into the store",
)


@dataclass(frozen=True)
class ExtractOptions:
    datasets: tuple[str, ...] = ()  # empty: every dataset of the manifest
    strict: bool = False  # any unusable image is fatal
    device: str = "auto"
    cache_dir: Path | None = None  # stat cache folder (default: $SHIPYARD_CACHE_DIR or ~/.cache)


def run(manifest: Manifest, opts: ExtractOptions, progress: Progress | None = None) -> dict[str, Any]:
    """Bring the store up to date with the manifest's images; returns the summary for --json."""
    progress = progress or Silent()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    specs = select_datasets(manifest, list(opts.datasets))
    plans = plan_datasets(specs, manifest.extraction.workers, progress, opts.cache_dir)
    failures = [f for p in plans for f in p.failures]
    if opts.strict and failures:  # before anything is written
        raise ImageError(f"{failures[0].path}: {failures[0].reason} (--strict)")
    timings["hash"] = time.perf_counter() - started

    t0 = time.perf_counter()
    clip = load_clip(manifest.model, resolve_device(opts.device))
    description = extractor_description(clip, manifest.extraction)
    fp = fingerprint(description)
    timings["load_model"] = time.perf_counter() - t0

    spec = manifest.extraction
    with FeatureStore.open(manifest.store, read_only=False, create=True,
                           options=manifest.store_options) as store:
        ex = store.create_extractor(fp, description, clip.embed_dim, spec.views, spec.chunk_rows)
        have = ex.images.index()
        work = _missing(plans, have)
        clean = encode_clean(clip, ex.images, work, spec, progress, opts.strict)
        failures += clean.failures
        timings["encode"] = clean.seconds
        have = ex.images.index()

        tables = [records_table(p, set(have), spec.views_for) for p in plans]
        views_done, views_failed = 0, 0
        if spec.views > 0:
            view_work = _missing_views(plans, tables, ex, spec.views_for)
            res = encode_views(clip, ex.view_table, view_work, spec, progress, opts.strict)
            views_done, views_failed = res.encoded, len(res.failures)
            timings["views"] = res.seconds

        t0 = time.perf_counter()
        texts = _ensure_texts(clip, ex, plans)
        timings["texts"] = time.perf_counter() - t0
        decode_failed = {f.path: f for f in clean.failures}
        updated = []
        for plan, (arrays, attrs, version) in zip(plans, tables, strict=True):
            mine = plan.failures + [decode_failed[str(plan.data.file(r))] for r, _ in plan.hashed()
                                    if str(plan.data.file(r)) in decode_failed]
            attrs = {**attrs, "failures": [f.to_dict() for f in mine]}
            if store.write_dataset(plan.spec.name, version, arrays, attrs):
                updated.append(plan.spec.name)

    seconds = time.perf_counter() - started
    distinct = {k for p in plans for _, k in p.hashed()}
    return {
        "stage": "extract",
        "extractor": fp,
        "store": manifest.store,
        "datasets": [p.spec.name for p in plans],
        "records_updated": updated,
        "images": len(distinct),
        "extracted": clean.encoded,
        "reused": len(distinct) - len(work),
        "failed": len(failures),
        "failures": [f.to_dict() for f in failures],
        "views_extracted": views_done,
        "views_failed": views_failed,
        "texts_extracted": texts,
        "seconds": round(seconds, 3),
        # Throughput of the encode phase (read, verify, decode, preprocess, forward, write).
        "images_per_second": round(clean.encoded / clean.seconds, 2) if clean.seconds else 0.0,
        "model_seconds": round(clean.model_seconds, 3),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def _missing(plans: list[DatasetPlan], have: dict[bytes, int]) -> list[WorkItem]:
    """Distinct keys not yet in the table, in manifest order (deterministic across runs)."""
    work, seen = [], set(have)
    for plan in plans:
        for rec, key in plan.hashed():
            if key not in seen:
                seen.add(key)
                path = plan.data.file(rec)
                work.append(WorkItem(key, path, str(path)))
    return work


def _missing_views(plans: list[DatasetPlan], tables: list[Any], ex: Extractor,
                   views_for: Any) -> list[WorkItem]:
    have = set(ex.view_table.index())
    work = []
    for plan, (arrays, _attrs, _v) in zip(plans, tables, strict=True):
        keys = arrays["keys"]
        hashed = {k: plan.data.file(r) for r, k in plan.hashed()}
        for row in view_keys(plan, arrays, views_for):
            key = keys[row].tobytes()
            if key not in have:
                have.add(key)
                work.append(WorkItem(key, hashed[key], str(hashed[key])))
    return work


def _ensure_texts(clip: Any, ex: Extractor, plans: list[DatasetPlan]) -> int:
    """Encode `template.format(classname)` for every template and class set the store lacks."""
    count = 0
    for plan in plans:
        names = plan.data.classnames
        for template in plan.spec.templates:
            if ex.texts(template, names) is None:
                features = encode_texts(clip, [template.format(c) for c in names])
                ex.write_texts(template, names, features)
                count += 1
    return count

