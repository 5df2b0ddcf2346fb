"""Artefacts, one mechanism: every stored output has a kind and a key, and is looked up, created,
resumed or replaced, and committed here and nowhere else.

A key is the sha256 of canonical JSON of (kind, kind version, resolved parameters, the keys of the
inputs), so a changed input or parameter names a different artefact and an unchanged one is found
again. A group becomes visible to readers only when `complete` is set, the last write of a commit;
an incomplete group found under a key is resumed when its kind supports it, else replaced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import zarr

from . import __version__
from .errors import StoreError, StoreReadOnlyError
from .fingerprint import fingerprint
from .locations import refuse_links
from .zarr_nodes import attrs_of, child_group, utcnow


@dataclass(frozen=True)
class Kind:
    """A family of artefacts. `version` is part of every key: bump it when what the kind stores
    changes meaning, and every artefact of the kind is rebuilt."""

    name: str
    version: int
    folder: str  # the store group holding them; "" for kinds placed by `Ref` (texts, records)
    resumable: bool = False  # an incomplete artefact is continued (checkpoints) rather than replaced
    summary: str = ""


EXTRACTOR = Kind("extractor", 1, "extractors", summary="image features, views and text sets of "
                 "one model + preprocessing recipe (row tables: committed row by row)")
TEXT_SET = Kind("text-set", 1, "", summary="class-name text features of one template")
RECORDS = Kind("records", 1, "", summary="one version of a dataset's path -> image key, label, split")
GENERATOR = Kind("generator", 1, "generators", resumable=True, summary="a trained SHIP generator")
SYNTHETIC = Kind("synthetic", 1, "synthetic", summary="synthesized features, one row per class")
ADAPTER = Kind("adapter", 1, "adapters", resumable=True,
               summary="a trained head's weights (SYNC-CLIP's prompts resume from checkpoints)")
CACHE = Kind("cache", 1, "caches", summary="a Tip-Adapter cache: keys, labels, FAISS index")
RUN = Kind("run", 1, "runs", summary="an evaluation: results table per seed and mean")
REPORT = Kind("report", 1, "", summary="the HTML report of a run (a file beside the manifest)")

KINDS: dict[str, Kind] = {k.name: k for k in (EXTRACTOR, TEXT_SET, RECORDS, GENERATOR, SYNTHETIC,
                                               ADAPTER, CACHE, RUN, REPORT)}
# Kinds stored as `<folder>/<key>` groups at the top of the store.
FOLDER_KINDS = tuple(k for k in KINDS.values() if k.folder and k is not EXTRACTOR)


# The inputs of a record that name other artefacts, by the kind they name ("heads" names the
# heads a run evaluates, each by its kind). Every other input is the content key of data read
# (a few-shot subset, a view recipe), not an artefact. `store gc` follows these to keep what a
# kept artefact reads and to find artefacts whose inputs are gone.
INPUT_KINDS: dict[str, Kind] = {"extractor": EXTRACTOR, "text": TEXT_SET, "generator": GENERATOR,
                                "synthetic": SYNTHETIC, "domain": RECORDS}
CONTENT_INPUTS = frozenset({"train", "val", "test", "views"})


def input_refs(inputs: dict[str, Any]) -> list[tuple[Kind, str]]:
    """The artefacts a record's inputs name, as (kind, key)."""
    out: list[tuple[Kind, str]] = []
    for name, value in inputs.items():
        if name == "heads":
            for head in value.values():
                if head.get("kind"):
                    out += [(KINDS[head["kind"]], k) for k in head.get("keys", []) if k]
        elif name in INPUT_KINDS:
            out += [(INPUT_KINDS[name], k) for k in (value if isinstance(value, list) else [value])
                    if k]
    return out


def artifact_key(kind: Kind, params: dict[str, Any], inputs: dict[str, Any]) -> str:
    """The content key of an artefact: sha256 of canonical JSON of kind, version, parameters and
    the keys of its inputs. Inputs are named by their own keys, never re-described."""
    return fingerprint({"kind": kind.name, "version": kind.version, "params": params,
                        "inputs": inputs})


@dataclass(frozen=True)
class Ref:
    """Where an artefact lives: its kind, key and group path; `pointer` names a group whose
    `current` attribute the commit moves to this key (a dataset's current records)."""

    kind: Kind
    key: str
    path: str
    pointer: str | None = None

    @classmethod
    def of(cls, kind: Kind, key: str) -> Ref:
        if not kind.folder:
            raise ValueError(f"kind {kind.name} has no folder of its own; build its Ref explicitly")
        return cls(kind, key, f"{kind.folder}/{key}")

    @classmethod
    def text_set(cls, extractor: str, key: str) -> Ref:
        return cls(TEXT_SET, key, f"extractors/{extractor}/texts/{key}")

    @classmethod
    def records(cls, dataset: str, key: str) -> Ref:
        return cls(RECORDS, key, f"datasets/{dataset}/{key}", pointer=f"datasets/{dataset}")


@dataclass
class Draft:
    """An artefact being written: its group, and whether it continues an interrupted one."""

    ref: Ref
    group: zarr.Group
    resumed: bool
    started: float = field(default_factory=time.perf_counter)


def _node(root: zarr.Group, path: str) -> zarr.Group | None:
    node: zarr.Group = root
    for part in path.split("/"):
        if part not in node:
            return None
        found = node[part]
        if not isinstance(found, zarr.Group):
            return None
        node = found
    return node


def _ensure(root: zarr.Group, path: str) -> zarr.Group:
    node = root
    for part in path.split("/"):
        node = child_group(node, part) if part in node else node.create_group(part)
    return node


def lookup(root: zarr.Group, ref: Ref) -> zarr.Group | None:
    """The committed artefact, or None (absent, or interrupted before its commit)."""
    group = _node(root, ref.path)
    if group is None or not attrs_of(group).get("complete"):
        return None
    return group


def partial(root: zarr.Group, ref: Ref) -> zarr.Group | None:
    """An artefact under this key that was begun but never committed, or None."""
    group = _node(root, ref.path)
    if group is None or attrs_of(group).get("complete"):
        return None
    return group


def begin(root: zarr.Group, ref: Ref, record: dict[str, Any], read_only: bool,
          resume: bool = True) -> Draft:
    """Start writing an artefact. An interrupted one under the same key is continued when its
    kind is resumable (and `resume`), otherwise replaced by an empty group; never fatal."""
    if read_only:
        raise StoreReadOnlyError(f"cannot write {ref.kind.name} {ref.key[:12]}: store is read-only")
    if record.get("key") != ref.key:
        raise StoreError(f"{ref.kind.name}: record names key {record.get('key')!r}, not {ref.key}")
    found = partial(root, ref)
    if found is not None and ref.kind.resumable and resume and \
            attrs_of(found).get("record", {}).get("key") == ref.key:
        return Draft(ref, found, True)
    parent_path, _, name = ref.path.rpartition("/")
    parent = _ensure(root, parent_path)
    refuse_links(root, ref.path)  # what is replaced must lie inside the store, link-free
    group = parent.create_group(name, overwrite=True, attributes={
        "kind": ref.kind.name, "key": ref.key, "record": record, "complete": False})
    return Draft(ref, group, False)


def commit(root: zarr.Group, draft: Draft, attrs: dict[str, Any], device: str | None = None) -> None:
    """Publish a draft: its attributes and provenance first, the `complete` marker last (and then
    the pointer, for kinds that have one). Readers see all of it or none of it."""
    provenance = {"shipyard": __version__, "created": utcnow(), "device": device,
                  "seconds": round(time.perf_counter() - draft.started, 3),
                  "resumed": draft.resumed}
    draft.group.update_attributes({**attrs, "provenance": provenance})
    draft.group.attrs["complete"] = True  # the commit
    if draft.ref.pointer:
        _ensure(root, draft.ref.pointer).attrs["current"] = draft.ref.key


def record_of(group: zarr.Group) -> dict[str, Any]:
    """What made an artefact: job id, kind, key, resolved parameters and input keys."""
    return dict(attrs_of(group).get("record", {}))


def keys_of(root: zarr.Group, kind: Kind) -> list[str]:
    """Keys of the artefacts of a folder kind in the store, committed or not."""
    group = _node(root, kind.folder) if kind.folder else None
    return sorted(group.group_keys()) if group is not None else []


@dataclass
class Slots:
    """The newest committed artefact of each job id, per kind: what `status` compares a planned
    job with to say why it is stale ("params.epochs 3 -> 5", "input train changed")."""

    by_job: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def scan(cls, root: zarr.Group, kinds: tuple[Kind, ...] = FOLDER_KINDS) -> Slots:
        return cls.over([root], kinds)

    @classmethod
    def over(cls, roots: list[zarr.Group], kinds: tuple[Kind, ...] = FOLDER_KINDS) -> Slots:
        """The newest artefact of each job id in any of these stores (a store's layers)."""
        out = cls()
        for kind, root in ((k, r) for k in kinds for r in roots):
            holder = _node(root, kind.folder)
            if holder is None:
                continue
            for key in holder.group_keys():
                attrs = attrs_of(child_group(holder, key))
                rec = attrs.get("record") or {}
                job = rec.get("job")
                if not job or not attrs.get("complete"):
                    continue
                created = (attrs.get("provenance") or {}).get("created", "")
                old = out.by_job.get(job)
                if old is None or created >= old["created"]:
                    out.by_job[job] = {"created": created, "record": rec}
        return out

    def why(self, job: str, params: dict[str, Any], inputs: dict[str, Any]) -> str:
        """A short reason a planned job has no artefact: what differs from the last one built."""
        old = self.by_job.get(job)
        if old is None:
            return "not built yet"
        changes = _diff("params", old["record"].get("params", {}), params)
        changes += [f"input {name} changed" for name in sorted(set(inputs) | set(old["record"].get(
            "inputs", {}))) if old["record"].get("inputs", {}).get(name) != inputs.get(name)]
        return "; ".join(changes[:4]) or "built under another key (kind version changed)"


def _diff(prefix: str, old: Any, new: Any) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new)):
            out += _diff(f"{prefix}.{k}", old.get(k), new.get(k))
        return out
    return [] if old == new else [f"{prefix} {_short(old)} -> {_short(new)}"]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
