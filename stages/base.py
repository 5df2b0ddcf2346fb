"""What a stage declares, and what its compute function is given.

A stage is a name (its command), the kind of artefact it makes, the scope of one job (a dataset, a
few-shot seed, or a head of a seed), a `declare` function that turns a slot of the manifest into
resolved parameters and input keys, and a `compute` function that does the work. The runner
(`runner.py`) derives every key, decides what is stale, creates and commits the artefacts; a
stage never looks another stage up, never imports one, and never decides whether to run.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..pipeline.artifacts import SYNTHETIC, Kind, Ref, artifact_key
from ..pipeline.dataset_plan import DatasetFacts, PlannedDataset
from ..pipeline.errors import ExtractorMismatchError, ModelLoadError, UsageError
from ..pipeline.fingerprint import fingerprint
from ..pipeline.hashing import default_cache_dir
from ..pipeline.identity import IdentityCache, ModelIdentity, extractor_description
from ..pipeline.manifest import DatasetSpec, Manifest
from ..pipeline.progress import Progress, Silent
from ..pipeline.registry import HeadSpec, split_method

if TYPE_CHECKING:  # torch-free at import: planning and status never load a model
    from ..pipeline.models import ClipModel
    from ..pipeline.records import Extractor
    from ..pipeline.store import FeatureStore


class Scope(StrEnum):
    DATASET = "dataset"  # one job per dataset
    SEED = "seed"  # one per few-shot seed of a dataset
    HEAD = "head"  # one per head method and seed


@dataclass(frozen=True)
class Job:
    """One planned unit of work: an artefact of `kind` under `key`."""

    id: str  # kind:dataset[:seedN][:method], stable across parameter changes
    stage: str
    kind: Kind
    key: str
    dataset: str
    seed: int | None
    method: str | None
    params: dict[str, Any]
    inputs: dict[str, Any]
    deps: tuple[str, ...]  # ids of the jobs whose outputs it reads
    detail: Any = None  # what compute needs beyond the key (never part of it)

    def record(self) -> dict[str, Any]:
        """What is stored with the artefact: enough to say what made it and why it is stale."""
        return {"job": self.id, "kind": self.kind.name, "key": self.key, "params": self.params,
                "inputs": self.inputs}


@dataclass(frozen=True)
class Declared:
    """A stage's answer for one slot: the job's parameters and inputs (keys), the upstream jobs
    it reads, and non-key detail for compute."""

    params: dict[str, Any]
    inputs: dict[str, Any]
    deps: tuple[Job, ...] = ()
    detail: Any = None
    requires: tuple[Ref, ...] = ()  # stored artefacts named directly (an explicit --synthetic)
    key: str | None = None  # the content key, for kinds keyed by what they hold (records)


@dataclass
class Slot:
    """Where a job would sit: a dataset (its facts and keys), maybe a seed, maybe a head, and the
    jobs already planned upstream of it in this slot."""

    manifest: Manifest
    spec: DatasetSpec
    extractor: str
    texts: list[str]  # text set keys of the dataset's templates
    dataset: PlannedDataset  # the hashed dataset and its planned records
    seeds: tuple[int, ...] = ()  # the few-shot seeds asked for
    seed: int | None = None
    method: str | None = None
    upstream: dict[str, Job] = field(default_factory=dict)  # stage name -> job of this slot
    heads: dict[str, list[Job | None]] = field(default_factory=dict)  # method -> job per seed
    per_seed: dict[int, dict[str, Job]] = field(default_factory=dict)  # seed -> its seed jobs
    options: dict[str, Any] = field(default_factory=dict)  # a command's explicit choices
    # The synthetic-domain dataset paired with this one (its planned records and extract job):
    # SYNC-CLIP's second domain.
    domain: tuple[PlannedDataset, Job] | None = None

    @property
    def facts(self) -> DatasetFacts:
        return self.dataset.facts

    def head(self, stage: str) -> tuple[HeadSpec, bool] | None:
        """This slot's head method and whether it is +ship, if `stage` is the one that builds it."""
        assert self.method is not None  # a head-scope slot
        spec, ship = split_method(self.method)
        return (spec, ship) if spec.stage == stage else None

    def head_inputs(self, head: HeadSpec, ship: bool, reads_test: bool,
                    ) -> tuple[dict[str, Any], tuple[Job, ...], tuple[Ref, ...]]:
        """The inputs a head reads (by key), the jobs that make them, and stored artefacts it names
        directly: base shots always; the zero-shot text classifier unless it builds its own; val
        when it tunes there; test when its selection rule reads it (`paper`); with +ship the
        generator for a pair head (fresh samples every step) or else the stored synthetic set."""
        assert self.seed is not None
        facts = self.facts
        inputs: dict[str, Any] = {"extractor": self.extractor, "train": facts.train[self.seed]}
        deps: tuple[Job, ...] = (self.upstream["extract"],)
        requires: tuple[Ref, ...] = ()
        if head.reads_text:
            inputs["text"] = self.texts
        if head.reads_val:
            inputs["val"] = facts.val[self.seed]
        if reads_test:
            inputs["test"] = facts.test
        if head.synthetic_domain and not ship:  # SYNC-CLIP: the paired synthetic images
            if self.domain is None:
                raise UsageError(f"dataset {self.spec.name}: {self.method} needs a synthetic-domain "
                                 f"dataset paired with it (an entry with domain: synthetic, "
                                 f"pairs_with: {self.spec.name}), or use {self.method}+ship")
            planned, extract = self.domain
            inputs["domain"] = planned.facts.records
            deps += (extract,)
        if ship:
            explicit = self.options.get("synthetic")
            if head.ship in ("pair", "domain") and not explicit:
                # Fresh samples every step from the generator (SHIP's run_coop), not a pool.
                inputs["generator"] = self.upstream["train-generator"].key
                deps += (self.upstream["train-generator"],)
            elif explicit:
                inputs["synthetic"] = explicit
                requires = (Ref.of(SYNTHETIC, explicit),)
            else:
                inputs["synthetic"] = self.upstream["synthesize"].key
                deps += (self.upstream["synthesize"],)
        return inputs, deps, requires


@dataclass(frozen=True)
class Outcome:
    attrs: dict[str, Any]  # committed with the artefact
    summary: dict[str, Any]  # what the command reports


@dataclass
class Work:
    """What compute gets: its job, the shared environment, the store, and the group to write
    into (a fresh or resumed draft, or the committed group of an appendable artefact)."""

    job: Job
    env: Environment
    store: FeatureStore
    group: Any = None  # zarr.Group
    resumed: bool = False


@dataclass(frozen=True)
class Stage:
    name: str  # the command
    kind: Kind
    scope: Scope
    declare: Callable[[Slot], Declared | None]
    compute: Callable[[Work], Outcome]
    summary: str
    # Why a job whose artefact exists is still stale (rows missing), for kinds that grow.
    missing: Callable[[FeatureStore, Job], list[str]] | None = None
    appendable: bool = False  # a committed artefact is extended in place (synthetic rows)
    # One compute for all of the stage's stale jobs, committing its own artefacts (extract).
    compute_batch: Callable[[list[Work]], dict[str, Any]] | None = None
    stored: bool = True  # False: the artefact is a file outside the store (report)
    locate: Callable[[Job], Ref] | None = None  # where its artefact lives, if not <folder>/<key>

    def ref(self, job: Job) -> Ref:
        return self.locate(job) if self.locate else Ref.of(self.kind, job.key)


def job_id(kind: Kind, dataset: str, seed: int | None = None, method: str | None = None) -> str:
    parts = [kind.name, dataset]
    if seed is not None:
        parts.append(f"seed{seed}")
    if method is not None:
        parts.append(method)
    return ":".join(parts)


def make_job(stage: Stage, slot: Slot, declared: Declared) -> Job:
    key = declared.key or artifact_key(stage.kind, declared.params, declared.inputs)
    method = slot.method if stage.scope is Scope.HEAD else None
    seed = slot.seed if stage.scope is not Scope.DATASET else None
    return Job(job_id(stage.kind, slot.spec.name, seed, method), stage.name, stage.kind, key,
               slot.spec.name, seed, method, declared.params, declared.inputs,
               tuple(d.id for d in declared.deps), declared.detail)


class Environment:
    """What every job of one command shares: the manifest, the device, progress, and the CLIP
    model, built on first use only. Its identity (weights digest, preprocessing) is cached, so
    planning names the extractor without building the model when it was built here before."""

    def __init__(self, manifest: Manifest, device: str = "auto", progress: Progress | None = None,
                 cache_dir: Path | None = None, report_dir: Path | None = None,
                 strict: bool = False, cluster: Any = None) -> None:
        self.manifest = manifest
        self.device = device
        self.strict = strict  # extract: any unusable image is fatal
        self.cluster = cluster  # extract: a cluster.ClusterSpec whose dask workers encode
        self._stack: ExitStack | None = None  # the cluster session, once one is needed
        self._client: Any = None
        self.progress = progress or Silent()
        self.cache_dir = cache_dir or default_cache_dir()
        self.report_dir = report_dir or manifest.path.resolve().parent / "reports"
        self._clip: ClipModel | None = None
        self._identity: ModelIdentity | None = None
        self._fp: str | None = None  # the extractor's, once the identity is known

    @property
    def clip(self) -> ClipModel:
        if self._clip is None:
            from ..pipeline.models import load_clip, resolve_device

            self._clip = load_clip(self.manifest.model, resolve_device(self.device))
            identity = self._clip.identity()
            if identity != self._identity:
                IdentityCache(self.cache_dir).put(self.manifest.model, identity)
                if self._identity is not None:  # planned under a stale cache entry
                    raise ModelLoadError(f"model {self.manifest.model.name}: its weights differ "
                                         "from the cached identity; run the command again")
            self._identity = identity
        return self._clip

    def cluster_client(self) -> Any:
        """The dask client of the command's cluster, connected (a local one started) on first
        use and closed by `close`."""
        if self._client is None:
            from ..pipeline.cluster import session

            self._stack = ExitStack()
            self._client = self._stack.enter_context(session(self.cluster, self.device))
        return self._client

    def remote_hasher(self, spec: DatasetSpec) -> Any:
        """Hashing on the workers, for a dataset whose images live on object storage when the
        command has a cluster; None otherwise (the driver hashes, stat-cached)."""
        from ..pipeline.remote_paths import RemotePath

        if self.cluster is None or not isinstance(spec.images, RemotePath):
            return None
        from ..pipeline.cluster import RemoteHasher

        return RemoteHasher(self.cluster_client())

    def __enter__(self) -> Environment:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release what the command opened (the cluster session)."""
        if self._stack is not None:
            stack, self._stack, self._client = self._stack, None, None
            stack.close()

    @property
    def identity(self) -> ModelIdentity:
        if self._identity is None:
            self._identity = IdentityCache(self.cache_dir).get(self.manifest.model)
        if self._identity is None:
            return self.clip.identity()
        return self._identity

    @property
    def device_name(self) -> str:
        """Where models run: the loaded model's device, else the requested one."""
        return str(self._clip.device) if self._clip is not None else self.device

    def description(self) -> dict[str, Any]:
        return extractor_description(self.identity, self.manifest.extraction)

    @property
    def extractor_fp(self) -> str:
        if self._fp is None:
            self._fp = fingerprint(self.description())
        return self._fp

    def extractor(self, store: FeatureStore) -> Extractor:
        fp = self.extractor_fp
        if not store.has_extractor(fp):
            others = ", ".join(f[:12] for f in store.extractor_fps()) or "none"
            raise ExtractorMismatchError(
                f"{store.location} has no features of this manifest's model and preprocessing "
                f"(extractor {fp[:12]}; the store has: {others}); run `shipyard extract`")
        return store.extractor(fp)
