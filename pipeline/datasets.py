"""Dataset readers (CoOp split JSON, image folders), the seeded few-shot sampler and base/new split.

A dataset here is only names and labels: which image path has which label in which split. It never
holds features, so relabelling or renaming never invalidates anything in the store.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageRootError, ShipyardError, UsageError
from .locations import first_line
from .manifest import DatasetFormat, DatasetSpec
from .remote_paths import RemotePath

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class Split(IntEnum):
    TRAIN = 0
    VAL = 1
    TEST = 2


# What a format reader returns: class names by label, and (path, label, split) entries.
_Entries = tuple[list[str], list[tuple[str, int, "Split"]]]


class DatasetError(UsageError):
    """A split file or image folder cannot be read as the manifest says. Nothing was written."""


@dataclass(frozen=True)
class Record:
    path: str  # relative to the dataset root, '/'-separated
    label: int
    split: Split


@dataclass(frozen=True)
class Failure:
    path: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"path": self.path, "reason": self.reason}


@dataclass(frozen=True)
class DatasetRecords:
    name: str
    root: Path | RemotePath
    classnames: tuple[str, ...]
    records: tuple[Record, ...]  # entries whose path is safe; files may still be unreadable
    rejected: tuple[Failure, ...]  # entries refused before any file was opened

    def file(self, record: Record) -> Path | RemotePath:
        return self.root / record.path


def read_dataset(spec: DatasetSpec, classes_of: tuple[str, ...] | None = None) -> DatasetRecords:
    """Read a dataset as the manifest describes it. Unsafe paths are rejected, not fatal.

    `classes_of` (a synthetic-domain dataset): the paired real dataset's class names; each entry's
    class is matched to them by name and relabelled, every entry is a training image."""
    readers: dict[DatasetFormat, Callable[[DatasetSpec], _Entries]] = {
        DatasetFormat.COOP: _read_coop,
        DatasetFormat.IMAGEFOLDER: _read_imagefolder,
    }
    root = spec.images
    with remote_errors(spec.name, root):
        if not root.is_dir():
            if isinstance(root, RemotePath):
                raise ImageRootError(f"dataset {spec.name}: image root {root} is not a folder on "
                                     "the object store (no object under that prefix)")
            raise DatasetError(f"dataset {spec.name}: image root {root} is not a folder")
        classnames, entries = readers[spec.format](spec)
    if classes_of is not None:
        classnames, entries = _paired(spec, classnames, entries, classes_of)
    elif len(classnames) < 2:
        raise DatasetError(f"dataset {spec.name}: {len(classnames)} class; base-to-new needs at "
                           "least two (one base, one new)")
    records, rejected = [], []
    for path, label, split in entries:
        problem = unsafe_path_reason(path)
        if problem:
            rejected.append(Failure(path, problem))
        else:
            records.append(Record(Path(path).as_posix(), label, split))
    return DatasetRecords(spec.name, root, tuple(classnames), tuple(records), tuple(rejected))


@contextmanager
def remote_errors(dataset: str, root: Path | RemotePath) -> Iterator[None]:
    """An object store that cannot be reached or read while listing is one line (exit 1)."""
    if not isinstance(root, RemotePath):
        yield
        return
    try:
        yield
    except ShipyardError:
        raise
    except Exception as exc:  # botocore, aiohttp, fsspec: their own types, one line here
        raise ImageRootError(f"dataset {dataset}: cannot list image root {root}: "
                             f"{first_line(exc)}") from None


def _paired(spec: DatasetSpec, names: list[str], entries: list[tuple[str, int, Split]],
            real: tuple[str, ...]) -> _Entries:
    """A synthetic dataset's entries relabelled to the real dataset's classes, all for training."""
    index = {name: i for i, name in enumerate(real)}
    for name in names:
        if name not in index:
            raise DatasetError(f"dataset {spec.name}: class {name!r} is not a class of "
                               f"{spec.pairs_with} (its classes: {', '.join(real[:6])}"
                               f"{', ...' if len(real) > 6 else ''})")
    return list(real), [(path, index[names[label]], Split.TRAIN) for path, label, _ in entries]


def unsafe_path_reason(path: str) -> str | None:
    """Why a split entry may not be opened, or None. Checked lexically so symlinked roots work."""
    if not path or "\x00" in path:
        return "empty or invalid path"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # a file name in another encoding, read through os.fsdecode
        return "file name is not valid UTF-8 (rename the file)"
    if os.path.isabs(path) or Path(path).drive:
        return "absolute path; entries must be relative to the image root"
    normal = os.path.normpath(path)
    if normal == ".." or normal.startswith(".." + os.sep) or ".." in Path(path).parts:
        return "path escapes the image root ('..')"
    return None


def _read_coop(spec: DatasetSpec) -> _Entries:
    source = spec.split_source
    assert source is not None  # the manifest guarantees it for format coop
    where = f"dataset {spec.name}: split file {source}"
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"{where}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{where}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not {"train", "test"} <= set(data):
        raise DatasetError(f"{where}: expected an object with keys train, val, test")
    names: dict[int, str] = {}
    entries: list[tuple[str, int, Split]] = []
    for split in Split:
        rows = data.get(split.name.lower(), [])
        if not isinstance(rows, list):
            raise DatasetError(f"{where}: {split.name.lower()} must be a list")
        for i, row in enumerate(rows):
            path, label, classname = _coop_row(row, f"{where}: {split.name.lower()}[{i}]")
            if names.setdefault(label, classname) != classname:
                raise DatasetError(f"{where}: {split.name.lower()}[{i}]: label {label} is named "
                                   f"{classname!r} here but {names[label]!r} elsewhere")
            entries.append((path, label, split))
    return _classnames(names, where), entries


def _coop_row(row: Any, where: str) -> tuple[str, int, str]:
    ok = (isinstance(row, list) and len(row) == 3 and isinstance(row[0], str)
          and isinstance(row[1], int) and not isinstance(row[1], bool) and row[1] >= 0
          and isinstance(row[2], str))
    if not ok:
        raise DatasetError(f"{where}: expected [relative_path, label >= 0, classname], got {row!r}")
    return row[0], row[1], row[2]


def _classnames(names: dict[int, str], where: str) -> list[str]:
    if not names:
        raise DatasetError(f"{where}: no images listed")
    missing = sorted(set(range(max(names) + 1)) - set(names))
    if missing:
        raise DatasetError(f"{where}: labels must be 0..{max(names)} without gaps; "
                           f"missing {missing[:5]}")
    out = [names[i].replace("_", " ") for i in range(len(names))]
    seen: dict[str, int] = {}
    for label, name in enumerate(out):
        if name in seen:
            raise DatasetError(f"{where}: labels {seen[name]} and {label} are both named {name!r} "
                               "('_' reads as a space); class names must differ")
        seen[name] = label
    return out


def _read_imagefolder(spec: DatasetSpec) -> _Entries:
    root = spec.images
    where = f"dataset {spec.name}: image folder {root}"
    present = [s.name.lower() for s in Split if (root / s.name.lower()).is_dir()]
    if present:  # split folders, not classes named "train" and "val"
        if "train" not in present or "test" not in present:
            missing = " and ".join(n for n in ("train", "test") if n not in present)
            raise DatasetError(f"{where}: has {'/, '.join(present)}/ but no {missing}/ (add it, or "
                               "put the class folders at the top for a seeded split by `split`)")
        return _read_split_folders(root, where)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{where}: no class folders")
    rng = np.random.default_rng(spec.split.seed)
    entries: list[tuple[str, int, Split]] = []
    for label, cls in enumerate(classes):
        files = _images_in(root / cls, f"{cls}")
        order = rng.permutation(len(files))
        n_test = round(len(files) * spec.split.test)
        n_val = round(len(files) * spec.split.val)
        for rank, j in enumerate(order):
            split = Split.TEST if rank < n_test else Split.VAL if rank < n_test + n_val else Split.TRAIN
            entries.append((files[j], label, split))
    return _classnames(dict(enumerate(classes)), where), entries


def _read_split_folders(root: Path | RemotePath, where: str) -> _Entries:
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise DatasetError(f"{where}: train/ has no class folders")
    entries: list[tuple[str, int, Split]] = []
    for split in Split:
        folder = root / split.name.lower()
        if not folder.is_dir():
            continue
        for cls in sorted(p.name for p in folder.iterdir() if p.is_dir()):
            if cls not in classes:
                raise DatasetError(f"{where}: {split.name.lower()}/{cls} is not a class in train/")
            files = _images_in(folder / cls, f"{folder.name}/{cls}")
            entries.extend((f, classes.index(cls), split) for f in files)
    return _classnames(dict(enumerate(classes)), where), entries


def _images_in(folder: Path | RemotePath, prefix: str) -> list[str]:
    """Image files under a class folder, in its subfolders too, as sorted `prefix/...` paths.
    Links are not followed into other folders (a class is what lies under its own folder)."""
    if isinstance(folder, RemotePath):
        return sorted(f"{prefix}/{p}" for p in folder.files()
                      if Path(p).suffix.lower() in IMAGE_SUFFIXES)
    out = []
    for parent, dirs, files in os.walk(folder):
        dirs.sort()
        rel = Path(parent).relative_to(folder)
        out += [(rel / name).as_posix() for name in files
                if Path(name).suffix.lower() in IMAGE_SUFFIXES and (Path(parent) / name).is_file()]
    return sorted(f"{prefix}/{p}" for p in out)


def few_shot(labels: np.ndarray, splits: np.ndarray, shots: int, seed: int,
             keys: np.ndarray | None = None) -> np.ndarray:
    """Row indices of a K-shot training subset: K per class, drawn with a seeded RNG.

    Sampling is without replacement, with replacement only for a class with fewer than K training
    images. With `keys` (R, 32), rows are distinct images: one image listed under two paths is one
    candidate (its first row). Classes are visited in label order and rows in the given order, so
    equal inputs give the same subset on every machine.
    """
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    train = splits == Split.TRAIN
    for label in np.unique(labels[train]):
        rows = np.flatnonzero(train & (labels == label))
        if keys is not None:
            _, first = np.unique(keys[rows], axis=0, return_index=True)
            rows = rows[np.sort(first)]
        chosen.append(rng.choice(rows, size=shots, replace=len(rows) < shots))
    return np.concatenate(chosen) if chosen else np.zeros(0, dtype=np.int64)


def dassl_few_shot(labels: np.ndarray, splits: np.ndarray, shots: int, seed: int,
                   keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, val rows) of a K-shot subset drawn as Dassl's `generate_fewshot_dataset` draws
    it in CoOp's datasets: Python's `random` seeded with the run seed; the train records grouped by
    label in order of first appearance; per label `random.sample(items, K)`, or every item in its
    order when a label has fewer than K; then, from the same RNG, val at min(K, 4) per label.
    Rows are in the order the sampler outputs them. With `keys` (R, 32), a later row of an image
    already listed in the same split is not a candidate (none is in the public splits)."""
    rng = random.Random(seed)
    out = []
    for split, k in ((Split.TRAIN, shots), (Split.VAL, min(shots, 4))):
        rows = np.flatnonzero(splits == split)
        if keys is not None and rows.size:
            _, first = np.unique(keys[rows], axis=0, return_index=True)
            rows = rows[np.sort(first)]
        groups: dict[int, list[int]] = {}
        for row in rows.tolist():
            groups.setdefault(int(labels[row]), []).append(row)
        picked: list[int] = []
        for items in groups.values():
            picked.extend(rng.sample(items, k) if len(items) >= k else items)
        out.append(np.array(picked, dtype=np.int64))
    return out[0], out[1]


def protocol_warnings(base: Sequence[int], new: Sequence[int], val_images: int,
                      tunes_on_val: bool, init: tuple[float, float] = (1.0, 1.0)) -> list[str]:
    """What makes a dataset's numbers mean less than they seem: a side with one class (its
    restricted accuracy is 100 by construction), or no val split for heads that tune on it."""
    out = [f"the {side} side has a single class, so its accuracy is 100 by construction"
           for side, labels in (("base", base), ("new", new)) if len(labels) == 1]
    if tunes_on_val and val_images == 0:
        out.append("there is no val split, so Tip-Adapter's alpha and beta were not searched "
                   f"(the initial alpha {init[0]:g}, beta {init[1]:g})")
    return out


def base_new_split(num_classes: int) -> tuple[list[int], list[int]]:
    """Base-to-new protocol: labels [0, ceil(n/2)) are base, the rest new."""
    m = math.ceil(num_classes / 2)
    return list(range(m)), list(range(m, num_classes))


def class_counts(labels: Sequence[int], num_classes: int) -> list[int]:
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()
