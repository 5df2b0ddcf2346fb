"""What an extractor group and a dataset's record versions hold, read (and text sets written)
through the artefact mechanism."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import zarr

from .artifacts import TEXT_SET, Ref, artifact_key, begin, commit, lookup
from .errors import ExtractorMismatchError, StoreError
from .rows import LayeredRows, RowTable
from .zarr_nodes import attrs_of, child_array, child_group, read_sealed, require_unit_rows, write_sealed


def class_key(name: str) -> bytes:
    """Row key of a class in a synthetic set: sha256 of its name."""
    return hashlib.sha256(name.encode("utf-8")).digest()


def text_key(extractor: str, template: str, classnames: tuple[str, ...]) -> str:
    """Key of the text features of `template.format(c)` for every class name, by one extractor."""
    return artifact_key(TEXT_SET, {"template": template, "classnames": list(classnames)},
                        {"extractor": extractor})


@dataclass(frozen=True)
class TextFeatures:
    template: str
    classnames: tuple[str, ...]
    features: np.ndarray  # (C, D) float16, L2-normalized per template
    key: str


class Extractor:
    """One extractor group: every feature computed with one model + preprocessing recipe."""

    def __init__(self, root: zarr.Group, group: zarr.Group, read_only: bool) -> None:
        self.root = root
        self.group = group
        self.read_only = read_only

    @property
    def fp(self) -> str:
        return str(attrs_of(self.group)["fp"])

    @property
    def fingerprint(self) -> dict[str, Any]:
        return dict(attrs_of(self.group)["fingerprint"])

    @property
    def dim(self) -> int:
        return int(attrs_of(self.group)["dim"])

    @property
    def views(self) -> int:
        return int(attrs_of(self.group)["views"])

    @cached_property
    def images(self) -> RowTable:
        return RowTable(child_group(self.group, "images"), self.read_only)

    @cached_property
    def view_table(self) -> RowTable:
        if self.views == 0:
            raise _no_views(self.fp)
        return RowTable(child_group(self.group, "views"), self.read_only)

    def views_of(self, recipe: str) -> RowTable | None:
        """The view table of a recipe key (`identity.view_recipe_key`): the primary views, or a
        named recipe's table; None while that recipe has no table yet."""
        if recipe == "primary":
            return self.view_table
        name = view_table_name(recipe)
        if self.views == 0 or name not in self.group:
            return None
        group = child_group(self.group, name)
        if not attrs_of(group).get("complete_layout"):
            return None  # its creation was interrupted: the next writer rebuilds it
        return RowTable(group, self.read_only)

    def has_texts(self, template: str, classnames: tuple[str, ...]) -> bool:
        """Whether the text set is committed (its features are not read)."""
        return lookup(self.root, Ref.text_set(self.fp, text_key(self.fp, template, classnames))) \
            is not None

    def texts(self, template: str, classnames: tuple[str, ...]) -> TextFeatures | None:
        key = text_key(self.fp, template, classnames)
        group = lookup(self.root, Ref.text_set(self.fp, key))
        if group is None:
            return None
        features = require_unit_rows(read_sealed(child_array(group, "features")),
                                     f"text set {key[:12]}")
        if features.shape[0] != len(classnames):
            raise StoreError(f"text set {key[:12]}: {features.shape[0]} rows for "
                             f"{len(classnames)} classes; run `shipyard store verify`")
        return TextFeatures(template, classnames, features, key)

    def text_groups(self) -> list[str]:
        return sorted(child_group(self.group, "texts").group_keys())

    def write_texts(self, template: str, classnames: tuple[str, ...], features: np.ndarray) -> str:
        key = text_key(self.fp, template, classnames)
        record = {"job": None, "kind": TEXT_SET.name, "key": key,
                  "params": {"template": template, "classnames": list(classnames)},
                  "inputs": {"extractor": self.fp}}
        draft = begin(self.root, Ref.text_set(self.fp, key), record, self.read_only)
        write_sealed(draft.group, "features", features.astype(np.float16),
                     chunks=(max(1, len(features)), features.shape[1]))
        commit(self.root, draft, {})
        return key


class LayeredExtractor(Extractor):
    """One extractor read across a store's layers (working store first, then its upstreams):
    features, views and text sets are found in whichever layer holds them; everything written
    goes to the working store's part, which exists once `create_extractor` made it."""

    def __init__(self, parts: list[Extractor], writable: Extractor | None) -> None:
        super().__init__((writable or parts[0]).root, (writable or parts[0]).group,
                         read_only=writable is None)
        self.parts = parts
        self.writable = writable

    @cached_property
    def images(self) -> RowTable:
        own = self.writable.images if self.writable else None
        return LayeredRows([p.images for p in self.parts], own)

    @cached_property
    def view_table(self) -> RowTable:
        found = self.views_of("primary")
        assert found is not None  # views_of("primary") raises rather than return None
        return found

    def views_of(self, recipe: str) -> RowTable | None:
        if self.views == 0:
            if recipe == "primary":
                raise _no_views(self.fp)
            return None
        tables = [(p, t) for p in self.parts if (t := p.views_of(recipe)) is not None]
        if not tables:
            return None
        own = next((t for p, t in tables if p is self.writable), None)
        return LayeredRows([t for _, t in tables], own)

    def has_texts(self, template: str, classnames: tuple[str, ...]) -> bool:
        return any(p.has_texts(template, classnames) for p in self.parts)

    def texts(self, template: str, classnames: tuple[str, ...]) -> TextFeatures | None:
        for part in self.parts:
            found = part.texts(template, classnames)
            if found is not None:
                return found
        return None

    def text_groups(self) -> list[str]:
        return sorted({g for p in self.parts for g in p.text_groups()})

    def write_texts(self, template: str, classnames: tuple[str, ...], features: np.ndarray) -> str:
        if self.writable is None:
            raise StoreError(f"extractor {self.fp[:12]}: only upstream stores hold it, and they "
                             "are read-only")
        return self.writable.write_texts(template, classnames, features)


class StoredDataset:
    """One version of a dataset's records: path -> image key, label, split; few-shot subsets."""

    def __init__(self, group: zarr.Group, version: str) -> None:
        self.group = group
        self.version = version
        self.attrs = attrs_of(group)
        self._arrays: dict[str, np.ndarray] = {}

    def __len__(self) -> int:
        return int(self.array("labels").shape[0])

    def array(self, name: str) -> np.ndarray:
        """A records array, read and checked once per object (versions never change)."""
        if name not in self._arrays:
            self._arrays[name] = read_sealed(child_array(self.group, name))
        return self._arrays[name]

    @property
    def classnames(self) -> tuple[str, ...]:
        return tuple(self.attrs["classnames"])

    @property
    def base_labels(self) -> list[int]:
        return list(self.attrs["base_labels"])

    @property
    def new_labels(self) -> list[int]:
        return list(self.attrs["new_labels"])

    @property
    def failures(self) -> list[dict[str, str]]:
        return list(self.attrs.get("failures", []))

    def keys(self) -> np.ndarray:
        return self.array("keys")  # (R, 32) uint8

    def labels(self) -> np.ndarray:
        return self.array("labels")

    def splits(self) -> np.ndarray:
        return self.array("splits")

    def paths(self) -> list[str]:
        blob, offsets = self.array("paths").tobytes(), self.array("path_offsets")
        return [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(len(offsets) - 1)]

    def fewshot(self, shots: int, seed: int) -> np.ndarray:
        name = fewshot_name(shots, seed)
        if name not in self.group:
            raise StoreError(f"dataset {self.attrs['name']}: no {shots}-shot subset for seed {seed} "
                             f"(stored: shots {self.attrs['shots']}, seeds {self.attrs['seeds']}; "
                             "run `shipyard extract`)")
        return self.array(name)


    def fewshot_val(self, shots: int, seed: int) -> np.ndarray | None:
        """Rows of the seed's few-shot val subset (sampler dassl), None when the sampler keeps the
        whole val split (numpy)."""
        name = fewshot_val_name(shots, seed)
        return self.array(name) if name in self.group else None


def _no_views(fp: str) -> ExtractorMismatchError:
    return ExtractorMismatchError(f"extractor {fp[:12]} was built without augmented views "
                                  "(extraction.views: 0)")


def view_table_name(recipe: str) -> str:
    """The group of a named recipe's views inside its extractor."""
    return f"views_{recipe[:16]}"


def fewshot_name(shots: int, seed: int) -> str:
    return f"fewshot_k{shots}_seed{seed}"


def fewshot_val_name(shots: int, seed: int) -> str:
    return f"fewshot_val_k{shots}_seed{seed}"
