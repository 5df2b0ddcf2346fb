"""What a manifest's dataset holds, read from its split file or folder and its images' hashes: the
records table `extract` stores, and the content keys of what each consumer reads from it.

Building a plan reads split files and hashes images (stat-cached) but writes nothing to the store
and loads no model. The keys computed here from the files are the keys the loaders compute from
the store (`subset_key`), so a planned job and the job that runs agree on their inputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import RECORDS, artifact_key
from .datasets import (
    DatasetRecords,
    Failure,
    Record,
    Split,
    base_new_split,
    dassl_few_shot,
    few_shot,
    read_dataset,
)
from .errors import StoreError
from .fingerprint import fingerprint
from .hashing import StatCache, default_cache_dir, hash_files
from .manifest import DatasetSpec, Domain, Sampler, ViewsFor
from .progress import Progress
from .records import fewshot_name, fewshot_val_name


@dataclass
class DatasetPlan:
    spec: DatasetSpec
    data: DatasetRecords
    keys: list[bytes | None]  # per record: content key, or None when the file is unusable
    failures: list[Failure]  # rejected entries and unreadable files

    def hashed(self) -> list[tuple[Record, bytes]]:
        return [(r, k) for r, k in zip(self.data.records, self.keys, strict=True) if k is not None]


def plan_dataset(spec: DatasetSpec, workers: int, progress: Progress,
                 cache_dir: Path | None = None,
                 classes_of: tuple[str, ...] | None = None,
                 remote: Callable[[list[Any]], list[bytes | str]] | None = None) -> DatasetPlan:
    """Read one dataset's records and hash their files (`classes_of`: a synthetic dataset's
    paired real classes; `remote`: hashes files on object storage on dask workers)."""
    data = read_dataset(spec, classes_of)
    files = sorted({data.file(r) for r in data.records}, key=str)
    cache = StatCache((cache_dir or default_cache_dir()) / "stat.sqlite")
    task = progress.task(f"hash {spec.name}", len(files), "file")
    try:
        hashed = hash_files(files, cache, workers=max(2, workers * 2), on_progress=task.advance,
                            remote=remote)
    finally:
        task.close()
        cache.close()
    keys: list[bytes | None] = []
    failures = list(data.rejected)
    for rec in data.records:
        path = data.file(rec)
        keys.append(hashed.keys.get(path))
        if path in hashed.errors:
            failures.append(Failure(str(path), hashed.errors[path]))
    return DatasetPlan(spec, data, keys, failures)


# A dataset's stored form: arrays, attributes, and the key (version) of both.
RecordsTable = tuple[dict[str, np.ndarray], dict[str, Any], str]


def records_table(plan: DatasetPlan, valid: set[bytes]) -> RecordsTable:
    """The dataset's stored form over the records whose image has (or will have) features:
    arrays, attrs and their content key. Also the few-shot subsets of every listed seed."""
    rows = [(r, k) for r, k in plan.hashed() if k in valid]
    spec, data = plan.spec, plan.data
    encoded = [r.path.encode("utf-8") for r, _ in rows]
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(p) for p in encoded])
    labels = np.array([r.label for r, _ in rows], dtype=np.int32)
    splits = np.array([int(r.split) for r, _ in rows], dtype=np.int8)
    arrays: dict[str, np.ndarray] = {
        "paths": np.frombuffer(b"".join(encoded), dtype=np.uint8).copy(),
        "path_offsets": offsets,
        "keys": np.frombuffer(b"".join(k for _, k in rows), dtype=np.uint8).reshape(-1, 32).copy(),
        "labels": labels,
        "splits": splits,
    }
    for seed in seeds_of(spec):
        if spec.sampler is Sampler.DASSL:
            train, val = dassl_few_shot(labels, splits, spec.shots, seed, arrays["keys"])
            arrays[fewshot_name(spec.shots, seed)] = train
            arrays[fewshot_val_name(spec.shots, seed)] = val
        else:
            arrays[fewshot_name(spec.shots, seed)] = few_shot(labels, splits, spec.shots, seed,
                                                              arrays["keys"])
    base, new = base_new_split(len(data.classnames))
    attrs: dict[str, Any] = {
        "name": spec.name,
        "format": spec.format.value,
        "classnames": list(data.classnames),
        "base_labels": base,
        "new_labels": new,
        "shots": spec.shots,
        "seeds": list(seeds_of(spec)),
        "sampler": spec.sampler.value,
        "domain": spec.domain.value,
        **({"pairs_with": spec.pairs_with} if spec.pairs_with else {}),
        "splits": {s.name.lower(): int((splits == s).sum()) for s in Split},
    }
    key = artifact_key(RECORDS, {"attrs": attrs},
                       {"arrays": {k: _digest(v) for k, v in sorted(arrays.items())}})
    return arrays, attrs, key


def seeds_of(spec: DatasetSpec) -> tuple[int, ...]:
    """The few-shot seeds a dataset's records hold: none for a synthetic-domain dataset (it is
    read whole, paired with its real dataset's subsets)."""
    return () if spec.domain is Domain.SYNTHETIC else spec.seeds


def predicted_valid(plan: DatasetPlan, have: set[bytes], known_bad: set[tuple[str, str]]) -> set[bytes]:
    """Image keys that will have features after `extract`: those stored, and every hashed image
    that has not already failed to decode with the same bytes."""
    out = set(have)
    for rec, key in plan.hashed():
        if (str(plan.data.file(rec)), key.hex()) not in known_bad:
            out.add(key)
    return out


def subset_key(keys: np.ndarray, labels: np.ndarray, classnames: tuple[str, ...]) -> str:
    """Content key of a set of images with labels over named classes: what a consumer reads.
    The planner computes it from the files, the loaders from the store; they must agree."""
    return fingerprint({
        "keys": hashlib.sha256(np.ascontiguousarray(keys, dtype=np.uint8).tobytes()).hexdigest(),
        "labels": hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes()).hexdigest(),
        "classnames": list(classnames)})


def fewshot_rows(arrays: dict[str, np.ndarray], shots: int, seed: int,
                 labels: list[int]) -> np.ndarray:
    """Record rows of the K-shot subset (seed) restricted to the given labels."""
    rows = arrays[fewshot_name(shots, seed)]
    return rows[np.isin(arrays["labels"][rows], labels)]


def val_rows(arrays: dict[str, np.ndarray], shots: int, seed: int,
             labels: list[int]) -> np.ndarray:
    """Record rows of the val images a head of this seed tunes on, restricted to `labels` (the
    base classes): the seed's few-shot val subset, or the whole val split without one."""
    rows = arrays.get(fewshot_val_name(shots, seed))
    if rows is None:
        rows = np.flatnonzero(arrays["splits"] == Split.VAL)
    return rows[np.isin(arrays["labels"][rows], labels)]


def relabel(values: np.ndarray, labels: list[int]) -> np.ndarray:
    """Dataset label ids -> positions in `labels` (0..C-1)."""
    remap = {label: i for i, label in enumerate(labels)}
    return np.array([remap[int(x)] for x in values], dtype=np.int64)


@dataclass(frozen=True)
class DatasetFacts:
    """What the consumers of a dataset read, each by its content key."""

    name: str
    records: str  # key of the record version
    classnames: tuple[str, ...]
    base: list[int]
    new: list[int]
    train: dict[int, str]  # seed -> base-class K-shot training set
    val: dict[int, str]  # seed -> base-class val set a head tunes on
    test: str
    images: int  # records whose image has features


def facts_of(spec: DatasetSpec, arrays: dict[str, np.ndarray], attrs: dict[str, Any],
             key: str) -> DatasetFacts:
    classnames = tuple(attrs["classnames"])
    base, new = list(attrs["base_labels"]), list(attrs["new_labels"])
    train, val = {}, {}
    for seed in seeds_of(spec):
        rows = fewshot_rows(arrays, spec.shots, seed, base)
        train[seed] = subset_key(arrays["keys"][rows], relabel(arrays["labels"][rows], base),
                                 tuple(classnames[i] for i in base))
        rows = val_rows(arrays, spec.shots, seed, base)
        val[seed] = subset_key(arrays["keys"][rows], arrays["labels"][rows], classnames)

    def split(which: Split) -> str:
        rows = np.flatnonzero(arrays["splits"] == which)
        return subset_key(arrays["keys"][rows], arrays["labels"][rows], classnames)

    return DatasetFacts(spec.name, key, classnames, base, new, train, val, split(Split.TEST),
                        len(arrays["labels"]))


def view_rows(spec: DatasetSpec, arrays: dict[str, np.ndarray], views_for: ViewsFor) -> list[int]:
    """Rows of the stored records that need augmented views."""
    if views_for is ViewsFor.TRAIN:
        return np.flatnonzero(arrays["splits"] == Split.TRAIN).tolist()
    rows: set[int] = set()
    for seed in seeds_of(spec):
        rows.update(arrays[fewshot_name(spec.shots, seed)].tolist())
    return sorted(rows)


def _digest(value: np.ndarray) -> str:
    data = np.ascontiguousarray(value).tobytes() + str(value.shape).encode()
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class PlannedDataset:
    """A dataset as the next `extract` will store it, and the keys its consumers will read."""

    plan: DatasetPlan
    arrays: dict[str, np.ndarray]
    attrs: dict[str, Any]
    facts: DatasetFacts
    known_failures: tuple[dict[str, str], ...]  # stored decode failures whose file is unchanged
    views_for: ViewsFor

    @property
    def spec(self) -> DatasetSpec:
        return self.plan.spec

    @property
    def known_bad(self) -> set[tuple[str, str]]:
        """(path, key hex) of images that failed to decode with these very bytes."""
        return {(f["path"], f["key"]) for f in self.known_failures}


def plan_records(plan: DatasetPlan, have: set[bytes], stored_failures: list[dict[str, str]],
                 views_for: ViewsFor) -> PlannedDataset:
    """The dataset as the next `extract` stores it: images already failed with the same bytes
    are left out, every other hashed image is expected to get features."""
    current = {(str(plan.data.file(r)), k.hex()) for r, k in plan.hashed()}
    known = tuple(f for f in stored_failures if (f["path"], f.get("key")) in current)
    bad = {(f["path"], f["key"]) for f in known}
    arrays, attrs, key = records_table(plan, predicted_valid(plan, have, bad))
    return PlannedDataset(plan, arrays, attrs, facts_of(plan.spec, arrays, attrs, key), known,
                          views_for)


def require_planned(job: str, name: str, have: Any, planned: Any) -> None:
    """Refuse to compute on other data than the plan named: the store changed since planning."""
    if have != planned:
        raise StoreError(f"{job}: the store's {name} features are not the planned ones "
                         "(run `shipyard extract`)")
