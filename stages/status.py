"""`status`: the plan plus lookups. What the manifest asks for, what the store holds, and what is
stale and why, per dataset; a dataset that cannot be read is reported and the others still shown.
Writes nothing and builds no model once the model's identity is cached."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..pipeline.artifacts import CACHE, Ref, Slots
from ..pipeline.manifest import Manifest
from ..pipeline.progress import Progress
from . import extract
from .base import Environment, Job
from .commands import job_state, open_existing
from .runner import Request, build_plan
from .summaries import Summary


def status(manifest: Manifest, request: Request, *, device: str = "auto",
           progress: Progress | None = None, cache_dir: Path | None = None,
           report_dir: Path | None = None) -> Summary:
    env = Environment(manifest, device, progress, cache_dir, report_dir)
    out: dict[str, Any] = {"stage": "status", "store": manifest.store, "extractor": None,
                           "upstream": [u.location for u in manifest.upstream],
                           "up_to_date": False, "stale": [], "datasets": [], "broken": []}
    with open_existing(manifest) as store:
        plan = build_plan(env, store, request)
        out["extractor"] = plan.extractor
        slots = Slots.over([layer.root for layer in store.layers]) if store else None
        if store is None:
            out["reason"] = f"no shipyard store at {manifest.store} yet; `extract` creates it"
        wanted = plan.closure(plan.of("report"))
        for name, planned in plan.datasets.items():
            jobs = [j for j in wanted if j.dataset == name]
            states = [job_state(j, store, slots) for j in jobs]
            entry: dict[str, Any] = {"name": name}
            # A synthetic-domain dataset no head reads is in no report's closure: its own
            # extract job still says what it lacks.
            extract_job = next(j for j in plan.of("extract") if j.dataset == name)
            entry |= extract.counts(store, extract_job) if store else {
                "records": len(planned.plan.data.records) + len(planned.plan.data.rejected),
                "unusable": len(planned.plan.failures) + len(planned.known_failures)}
            entry["stale"] = [f"{s['id']}: {'; '.join(s['reasons'])}" for s in states
                              if s["state"] == "stale"]
            entry["jobs"] = states
            entry["caches"] = _cache_agreements(store, jobs, states) if store else []
            out["stale"] += [s["id"] for s in states if s["state"] == "stale"]
            out["datasets"].append(entry)
        out["broken"] = [{"name": n, "error": e} for n, e in plan.broken.items()]
    out["up_to_date"] = store is not None and not out["stale"] and not out["broken"]
    return out


def _cache_agreements(store: Any, jobs: list[Job], states: list[dict[str, Any]]) -> list[dict]:
    """The stored top-1 agreement with dense of every current approximate cache."""
    from ..pipeline.zarr_nodes import attrs_of

    out = []
    for job, state in zip(jobs, states, strict=True):
        if job.stage != "build-cache" or state["state"] != "up to date":
            continue
        group = store.lookup(Ref.of(CACHE, job.key))
        agreement = attrs_of(group).get("agreement") if group is not None else None
        if agreement:
            out.append({"id": job.id, "index": job.params["index"], "agreement": agreement})
    return out
