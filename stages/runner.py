"""The runner: manifest -> plan (every job with its key) -> the stale jobs, run in dependency order.

`run`, every stage command and `status` share this one plan. A job is up to date when its artefact
is committed under its key (and, for kinds that grow, holds every row asked for); `--force`
recomputes one stage's jobs. A stage command runs only its own stage's jobs and refuses to start
when what they read is missing or stale; `run` runs everything that is.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from ..pipeline.artifacts import Ref, Slots
from ..pipeline.dataset_plan import PlannedDataset, plan_dataset, plan_records
from ..pipeline.errors import ShipyardError, StoreWriteDeniedError, UsageError, is_denied
from ..pipeline.locations import first_line
from ..pipeline.manifest import DatasetSpec, Manifest
from ..pipeline.records import text_key
from ..pipeline.registry import split_method
from ..pipeline.store import FeatureStore
from . import build_cache, evaluate, extract, report, synthesize, train_adapter, train_generator
from .base import Environment, Job, Scope, Slot, Stage, Work, make_job

log = logging.getLogger(__name__)

# The pipeline, in execution order. A stage joins by being listed here.
STAGES: tuple[Stage, ...] = (extract.STAGE, train_generator.STAGE, synthesize.STAGE,
                             train_adapter.STAGE, build_cache.STAGE, evaluate.STAGE, report.STAGE)
BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}


@dataclass(frozen=True)
class Request:
    """What a command asks the plan for."""

    datasets: tuple[str, ...] = ()  # default: every dataset of the manifest
    seeds: tuple[int, ...] = ()  # default: each dataset's seeds
    methods: tuple[str, ...] | None = None  # default: the manifest's heads
    options: dict[str, Any] = field(default_factory=dict)  # a command's choices, for declare()


@dataclass
class Plan:
    extractor: str
    jobs: dict[str, Job] = field(default_factory=dict)  # in dependency order
    requires: dict[str, tuple[Ref, ...]] = field(default_factory=dict)
    datasets: dict[str, PlannedDataset] = field(default_factory=dict)
    broken: dict[str, str] = field(default_factory=dict)  # dataset -> why it cannot be planned
    # dataset -> the exit code of why, where it is a runtime failure (an unreachable bucket: 1)
    broken_exit: dict[str, int] = field(default_factory=dict)
    texts: set[str] = field(default_factory=set)  # keys of the text sets the datasets read

    def of(self, stage: str) -> list[Job]:
        return [j for j in self.jobs.values() if j.stage == stage]

    def closure(self, targets: Iterable[Job]) -> list[Job]:
        """The targets and everything they read, in dependency order."""
        wanted: set[str] = set()
        stack = [t.id for t in targets]
        while stack:
            jid = stack.pop()
            if jid not in wanted:
                wanted.add(jid)
                stack.extend(self.jobs[jid].deps)
        return [j for j in self.jobs.values() if j.id in wanted]

    def raise_broken(self) -> None:
        for name, error in self.broken.items():
            line = error if name in error else f"dataset {name}: {error}"
            raise UsageError(line) if self.broken_exit.get(name, 2) == 2 else ShipyardError(line)


def build_plan(env: Environment, store: FeatureStore | None, request: Request) -> Plan:
    """Every job the manifest (and the request) implies, with its key. Reads split files, hashes
    images (stat-cached) and reads the store; writes nothing and builds no model when the
    model's identity is cached."""
    m = env.manifest
    plan = Plan(env.extractor_fp)
    ex = store.extractor(plan.extractor) if store and store.has_extractor(plan.extractor) else None
    have = set(ex.images.index()) if ex else set()
    methods = request.methods if request.methods is not None else m.heads.methods
    specs = _sources_first(m, [m.dataset(n) for n in request.datasets] or list(m.datasets))
    options = {"report_dir": env.report_dir, **request.options}
    slots: list[Slot] = []
    for spec in specs:  # the records of every dataset first: a synthetic domain's are read
        upstream = spec.transfer_from or spec.pairs_with  # by the heads of its pair
        if upstream and upstream not in plan.datasets:
            plan.broken[spec.name] = (f"dataset {spec.name}: the dataset it reads, {upstream}, "
                                      "cannot be planned")
            continue
        paired = plan.datasets[spec.pairs_with].facts.classnames if spec.pairs_with else None
        try:
            dp = plan_dataset(spec, m.extraction.workers, env.progress, env.cache_dir, paired,
                              env.remote_hasher(spec))
            planned = plan_records(dp, have, _known_failures(store, spec.name),
                                   m.extraction.views_for)
        except ShipyardError as exc:
            plan.broken[spec.name] = str(exc)
            plan.broken_exit[spec.name] = exc.exit_code
            continue
        plan.datasets[spec.name] = planned
        texts = [text_key(plan.extractor, t, planned.facts.classnames) for t in spec.templates]
        plan.texts.update(texts)
        slots.append(Slot(m, spec, plan.extractor, texts, planned, options=options))
    domains: dict[str, tuple[PlannedDataset, Job]] = {}
    for base in slots:  # a synthetic domain: extracted, read by the heads of its pair (the
        if base.spec.pairs_with:  # first one listed, when several pair with one dataset)
            job = _add(plan, extract.STAGE, base)
            assert job is not None
            domains.setdefault(base.spec.pairs_with, (base.dataset, job))
    heads_of: dict[str, tuple[tuple[int, ...], dict[str, list[Job | None]]]] = {}
    for base in slots:
        spec = base.spec
        if spec.pairs_with:
            continue
        source = heads_of.get(spec.transfer_from) if spec.transfer_from else None
        listed = source[0] if source else spec.seeds
        seeds = _seeds(spec.transfer_from or spec.name, listed, request.seeds)
        base = replace(base, seeds=seeds, domain=domains.get(spec.name))
        if source is not None:
            _plan_transfer_jobs(plan, base, source[1])
        else:
            heads_of[spec.name] = (seeds, _plan_dataset_jobs(plan, base, methods))
    return plan


def _sources_first(m: Manifest, specs: list[DatasetSpec]) -> list[DatasetSpec]:
    """The datasets to plan, each transfer source before its targets (and planned whenever a
    target is: the target evaluates the source's heads)."""
    sources = [m.dataset(s.transfer_from or s.pairs_with or "") for s in specs
               if s.transfer_from or s.pairs_with]
    out = [s for s in sources + specs if not (s.transfer_from or s.pairs_with)]
    out = list({s.name: s for s in out}.values())
    return out + [s for s in specs if s.pairs_with] + [s for s in specs if s.transfer_from]


def _plan_transfer_jobs(plan: Plan, base: Slot, source: dict[str, list[Job | None]]) -> None:
    """A transfer target: its own extract, then the source's heads that transfer, evaluated on
    its classes and test images, and its report. Nothing trains on it."""
    heads = {method: jobs for method, jobs in source.items() if split_method(method)[0].transfers}
    shared: dict[str, Job] = {}
    for stage in STAGES:
        if stage.scope is Scope.DATASET:
            job = _add(plan, stage, replace(base, heads=heads, per_seed={},
                                            upstream=dict(shared)))
            if job is not None:
                shared[stage.name] = job


def _plan_dataset_jobs(plan: Plan, base: Slot,
                       methods: tuple[str, ...]) -> dict[str, list[Job | None]]:
    """Declare every stage's jobs for one dataset, in pipeline order, by scope: a dataset-scope
    job sees the dataset's jobs so far, the heads of every seed and the first seed's jobs (what
    a report draws); a seed- or head-scope job sees the dataset's jobs and its seed's."""
    shared: dict[str, Job] = {}
    per_seed: dict[int, dict[str, Job]] = {seed: {} for seed in base.seeds}
    heads: dict[str, list[Job | None]] = {m: [None] * len(base.seeds) for m in methods}
    for stage in STAGES:
        if stage.scope is Scope.DATASET:
            first = per_seed[base.seeds[0]] if base.seeds else {}
            job = _add(plan, stage, replace(base, heads=heads, per_seed=per_seed,
                                            upstream={**first, **shared}))
            if job is not None:
                shared[stage.name] = job
            continue
        for i, seed in enumerate(base.seeds):
            upstream = {**shared, **per_seed[seed]}
            if stage.scope is Scope.SEED:
                job = _add(plan, stage, replace(base, seed=seed, upstream=upstream))
                if job is not None:
                    per_seed[seed][stage.name] = job
                continue
            for method in methods:  # a head is built by the one stage its registry entry names
                if heads[method][i] is None:
                    heads[method][i] = _add(plan, stage, replace(base, seed=seed, method=method,
                                                                 upstream=dict(upstream)))
    return heads


def _add(plan: Plan, stage: Stage, slot: Slot) -> Job | None:
    declared = stage.declare(slot)
    if declared is None:
        return None
    job = make_job(stage, slot, declared)
    plan.jobs[job.id] = job
    plan.requires[job.id] = declared.requires
    return job


def _seeds(dataset: str, listed: tuple[int, ...], asked: tuple[int, ...]) -> tuple[int, ...]:
    for seed in asked:
        if seed not in listed:
            raise UsageError(f"dataset {dataset}: seed {seed} is not in its seeds {listed}")
    return asked or listed


def _known_failures(store: FeatureStore | None, name: str) -> list[dict[str, str]]:
    """Images that failed to decode last time, by path and content: not retried until changed."""
    if store is None or store.dataset_version(name) is None:
        return []
    try:
        return [f for f in store.dataset(name).failures if "key" in f]
    except ShipyardError:
        return []


# -- staleness ----------------------------------------------------------------------------------

def staleness(job: Job, store: FeatureStore | None, slots: Slots | None = None) -> list[str]:
    """Why a job must run (empty: up to date)."""
    if store is None:
        return ["the store does not exist yet"]
    stage = BY_NAME[job.stage]
    reasons = stage.missing(store, job) if stage.missing else None
    if reasons is not None:
        return reasons
    if store.lookup(stage.ref(job)) is not None:
        return []
    return [slots.why(job.id, job.params, job.inputs) if slots else "not built yet"]


# -- execution ------------------------------------------------------------------------------------

@dataclass
class Result:
    job: Job
    status: str  # built | resumed | up to date
    summary: dict[str, Any]
    seconds: float


def execute(plan: Plan, env: Environment, store: FeatureStore, targets: list[Job],
            force: str | None = None, with_deps: bool = False) -> list[Result]:
    """Run the stale jobs among `targets` (and, `with_deps`, among what they read)."""
    order = plan.closure(targets) if with_deps else targets
    if not with_deps:
        check_ready(plan, store, targets)
    for job in order:
        for ref in plan.requires.get(job.id, ()):
            if store.lookup(ref) is None:
                raise UsageError(f"{job.id}: no {ref.kind.name} {ref.key[:12]} in the store "
                                 f"{store.location}")
    results: dict[str, Result] = {}
    task = env.progress.task("jobs", len(order), "job")  # what is running, in logs too
    try:
        for job in order:
            task.note(job.id)
            try:
                _execute_one(env, store, job, order, force, results)
            except OSError as exc:
                if not is_denied(exc):
                    raise
                raise StoreWriteDeniedError(
                    f"{store.location}: writing {job.id} was denied ({first_line(exc)}); what ran "
                    "before it is kept in the store", list(results.values())
                ) from exc
            task.advance(1)
    finally:
        task.close()
    for r in results.values():  # -v: what ran, what was reused, how long each took
        log.info("%s: %s, key %s (%.2f s)", r.job.id, r.status, r.job.key[:12], r.seconds)
    return list(results.values())


def _execute_one(env: Environment, store: FeatureStore, job: Job, order: list[Job],
                 force: str | None, results: dict[str, Result]) -> None:
    """Run one job of `execute`'s order unless it is up to date (or ran in a batch already)."""
    stage = BY_NAME[job.stage]
    forced = force == stage.name
    if job.id in results:
        return
    if not forced and not staleness(job, store):
        results[job.id] = Result(job, "up to date", _stored_summary(store, stage, job), 0.0)
    elif stage.compute_batch is not None:  # every stale job of the stage in one compute
        batch = [j for j in order if j.stage == job.stage and j.id not in results
                 and (forced or staleness(j, store))]
        started = time.perf_counter()
        summary = stage.compute_batch([Work(j, env, store) for j in batch])
        for j in batch:
            results[j.id] = Result(j, "built", summary, time.perf_counter() - started)
    elif not stage.stored:  # a derived file: its failure must not take the results with it
        results[job.id] = _run_derived(stage, job, env, store)
    else:
        results[job.id] = _run_job(stage, job, env, store, forced)


def _run_derived(stage: Stage, job: Job, env: Environment, store: FeatureStore) -> Result:
    """A job whose output is a file outside the store (the report). Everything it reads is
    committed before it runs, so when it fails the results are safe: the failure is recorded
    in one line, the command still reports its results, then exits 1."""
    started = time.perf_counter()
    try:
        outcome = stage.compute(Work(job, env, store))
    except Exception as exc:
        text = str(exc).strip().splitlines()
        error = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
        return Result(job, "failed", {"error": error}, time.perf_counter() - started)
    return Result(job, "built", outcome.summary, time.perf_counter() - started)


def check_ready(plan: Plan, store: FeatureStore, targets: list[Job]) -> None:
    ids = {t.id for t in targets}
    checked: set[str] = set()  # one upstream job is read by many targets: check it once
    for job in targets:
        for dep_id in job.deps:
            if dep_id in ids or dep_id in checked:
                continue
            checked.add(dep_id)
            dep = plan.jobs[dep_id]
            reasons = staleness(dep, store)
            if reasons:
                raise UsageError(f"{job.id} needs {dep.id}, which is not up to date "
                                 f"({reasons[0]}); run `shipyard {dep.stage}` first")


def _run_job(stage: Stage, job: Job, env: Environment, store: FeatureStore,
             forced: bool) -> Result:
    started = time.perf_counter()
    # Only the working store's artefacts are extended; one an upstream holds is read-only, and a
    # longer one is built here under the same key (found first from then on).
    existing = store.own().lookup(stage.ref(job)) if stage.appendable and not forced else None
    if existing is not None:  # extend a committed artefact row by row
        outcome = stage.compute(Work(job, env, store, existing))
        return Result(job, "extended", outcome.summary, time.perf_counter() - started)
    draft = store.begin(stage.ref(job), job.record(), resume=not forced)
    outcome = stage.compute(Work(job, env, store, draft.group, draft.resumed))
    store.commit(draft, outcome.attrs, device=env.device_name)
    return Result(job, "resumed" if draft.resumed else "built", outcome.summary,
                  time.perf_counter() - started)


def _stored_summary(store: FeatureStore, stage: Stage, job: Job) -> dict[str, Any]:
    """What a reused artefact says about itself (its committed attributes, without bulk)."""
    if not stage.stored or stage.compute_batch is not None:
        return {}
    group = store.lookup(stage.ref(job))
    if group is None:
        return {}
    from ..pipeline.zarr_nodes import attrs_of

    attrs = attrs_of(group)
    return {k: v for k, v in attrs.items() if k not in ("record", "per_seed", "complete")}
