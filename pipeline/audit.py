"""Read-only views of a store: a summary (`store info`) and an integrity check (`store verify`)."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from .artifacts import CACHE, FOLDER_KINDS, RUN, SYNTHETIC, Kind, Ref, keys_of, record_of
from .errors import StoreError
from .fingerprint import fingerprint
from .records import Extractor, text_key
from .rows import RowTable
from .store import FeatureStore
from .zarr_nodes import attrs_of, child_array, child_group, read_sealed, require_unit_rows

# Stored features are L2-normalized before the cast to float16; their norms stay within this.
NORM_TOLERANCE = 1e-2


def info(store: FeatureStore) -> dict[str, Any]:
    extractors = []
    for fp in store.extractor_fps():
        ex = store.extractor(fp)
        desc = ex.fingerprint
        extractors.append({
            "fp": fp,
            "model": desc["model"]["name"],
            "weights_sha256": desc["model"]["weights_sha256"],
            "dim": ex.dim,
            "views": ex.views,
            "images": ex.images.rows,
            "view_rows": ex.view_table.rows if ex.views else 0,
            "text_sets": len(ex.text_groups()),
            "created": attrs_of(ex.group).get("created"),
        })
    datasets = []
    for name in store.dataset_names():
        ds = store.dataset(name)
        datasets.append({
            "name": name,
            "version": ds.version,
            "records": len(ds),
            "classes": len(ds.classnames),
            "splits": ds.attrs["splits"],
            "failures": len(ds.failures),
        })
    root = attrs_of(store.root)
    listing = {k.folder: [artifact_entry(store, k, key) for key in keys_of(store.root, k)]
               for k in FOLDER_KINDS}
    return {"store": store.location, "format": root.get("shipyard_format"),
            "created": root.get("created"), "published": root.get("published"),
            "extractors": extractors, "datasets": datasets,
            "artifacts": {k: len(v) for k, v in listing.items() if v},
            "listing": {k: v for k, v in listing.items() if v}}


def artifact_entry(store: FeatureStore, kind: Kind, key: str) -> dict[str, Any]:
    """One artefact's provenance: the job that made it, its inputs by key, when, where and how
    long, and whether it is committed (an incomplete one is a killed or running write)."""
    attrs = attrs_of(child_group(child_group(store.root, kind.folder), key))
    record = dict(attrs.get("record") or {})
    provenance = dict(attrs.get("provenance") or {})
    return {"key": key, "kind": kind.name, "job": record.get("job"),
            "complete": bool(attrs.get("complete")), "inputs": record.get("inputs", {}),
            "created": provenance.get("created"), "device": provenance.get("device"),
            "seconds": provenance.get("seconds"), "resumed": provenance.get("resumed"),
            "shipyard": provenance.get("shipyard")}


def report_entries(folder: Path, store: FeatureStore) -> list[dict[str, Any]]:
    """The reports written in a manifest's report folder: each file with its own key, the run it
    reports and whether that run is still in a layer of the store (else the report outlived it)."""
    from .report import report_meta

    out = []
    for path in sorted(folder.glob("*.html")) if folder.is_dir() else []:
        meta = report_meta(path)
        run = meta.get("run")
        st = path.stat()
        out.append({"path": str(path), "key": meta.get("key"), "run": run,
                    "run_in_store": run is not None and store.lookup(Ref.of(RUN, run)) is not None,
                    "bytes": st.st_size,
                    "written": dt.datetime.fromtimestamp(st.st_mtime, dt.UTC).isoformat(
                        timespec="seconds")})
    return out


@dataclass
class Verification:
    checked: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def count(self, what: str, n: int = 1) -> None:
        self.checked[what] = self.checked.get(what, 0) + n


def verify(store: FeatureStore) -> Verification:
    """Check every committed row and every fingerprint. Reads everything; changes nothing."""
    result = Verification()
    for fp in store.extractor_fps():
        ex = store.extractor(fp)
        where = f"extractors/{fp[:12]}"
        if attrs_of(ex.group).get("fp") != fp or fingerprint(ex.fingerprint) != fp:
            result.problems.append(f"{where}: fingerprint does not match the group's name")
        _check_table(ex.images, f"{where}/images", result)
        if ex.views:
            _check_table(ex.view_table, f"{where}/views", result)
            for name in sorted(ex.group.group_keys()):  # named view recipes (extraction.recipes)
                if name.startswith("views_"):
                    _check_table(RowTable(child_group(ex.group, name), read_only=True),
                                 f"{where}/{name}", result)
        _check_texts(ex, where, result)
        result.count("extractors")
    have = [set(store.extractor(fp).images.index()) for fp in store.extractor_fps()]
    for name in store.dataset_names():
        _check_dataset(store, name, have, result)
        result.count("datasets")
    for kind in FOLDER_KINDS:
        for key in keys_of(store.root, kind):
            _check_artifact(store, kind, key, result)
    return result


def _check_artifact(store: FeatureStore, kind: Kind, key: str, result: Verification) -> None:
    """A committed artefact: named by its key, every sealed array matching its digest, and the
    invariants of its kind (rows unit-norm, labels within the class list, one label per key)."""
    where = f"{kind.folder}/{key[:12]}"
    group = store.lookup(Ref.of(kind, key))
    if group is None:
        return  # interrupted before its commit: invisible to readers, replaced when next built
    if record_of(group).get("key") != key:
        result.problems.append(f"{where}: its record names another key")
    try:
        for _path, arr in group.members(max_depth=None):
            if isinstance(arr, zarr.Array):
                read_sealed(arr)
        if kind is SYNTHETIC and "classes" in group:
            _check_table(RowTable(child_group(group, "classes"), read_only=True),
                         f"{where}/classes", result)
        if kind is CACHE:
            n, labels = child_array(group, "keys").shape[0], read_sealed(child_array(group, "labels"))
            classes = len(attrs_of(group).get("classnames", []))
            if len(labels) != n or (n and not 0 <= labels.min() <= labels.max() < classes):
                result.problems.append(f"{where}: {len(labels)} labels for {n} keys, or labels "
                                       f"outside its {classes} classes")
    except StoreError as exc:
        result.problems.append(f"{where}: {exc}")
    result.count("artifacts")


def _check_table(table: RowTable, where: str, result: Verification) -> None:
    n = table.rows
    for name in ["keys", *table.columns]:
        if table.array(name).shape[0] < n:
            result.problems.append(f"{where}/{name}: {table.array(name).shape[0]} rows stored, "
                                   f"{n} committed")
            return
    keys = table.keys()
    distinct = len({k.tobytes() for k in keys})
    if distinct != n:
        result.problems.append(f"{where}: {n - distinct} duplicate keys")
    step = table.chunk_rows * 16
    for col in table.columns:
        for start in range(0, n, step):
            block = np.asarray(table.array(col)[start : min(n, start + step)], dtype=np.float32)
            bad = ~np.isfinite(block).reshape(len(block), -1).all(axis=1)
            if bad.any():
                result.problems.append(f"{where}/{col}: row {start + int(np.argmax(bad))} "
                                       f"is not finite ({int(bad.sum())} rows in block)")
                break
            if col == "norms":  # the raw features' norms: finite (above) and not negative
                if (block < 0).any():
                    result.problems.append(f"{where}/{col}: a negative norm in rows from {start}")
                    break
                continue
            norms = np.linalg.norm(block, axis=-1)
            off = np.abs(norms - 1.0) > NORM_TOLERANCE
            if off.any():
                row = start + int(np.argmax(off.reshape(len(block), -1).any(axis=1)))
                result.problems.append(f"{where}/{col}: row {row} is not unit-norm")
                break
    result.count("rows", n)


def _check_texts(ex: Extractor, where: str, result: Verification) -> None:
    texts = child_group(ex.group, "texts")
    for key in ex.text_groups():
        sub = child_group(texts, key)
        attrs = attrs_of(sub)
        if not attrs.get("complete"):
            continue  # an interrupted write; invisible to readers and rewritten on demand
        params = attrs.get("record", {}).get("params", {})
        expected = text_key(ex.fp, params.get("template", ""), tuple(params.get("classnames", [])))
        if expected != key:
            result.problems.append(f"{where}/texts/{key[:12]}: key does not match its content")
        try:
            feats = require_unit_rows(read_sealed(child_array(sub, "features")),
                                      f"{where}/texts/{key[:12]}")
        except StoreError as exc:
            result.problems.append(str(exc))
            continue
        if feats.shape != (len(params.get("classnames", [])), ex.dim):
            result.problems.append(f"{where}/texts/{key[:12]}: {feats.shape} features for "
                                   f"{len(params.get('classnames', []))} classes of width {ex.dim}")
        result.count("text_sets")


def _check_dataset(store: FeatureStore, name: str, have: list[set[bytes]],
                   result: Verification) -> None:
    where = f"datasets/{name}"
    try:
        ds = store.dataset(name)
        n = len(ds)
        offsets, labels = ds.array("path_offsets"), ds.labels()
        lengths = (len(ds.keys()), len(ds.splits()), len(offsets) - 1)
        paths_bytes = len(ds.array("paths"))
    except Exception as exc:  # a dangling pointer or missing array is what verify must report
        result.problems.append(f"{where}: {exc}")
        return
    if lengths != (n, n, n):
        result.problems.append(f"{where}: record arrays disagree in length")
        return
    if (np.diff(offsets) < 0).any() or offsets[-1] != paths_bytes:
        result.problems.append(f"{where}: path offsets are inconsistent")
    if n and (labels.min() < 0 or labels.max() >= len(ds.classnames)):
        result.problems.append(f"{where}: labels outside the class list")
    image_keys = ds.keys()  # (R, 32)
    orphans = sum(not any(k.tobytes() in h for h in have) for k in image_keys)
    if orphans:
        result.problems.append(f"{where}: {orphans} records name images no extractor has")
    for seed in ds.attrs["seeds"]:
        key = f"fewshot_k{ds.attrs['shots']}_seed{seed}"
        try:
            rows = ds.fewshot(int(ds.attrs["shots"]), int(seed))
        except Exception:
            result.problems.append(f"{where}: few-shot subset {key} missing")
            continue
        if rows.size and (rows.min() < 0 or rows.max() >= n):
            result.problems.append(f"{where}/{key}: rows out of range")
        val = ds.fewshot_val(int(ds.attrs["shots"]), int(seed))
        if val is not None and val.size and (val.min() < 0 or val.max() >= n):
            result.problems.append(f"{where}/{key}: val rows out of range")
    result.count("records", n)
