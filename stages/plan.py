"""Reading what the manifest asks for and comparing it with what the store holds.

`extract` acts on a plan; `status` only prints one. Building a plan reads split files and hashes
images (stat-cached) but writes nothing to the store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.datasets import (
    DatasetRecords,
    Failure,
    Record,
    Split,
    base_new_split,
    few_shot,
    read_dataset,
)
from pipeline.fingerprint import fingerprint
from pipeline.hashing import StatCache, default_cache_dir, hash_files
from pipeline.manifest import DatasetSpec, Manifest, ViewsFor
from pipeline.progress import Progress

# A dataset's stored form: arrays, attributes, and the content key (version) of both.
RecordsTable = tuple[dict[str, np.ndarray], dict[str, Any], str]


@dataclass
class DatasetPlan:
    spec: DatasetSpec
    data: DatasetRecords
    keys: list[bytes | None]  # per record: content key, or None when the file is unusable
    failures: list[Failure]  # rejected entries and unreadable files

    def hashed(self) -> list[tuple[Record, bytes]]:
        return [(r, k) for r, k in zip(self.data.records, self.keys, strict=True) if k is not None]


def select_datasets(manifest: Manifest, names: list[str] | None) -> list[DatasetSpec]:
    return [manifest.dataset(n) for n in names] if names else list(manifest.datasets)


def plan_datasets(specs: list[DatasetSpec], workers: int, progress: Progress,
                  cache_dir: Path | None = None) -> list[DatasetPlan]:
    """Read every dataset's records and hash their files."""
    datasets = [read_dataset(spec) for spec in specs]
    files = sorted({d.file(r) for d in datasets for r in d.records})
    cache = StatCache((cache_dir or default_cache_dir()) / "stat.sqlite")
    task = progress.task("hash images", len(files), "file")
    try:
        hashed = hash_files(files, cache, workers=max(2, workers * 2), on_progress=task.advance)
    finally:
        task.close()
        cache.close()
    plans = []
    for spec, data in zip(specs, datasets, strict=True):
        keys: list[bytes | None] = []
        failures = list(data.rejected)
        for rec in data.records:
            path = data.file(rec)
            keys.append(hashed.keys.get(path))
            if path in hashed.errors:
                failures.append(Failure(str(path), hashed.errors[path]))
        plans.append(DatasetPlan(spec, data, keys, failures))
    return plans


def records_table(plan: DatasetPlan, valid: set[bytes], views_for: ViewsFor) -> RecordsTable:
    """The dataset's stored form over the records whose image has features: arrays, attrs and the
    content key of both. Also the few-shot subsets of every listed seed."""
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
    for seed in spec.seeds:
        arrays[fewshot_name(spec.shots, seed)] = few_shot(labels, splits, spec.shots, seed)
    base, new = base_new_split(len(data.classnames))
    attrs: dict[str, Any] = {
        "name": spec.name,
        "format": spec.format.value,
        "classnames": list(data.classnames),
        "base_labels": base,
        "new_labels": new,
        "templates": list(spec.templates),
        "shots": spec.shots,
        "seeds": list(spec.seeds),
        "views_for": views_for.value,
        "splits": {s.name.lower(): int((splits == s).sum()) for s in Split},
    }
    content = {"attrs": attrs, "arrays": {k: _digest(v) for k, v in sorted(arrays.items())}}
    return arrays, attrs, fingerprint(content)


def fewshot_name(shots: int, seed: int) -> str:
    return f"fewshot_k{shots}_seed{seed}"


def view_keys(plan: DatasetPlan, arrays: dict[str, np.ndarray], views_for: ViewsFor) -> list[int]:
    """Rows of the stored records that need augmented views."""
    if views_for is ViewsFor.TRAIN:
        return np.flatnonzero(arrays["splits"] == Split.TRAIN).tolist()
    rows: set[int] = set()
    for seed in plan.spec.seeds:
        rows.update(arrays[fewshot_name(plan.spec.shots, seed)].tolist())
    return sorted(rows)


def _digest(value: np.ndarray) -> str:
    data = np.ascontiguousarray(value).tobytes() + str(value.shape).encode()
    return hashlib.sha256(data).hexdigest()
