"""`extract`: encode the images and class names a manifest names, only those the store lacks, and
store each dataset's records (path -> image key, label, split) as a content-keyed version.

Model code is imported inside the compute functions: planning imports none."""

from __future__ import annotations

import time
from typing import Any

from ..pipeline.artifacts import RECORDS, Ref
from ..pipeline.dataset_plan import DatasetPlan, PlannedDataset, records_table, view_rows
from ..pipeline.errors import ImageError
from ..pipeline.identity import view_recipe, view_recipe_key
from ..pipeline.records import Extractor
from ..pipeline.rows import RowTable
from ..pipeline.store import FeatureStore
from .base import Declared, Job, Outcome, Scope, Slot, Stage, Work


def declare(slot: Slot) -> Declared:
    """Keyed by the records it will store; the detail is the hashed dataset itself."""
    spec = slot.manifest.extraction
    recipes = {name: view_recipe_key(spec, name) for name in spec.recipes} if spec.views else {}
    return Declared(params={"templates": list(slot.spec.templates), "views": spec.views,
                            "recipes": recipes},
                    inputs={"extractor": slot.extractor}, key=slot.facts.records,
                    detail=slot.dataset)


def counts(store: FeatureStore, job: Job) -> dict[str, Any]:
    """What a dataset's extraction still lacks: features, views, text sets, current records."""
    d: PlannedDataset = job.detail
    fp = job.inputs["extractor"]
    ex = store.extractor(fp) if store.has_extractor(fp) else None
    have = ex.images.index() if ex else {}
    absent = {k for r, k in d.plan.hashed()
              if k not in have and (str(d.plan.data.file(r)), k.hex()) not in d.known_bad}
    lacking = 0
    if int(job.params["views"]) > 0:
        rows = view_rows(d.spec, d.arrays, d.views_for)
        wanted = {d.arrays["keys"][r].tobytes() for r in rows}
        for recipe in ["primary", *job.params.get("recipes", {}).values()]:
            table = ex.views_of(recipe) if ex and ex.views else None
            lacking += len(wanted - set(table.index() if table else ()))
    texts = [t for t in d.spec.templates if ex is None or not ex.has_texts(t, d.facts.classnames)]
    return {"records": len(d.plan.data.records) + len(d.plan.data.rejected),
            "unusable": len(d.plan.failures) + len(d.known_failures),
            "missing_features": len(absent),
            "missing_views": lacking, "missing_text_sets": len(texts),
            "records_current": store.dataset_version(job.dataset) == job.key}


def missing(store: FeatureStore, job: Job) -> list[str]:
    """Why a dataset's extraction is incomplete (empty: up to date)."""
    if not store.has_extractor(job.inputs["extractor"]):
        return ["no features of this model and preprocessing in the store yet"]
    c = counts(store, job)
    reasons = []
    if c["missing_features"]:
        reasons.append(f"{c['missing_features']} images have no features")
    if c["missing_views"]:
        reasons.append(f"{c['missing_views']} training images have no augmented views")
    if c["missing_text_sets"]:
        reasons.append(f"{c['missing_text_sets']} templates have no text features")
    if not c["records_current"]:
        reasons.append("stored records differ from the split (files added, renamed or relabelled)")
    return reasons


def compute_batch(works: list[Work]) -> dict[str, Any]:
    """Encode what every stale dataset lacks (shared images once), then store the records."""
    from ..pipeline.extraction import encode_clean, encode_views

    env, store = works[0].env, works[0].store
    spec = env.manifest.extraction
    planned: list[PlannedDataset] = [w.job.detail for w in works]
    plans = [d.plan for d in planned]
    started = time.perf_counter()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    clip = env.clip
    timings["load_model"] = time.perf_counter() - t0
    ex = store.create_extractor(env.extractor_fp, env.description(), clip.embed_dim, spec.views,
                                spec.chunk_rows)
    work = _missing(plans, ex.images.index())
    remote = _workers(env)
    clean = encode_clean(clip, ex.images, work, spec, env.progress, env.strict, remote)
    timings["encode"] = clean.seconds
    have = set(ex.images.index())
    tables = [records_table(p, have) for p in plans]
    views_done, views_failed = 0, 0
    if spec.views > 0:  # the primary recipe, then each named one in its own table
        recipes = [("views", ex.view_table, spec)] + [
            (f"views_{name}", store.create_view_table(ex, view_recipe_key(spec, name),
                                                      view_recipe(spec, name), spec.chunk_rows),
             spec.model_copy(update={"augment": aug})) for name, aug in spec.recipes.items()]
        for label, table, recipe in recipes:
            res = encode_views(clip, table, _missing_views(planned, tables, table), recipe,
                               env.progress, env.strict, remote)
            views_done, views_failed = views_done + res.encoded, views_failed + len(res.failures)
            timings[label] = res.seconds
    t0 = time.perf_counter()
    texts = _ensure_texts(clip, ex, works)
    timings["texts"] = time.perf_counter() - t0
    updated, failures = _write_records(works, tables, {f.path: f for f in clean.failures})
    distinct = {k for p in plans for _, k in p.hashed()}
    return {
        "stage": "extract", "extractor": ex.fp, "store": store.location,
        "datasets": [p.spec.name for p in plans], "records_updated": updated,
        "images": len(distinct), "extracted": clean.encoded, "reused": len(distinct) - len(work),
        "failed": len(failures), "failures": failures,
        "views_extracted": views_done, "views_failed": views_failed, "texts_extracted": texts,
        "seconds": round(time.perf_counter() - started, 3),
        # Throughput of the encode phase (read, verify, decode, preprocess, forward, write).
        "images_per_second": round(clean.encoded / clean.seconds, 2) if clean.seconds else 0.0,
        "model_seconds": round(clean.model_seconds, 3),
        "timings": {k: round(v, 3) for k, v in timings.items()},
    }


def _workers(env: Any) -> Any:
    """The dask workers' encoder when the command asked for a cluster (the command's session,
    closed with its Environment), else None: in-process."""
    if env.cluster is None:
        return None
    from ..pipeline.cluster import RemoteEncoder

    return RemoteEncoder(env.cluster_client(), env.manifest.model.model_dump(mode="json"),
                         env.manifest.extraction.model_dump(mode="json"), env.device,
                         env.extractor_fp)


def _write_records(works: list[Work], tables: list[Any],
                   decode_failed: dict[str, Any]) -> tuple[list[str], list[dict[str, str]]]:
    """Store each dataset's records (a new version only if they changed) with its failures;
    a decode failure carries the image key, so the same bytes are not retried by the plan."""
    updated, failures = [], []
    for w, (arrays, attrs, version) in zip(works, tables, strict=True):
        plan = w.job.detail.plan
        mine = [f.to_dict() for f in plan.failures]
        mine += [{**decode_failed[str(plan.data.file(r))].to_dict(), "key": k.hex()}
                 for r, k in plan.hashed() if str(plan.data.file(r)) in decode_failed]
        failures += mine
        record = {**w.job.record(), "key": version}
        if w.store.write_dataset(plan.spec.name, version, arrays, {**attrs, "failures": mine},
                                 record):
            updated.append(plan.spec.name)
    return updated, failures


def compute(work: Work) -> Outcome:
    summary = compute_batch([work])
    return Outcome({}, summary)


def _missing(plans: list[DatasetPlan], have: dict[bytes, int]) -> list[Any]:
    """Distinct keys not yet in the table, in manifest order (deterministic across runs)."""
    from ..pipeline.extraction import WorkItem

    work, seen = [], set(have)
    for plan in plans:
        for rec, key in plan.hashed():
            if key not in seen:
                seen.add(key)
                path = plan.data.file(rec)
                work.append(WorkItem(key, path, str(path)))
    return work


def _missing_views(planned: list[PlannedDataset], tables: list[Any],
                   table: RowTable) -> list[Any]:
    from ..pipeline.extraction import WorkItem

    have = set(table.index())
    work = []
    for d, (arrays, _attrs, _v) in zip(planned, tables, strict=True):
        keys = arrays["keys"]
        hashed = {k: d.plan.data.file(r) for r, k in d.plan.hashed()}
        for row in view_rows(d.spec, arrays, d.views_for):
            key = keys[row].tobytes()
            if key not in have:
                have.add(key)
                work.append(WorkItem(key, hashed[key], str(hashed[key])))
    return work


def _ensure_texts(clip: Any, ex: Extractor, works: list[Work]) -> int:
    """Encode `template.format(classname)` for every template and class set the store lacks."""
    from ..pipeline.models import encode_texts

    count = 0
    for w in works:
        d: PlannedDataset = w.job.detail
        names = d.facts.classnames
        for template in d.spec.templates:
            if not ex.has_texts(template, names):
                features = encode_texts(clip, [template.format(c) for c in names])
                ex.write_texts(template, names, features)
                count += 1
    return count


def strict_failures(planned: list[PlannedDataset]) -> None:
    """With --strict, any unusable entry is fatal before anything is written."""
    failures = [f.to_dict() for d in planned for f in d.plan.failures]
    failures += [f for d in planned for f in d.known_failures]
    if failures:
        raise ImageError(f"{failures[0]['path']}: {failures[0]['reason']} (--strict)")


STAGE = Stage(name="extract", kind=RECORDS, scope=Scope.DATASET, declare=declare, compute=compute,
              compute_batch=compute_batch, missing=missing,
              locate=lambda job: Ref.records(job.dataset, job.key),
              summary="encode images (clean + augmented views) and class-name prompts into the store")
