"""The commands' bodies: open the store, plan, run the jobs the command asks for, summarise.
Each returns the JSON-able summary the CLI prints."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..pipeline.artifacts import Slots
from ..pipeline.errors import StoreMissingError, StoreWriteDeniedError
from ..pipeline.manifest import Manifest
from ..pipeline.progress import Progress
from ..pipeline.store import FeatureStore
from . import extract
from .base import Environment, Job
from .runner import STAGES, Plan, Request, Result, build_plan, check_ready, execute, staleness
from .summaries import Summary, summarize


def stage_command(manifest: Manifest, stage: str, request: Request, *, device: str = "auto",
                  progress: Progress | None = None, force: bool = False, strict: bool = False,
                  cache_dir: Path | None = None, report_dir: Path | None = None,
                  cluster: Any = None) -> Summary:
    """One stage's jobs (evaluate: with its report); what they read must be up to date.
    `cluster` (a `cluster.ClusterSpec`): extract on its dask workers."""
    env = Environment(manifest, device, progress, cache_dir, report_dir, strict, cluster)
    names = (stage, "report") if stage == "evaluate" else (stage,)

    def check(plan: Plan, store: FeatureStore | None) -> None:  # before anything is written
        plan.raise_broken()
        if stage == "extract" and strict:
            extract.strict_failures(list(plan.datasets.values()))
        if store is not None and store.read_only:  # upstreams only: refuse before creating
            check_ready(plan, store, [j for name in names for j in plan.of(name)])

    # Over upstreams any stage may be the first to write: the working store is made then.
    create = stage == "extract" or bool(manifest.upstream)
    with env, open_writable(manifest, env, request, check, create=create) as (store, plan):
        targets = [j for name in names for j in plan.of(name)]
        try:
            results = execute(plan, env, store, targets, force=stage if force else None)
        except StoreWriteDeniedError as exc:  # what ran before the refusal is printed too
            exc.summary = summarize(exc.results, plan, env).get(stage, {"stage": stage})
            raise
    return summarize(results, plan, env)[stage]


def run_all(manifest: Manifest, request: Request, *, device: str = "auto",
            progress: Progress | None = None, force: str | None = None,
            cache_dir: Path | None = None, report_dir: Path | None = None,
            cluster: Any = None) -> Summary:
    """Every stale job of the manifest, in dependency order; `force` recomputes one stage's."""
    env = Environment(manifest, device, progress, cache_dir, report_dir, cluster=cluster)
    results: list[Result] = []
    with env, open_writable(manifest, env, request, lambda plan, _store: plan.raise_broken(),
                            create=True) as (store, plan):
        try:
            extracts = [j for j in plan.closure(reports(plan, request)) if j.stage == "extract"]
            results = execute(plan, env, store, extracts)
            # Re-plan: images that failed to decode are left out of the records just written.
            plan = build_plan(env, store, request)
            rest = execute(plan, env, store, reports(plan, request), force=force, with_deps=True)
            results += [r for r in rest if r.job.stage != "extract"]
        except StoreWriteDeniedError as exc:  # what ran before the refusal is printed too
            kept = results + [r for r in exc.results if r.job.stage != "extract"]
            exc.summary = run_summary(kept, plan, env)
            raise
    return run_summary(results, plan, env)


def run_summary(results: list[Result], plan: Plan, env: Environment) -> Summary:
    return {"stage": "run", "pipeline": [s.name for s in STAGES],
            "jobs": [{"id": r.job.id, "status": r.status, "key": r.job.key} for r in results],
            "stages": summarize(results, plan, env)}


def reports(plan: Plan, request: Request) -> list[Job]:
    """What `run` aims at: the requested datasets' reports (a transfer source is planned with its
    target, but only what the target reads of it runs), else every dataset's; a dataset without
    a report (a synthetic domain) is aimed at through its extract."""
    wanted = [j for j in plan.jobs.values() if not request.datasets or j.dataset in request.datasets]
    reported = {j.dataset for j in wanted if j.stage == "report"}
    return [j for j in wanted if j.stage == "report" or
            (j.stage == "extract" and j.dataset not in reported)]


def dry_run(manifest: Manifest, request: Request, *, device: str = "auto",
            progress: Progress | None = None, cache_dir: Path | None = None,
            report_dir: Path | None = None) -> Summary:
    """The plan `run` would follow: every job, its key, and why it would run."""
    env = Environment(manifest, device, progress, cache_dir, report_dir)
    with open_existing(manifest) as store:
        plan = build_plan(env, store, request)
        slots = Slots.over([layer.root for layer in store.layers]) if store else None
        jobs = [job_state(j, store, slots) for j in plan.closure(reports(plan, request))]
    return {"stage": "run", "dry_run": True, "extractor": plan.extractor, "jobs": jobs,
            "broken": [{"name": n, "error": e} for n, e in plan.broken.items()]}


def job_state(job: Job, store: FeatureStore | None, slots: Slots | None) -> dict[str, Any]:
    reasons = staleness(job, store, slots)
    return {"id": job.id, "stage": job.stage, "key": job.key,
            "state": "stale" if reasons else "up to date", "reasons": reasons,
            "deps": list(job.deps)}


@contextmanager
def open_writable(manifest: Manifest, env: Environment, request: Request,
                  check: Callable[[Plan, FeatureStore | None], None], create: bool,
                  ) -> Iterator[tuple[FeatureStore, Plan]]:
    """The store opened for writing (under its lock) and the plan made under that lock, after
    `check` accepted the plan. Nothing is written before: opening an existing store writes
    nothing, and a store that does not exist yet is created only once a plan made without it
    passed `check`."""
    try:
        store = FeatureStore.open(manifest.store, read_only=False, options=manifest.store_options,
                                  upstreams=manifest.upstreams)
    except StoreMissingError:
        if not create:
            raise
        with open_existing(manifest) as below:  # the upstreams' view, before anything is made
            check(build_plan(env, below, request), below)
        store = FeatureStore.open(manifest.store, read_only=False, create=True,
                                  options=manifest.store_options, upstreams=manifest.upstreams)
    with store:
        plan = build_plan(env, store, request)
        check(plan, store)
        yield store, plan


@contextmanager
def open_existing(manifest: Manifest) -> Iterator[FeatureStore | None]:
    """The store read-only (over its upstreams), or None when there is none yet and nothing
    below it."""
    try:
        store = FeatureStore.open(manifest.store, read_only=True, options=manifest.store_options,
                                  upstreams=manifest.upstreams, empty_if_missing=True)
    except StoreMissingError:
        yield None
        return
    with store:
        yield store
