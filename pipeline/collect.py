"""`store gc`: what a working store holds that nothing current needs, found without changing
anything (`collect`), then removed under the writer lock (`remove`).

What goes, each with its reason:
- `superseded`: a committed artefact of a job that has a newer one: the one the manifest plans
  when it is built (in any layer), else the newest of the job; a text set no planned job reads.
  Whatever a kept artefact reads is kept, so a kept run can still be reported.
- `old-records`: a dataset's records versions other than the current one (unless kept read it).
- `orphan`: a committed artefact whose inputs are in no layer any more (to a fixpoint).
- `incomplete`: an artefact begun and never committed, untouched for longer than the grace
  period (a killed training run a user may still resume is younger than that).
- `checkpoint`: a committed generator's or head's leftover training checkpoints.
- `past-rows`: chunks of row-table arrays past the committed row count (a killed append).
- `temporary`: temporary files of metadata writes a killed writer left.

Extractors' committed rows are never touched: features are what every layer shares. A removal is
un-committed first (its `complete` marker cleared, `collecting` set), then deleted members first
and its own metadata last: a gc killed half-way leaves incomplete groups that the next gc (with no
grace) or the next writer replaces, never a committed artefact with missing parts.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import zarr

from .artifacts import (
    ADAPTER,
    EXTRACTOR,
    FOLDER_KINDS,
    GENERATOR,
    RECORDS,
    TEXT_SET,
    Kind,
    Ref,
    input_refs,
)
from .locations import stored_objects, sweep_partials
from .store import FeatureStore
from .zarr_nodes import attrs_of, child_group

REASONS = ("superseded", "old-records", "orphan", "incomplete", "checkpoint", "past-rows",
           "temporary")
GROUP_REASONS = frozenset(REASONS[:5])  # removed as whole groups


@dataclass(frozen=True)
class Wanted:
    """What the current manifest plans: job id -> artefact key, and the text sets it reads."""

    jobs: dict[str, str] = field(default_factory=dict)
    texts: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Removal:
    reason: str
    path: str  # inside the store
    kind: str
    bytes: int
    job: str | None = None
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Collection:
    removals: list[Removal]
    kept: int  # committed artefacts that stay
    within_grace: list[str]  # incomplete artefacts younger than the grace period
    skipped: list[str]  # what gc could not judge (a damaged row table), left alone

    @property
    def bytes(self) -> int:
        return sum(r.bytes for r in self.removals)


@dataclass
class _Node:
    path: str
    kind: Kind
    key: str
    attrs: dict[str, Any]
    dataset: str | None = None  # records only

    @property
    def complete(self) -> bool:
        if self.kind is EXTRACTOR:
            return bool(self.attrs.get("complete_layout"))
        return bool(self.attrs.get("complete"))

    @property
    def record(self) -> dict[str, Any]:
        return dict(self.attrs.get("record") or {})

    @property
    def created(self) -> str:
        return str((self.attrs.get("provenance") or {}).get("created", ""))


def _groups(group: zarr.Group) -> list[tuple[str, zarr.Group]]:
    with warnings.catch_warnings():  # a killed write's temporary file is what gc reports
        warnings.filterwarnings("ignore", message=r"Object at .*\.partial is not recognized")
        names = sorted(group.group_keys())
    return [(name, child_group(group, name)) for name in names]


def inventory(store: FeatureStore) -> list[_Node]:
    """Every artefact group of one store (its own, not its upstreams'), committed or not."""
    root, out = store.root, []
    for kind in FOLDER_KINDS:
        if kind.folder in root:
            out += [_Node(f"{kind.folder}/{key}", kind, key, attrs_of(g))
                    for key, g in _groups(child_group(root, kind.folder))]
    if "extractors" in root:
        for fp, ex in _groups(child_group(root, "extractors")):
            out.append(_Node(f"extractors/{fp}", EXTRACTOR, fp, attrs_of(ex)))
            if "texts" in ex:
                out += [_Node(f"extractors/{fp}/texts/{key}", TEXT_SET, key, attrs_of(g))
                        for key, g in _groups(child_group(ex, "texts"))]
    if "datasets" in root:
        for name, ds in _groups(child_group(root, "datasets")):
            out += [_Node(f"datasets/{name}/{key}", RECORDS, key, attrs_of(g), dataset=name)
                    for key, g in _groups(ds)]
    return out


def collect(store: FeatureStore, wanted: Wanted, grace_seconds: float,
            now: float | None = None, swept: list[tuple[str, int]] | None = None) -> Collection:
    """What `remove` would delete from the working store of `store`, and why; changes nothing.
    `swept`: temporary files already removed when a writer opened the store (else listed)."""
    now = time.time() if now is None else now
    own = store.own()
    nodes = inventory(own)
    reasons: dict[str, tuple[str, str]] = {}  # path -> (reason, detail)
    within: list[str] = []
    for n in nodes:
        if n.complete:
            continue
        age = now - _modified(store, f"{n.path}/zarr.json", now)
        if n.attrs.get("collecting"):
            reasons[n.path] = ("incomplete", "left half-removed by a killed gc")
        elif age > grace_seconds:
            reasons[n.path] = ("incomplete", "never committed; untouched for over "
                                             f"{_age(grace_seconds)}")
        else:
            within.append(n.path)
    done = [n for n in nodes if n.complete]
    _orphans(store, done, reasons)
    live = [n for n in done if n.path not in reasons]
    candidates = _superseded(store, live, wanted)
    _keep_what_is_read(live, candidates)
    reasons.update(candidates)
    removals = [_removal(store, n, *reasons[n.path]) for n in nodes if n.path in reasons]
    kept = [n for n in live if n.path not in reasons]
    removals += _checkpoints(store, kept)
    rows, skipped = _past_rows(store, kept)
    removals += rows
    temp = swept if swept is not None else sweep_partials(store.location, remove=False)
    removals += [Removal("temporary", p, "file", size, detail="left by a killed write")
                 for p, size in temp]
    order = {r: i for i, r in enumerate(REASONS)}
    removals.sort(key=lambda r: (order[r.reason], r.path))
    return Collection(removals, sum(1 for n in kept if n.kind is not EXTRACTOR), within, skipped)


def _orphans(store: FeatureStore, done: list[_Node], reasons: dict[str, tuple[str, str]]) -> None:
    """Committed artefacts whose inputs are in no layer, to a fixpoint."""
    mine = {(n.kind.name, n.key): n for n in done}
    below: set[tuple[str, str]] | None = None  # the upstreams' artefacts, listed once if needed

    def in_upstreams(ref: tuple[str, str]) -> bool:
        nonlocal below
        if below is None:
            below = {(n.kind.name, n.key) for up in store.upstreams for n in inventory(up)
                     if n.complete}
        return ref in below

    changed = True
    while changed:
        changed = False
        for n in done:
            if n.path in reasons:
                continue
            for kind, key in input_refs(n.record.get("inputs") or {}):
                holder = mine.get((kind.name, key))
                if (holder is None or holder.path in reasons) and \
                        not in_upstreams((kind.name, key)):
                    reasons[n.path] = ("orphan", f"its input {kind.name} {key[:12]} is gone")
                    changed = True
                    break


def _superseded(store: FeatureStore, live: list[_Node],
                wanted: Wanted) -> dict[str, tuple[str, str]]:
    out: dict[str, tuple[str, str]] = {}
    own = store.own()
    current = {name: own._own_version(name) for name in {n.dataset for n in live if n.dataset}}
    by_job: dict[str, list[_Node]] = {}
    for n in live:
        if n.kind is RECORDS and n.dataset is not None and current[n.dataset] is not None \
                and n.key != current[n.dataset]:
            out[n.path] = ("old-records", f"dataset {n.dataset} is at "
                                          f"{str(current[n.dataset])[:12]}")
        elif n.kind is TEXT_SET and n.key not in wanted.texts:
            out[n.path] = ("superseded", "no job of the manifest reads it")
        elif n.kind in FOLDER_KINDS and n.record.get("job"):
            by_job.setdefault(str(n.record["job"]), []).append(n)
    for job, group in by_job.items():
        planned = wanted.jobs.get(job)
        if planned is not None and store.lookup(Ref.of(group[0].kind, planned)) is not None:
            keeper, why = planned, "the manifest's"
        else:
            keeper = max(group, key=lambda n: (n.created, n.key)).key
            why = "the newest"
        for n in group:
            if n.key != keeper:
                out[n.path] = ("superseded", f"by {keeper[:12]} ({why})")
    return out


def _keep_what_is_read(live: list[_Node], candidates: dict[str, tuple[str, str]]) -> None:
    """Un-mark every candidate a kept artefact reads, transitively."""
    by_ref = {(n.kind.name, n.key): n for n in live}
    stack = [n for n in live if n.path not in candidates]
    while stack:
        n = stack.pop()
        for kind, key in input_refs(n.record.get("inputs") or {}):
            read = by_ref.get((kind.name, key))
            if read is not None and read.path in candidates:
                del candidates[read.path]
                stack.append(read)


def _removal(store: FeatureStore, n: _Node, reason: str, detail: str) -> Removal:
    job = n.record.get("job") or (f"records:{n.dataset}" if n.dataset else None)
    return Removal(reason, n.path, n.kind.name, _bytes(store, n.path), job, detail)


def _checkpoints(store: FeatureStore, kept: list[_Node]) -> list[Removal]:
    out = []
    for n in kept:
        if n.kind not in (GENERATOR, ADAPTER):
            continue
        group = child_group(store.root, n.path)
        for name in sorted(group.group_keys()):
            if name.startswith("checkpoint_"):
                path = f"{n.path}/{name}"
                out.append(Removal("checkpoint", path, "checkpoint", _bytes(store, path),
                                   n.record.get("job"), f"the {n.kind.name} is committed"))
    return out


def _past_rows(store: FeatureStore, kept: list[_Node]) -> tuple[list[Removal], list[str]]:
    """Chunks of row-table arrays wholly past the committed row count."""
    out, skipped = [], []
    for n in kept:
        if n.kind is not EXTRACTOR:
            continue
        ex = child_group(store.root, n.path)
        for name, table in _groups(ex):
            attrs = attrs_of(table)
            if "rows" not in attrs or "columns" not in attrs:
                continue
            rows = int(attrs["rows"])
            for col in ["keys", *attrs["columns"]]:
                arr = table[col]
                if not isinstance(arr, zarr.Array):
                    continue
                path = f"{n.path}/{name}/{col}"
                if arr.shape[0] < rows:
                    skipped.append(f"{path}: {rows} rows committed but {arr.shape[0]} stored "
                                   "(damaged; run `shipyard store verify`)")
                elif arr.shape[0] > rows:
                    step = arr.chunks[0]
                    first = -(-rows // step)  # the first chunk wholly past the committed rows
                    size = sum(b for key, (b, _) in stored_objects(
                        store.location, store.options, f"{path}/c").items()
                        if _chunk_row(key, path) >= first)
                    out.append(Removal("past-rows", path, "rows", size,
                                       detail=f"{arr.shape[0]} rows stored, {rows} committed"))
    return out, skipped


def _chunk_row(key: str, array_path: str) -> int:
    """The first chunk index of a chunk object's key (`<array>/c/<i>/<j>...`)."""
    head = key[len(array_path) + 3:].split("/")[0]
    return int(head) if head.isdigit() else -1


def remove(store: FeatureStore, collection: Collection) -> None:
    """Delete what `collect` found. The store must be open for writing (under its lock)."""
    root = store.root
    for r in collection.removals:
        if r.reason in GROUP_REASONS:
            _remove_group(root, r.path)
        elif r.reason == "past-rows":
            table_path, _, col = r.path.rpartition("/")
            table = child_group(root, table_path)
            arr = table[col]
            assert isinstance(arr, zarr.Array)
            arr.resize((int(attrs_of(table)["rows"]), *arr.shape[1:]))
        # temporary files were removed when the writer opened the store


def _remove_group(root: zarr.Group, path: str) -> None:
    parent_path, _, name = path.rpartition("/")
    parent = root
    for part in parent_path.split("/"):  # gone already when an enclosing group was removed
        if part not in parent:
            return
        parent = child_group(parent, part)
    if name not in parent:
        return
    group = child_group(parent, name)
    attrs = attrs_of(group)
    marks: dict[str, Any] = {"collecting": True}
    if "complete" in attrs:
        marks["complete"] = False
    if "complete_layout" in attrs:
        marks["complete_layout"] = False
    group.update_attributes(marks)  # un-committed first: readers never see a part of it
    for member in sorted(group.keys()):
        del group[member]
    del parent[name]


def _bytes(store: FeatureStore, path: str) -> int:
    return sum(b for b, _ in stored_objects(store.location, store.options, path).values())


def _modified(store: FeatureStore, key: str, default: float) -> float:
    found = stored_objects(store.location, store.options, key)
    return max((m for _, m in found.values()), default=default)


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{max(seconds, 0):.0f}s"


def parse_duration(text: str) -> float:
    """'90s', '30m', '24h', '7d' or plain seconds -> seconds."""
    raw = text.strip().lower()
    scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}.get(raw[-1:])
    number = raw[:-1] if scale else raw
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        raise ValueError(f"{text!r}: expected a duration such as 90s, 30m, 24h or 7d") from None
    if not value >= 0:
        raise ValueError(f"{text!r}: a duration cannot be negative")
    return value
