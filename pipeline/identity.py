"""A model's identity without the model: the weights digest, preprocessing and widths that name an
extractor, cached against the checkpoint's identity so that planning (`status`, `run --dry-run`)
never builds the CLIP model once it has been built here before.

The cache key is what determines the weights: for a local checkpoint its path, size and mtime;
for an open_clip tag the name and tag; for random weights the name, init seed and the model
config. Library versions (open_clip, torch) are part of every key. Deleting the cache is safe.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import asdict, dataclass
from functools import cache
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from .fingerprint import fingerprint
from .manifest import AugmentSpec, ExtractionSpec, ModelSpec

EXTRACTOR_VERSION = 2  # bump when the meaning of stored features changes (2: norms stored)


@cache
def _versions() -> tuple[tuple[str, str], ...]:
    return (("open_clip", metadata.version("open_clip_torch")),
            ("torch", metadata.version("torch").split("+")[0]))


def library_versions() -> dict[str, str]:
    """The libraries whose versions are part of an extractor (read without importing them, once
    per process: each read parses the packages' metadata files)."""
    return dict(_versions())


@dataclass(frozen=True)
class Preprocess:
    """What turns image bytes into the model's input; all of it goes into the fingerprint."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # 'bicubic' (CLIP) or 'bilinear'
    resize_mode: str  # 'shortest': resize short side then center crop

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "mean": list(self.mean), "std": list(self.std),
                "interpolation": self.interpolation, "resize_mode": self.resize_mode}


@dataclass(frozen=True)
class ModelIdentity:
    name: str
    weights_sha256: str
    precision: str
    preprocess: Preprocess
    embed_dim: int  # D
    text_width: int  # W

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelIdentity:
        p = d["preprocess"]
        pre = Preprocess(int(p["size"]), tuple(p["mean"]), tuple(p["std"]), str(p["interpolation"]),
                         str(p["resize_mode"]))
        return cls(d["name"], d["weights_sha256"], d["precision"], pre, int(d["embed_dim"]),
                   int(d["text_width"]))


def recipe(pre: Preprocess, views: int, aug: AugmentSpec, seed: int) -> dict[str, Any]:
    """The preprocessing + augmentation part of an extractor fingerprint."""
    return {
        "clean": pre.to_dict(),
        "views": {"count": views, "scale": list(aug.scale), "ratio": list(aug.ratio),
                  "flip": aug.flip, "seed": seed, "crop": "random_resized_crop/v1"},
    }


def view_recipe(spec: ExtractionSpec, name: str) -> dict[str, Any]:
    """A named view recipe of extraction.recipes: what its view table holds, under the
    extractor's clean preprocessing and model (its key names the table)."""
    aug = spec.recipes[name]
    return {"kind": "shipyard.views", "count": spec.views, "scale": list(aug.scale),
            "ratio": list(aug.ratio), "flip": aug.flip, "seed": spec.seed,
            "crop": "random_resized_crop/v1"}


def view_recipe_key(spec: ExtractionSpec, name: str) -> str:
    """The key of a view recipe, or "primary" for the extractor's own views."""
    return "primary" if name == "primary" else fingerprint(view_recipe(spec, name))


def extractor_description(identity: ModelIdentity, spec: ExtractionSpec) -> dict[str, Any]:
    """Everything that determines an extractor's features; its sha256 names the group."""
    return {
        "kind": "shipyard.extractor",
        "version": EXTRACTOR_VERSION,
        "model": {"name": identity.name, "weights_sha256": identity.weights_sha256,
                  "precision": identity.precision},
        "preprocess": recipe(identity.preprocess, spec.views, spec.augment, spec.seed),
        "head": "encode_image: unit vectors + norms",
        "stored_dtype": "float16",
        "libraries": library_versions(),
    }


def extractor_fp(identity: ModelIdentity, spec: ExtractionSpec) -> str:
    return fingerprint(extractor_description(identity, spec))


def shipped_configs() -> dict[str, Path]:
    """Model configs that ship inside the package, by name."""
    folder = resources.files(__package__).joinpath("model_configs")
    return {Path(f.name).stem: Path(str(f)) for f in folder.iterdir() if f.name.endswith(".json")}


def source_key(spec: ModelSpec) -> str:
    """What determines the weights of `spec`, as a key of the identity cache."""
    source: dict[str, Any] = {"name": spec.name, "precision": spec.precision.value,
                              **library_versions()}
    shipped = shipped_configs()
    if spec.name in shipped:
        source["config"] = json.loads(shipped[spec.name].read_text("utf-8"))
    if spec.pretrained is None:
        source["init_seed"] = spec.init_seed
    elif Path(spec.pretrained).is_file():
        st = os.stat(spec.pretrained)
        source["file"] = {"path": str(Path(spec.pretrained).resolve()), "size": st.st_size,
                          "mtime_ns": st.st_mtime_ns}
    else:
        source["tag"] = spec.pretrained
    return fingerprint(source)


class IdentityCache:
    """sqlite table source key -> identity JSON, beside the stat cache."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "models.sqlite"

    def _db(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30)
        db.execute("CREATE TABLE IF NOT EXISTS identity (source TEXT PRIMARY KEY, value TEXT)")
        return db

    def get(self, spec: ModelSpec) -> ModelIdentity | None:
        db = self._db()
        try:
            row = db.execute("SELECT value FROM identity WHERE source = ?",
                             (source_key(spec),)).fetchone()
        finally:
            db.close()
        return ModelIdentity.from_dict(json.loads(row[0])) if row else None

    def put(self, spec: ModelSpec, identity: ModelIdentity) -> None:
        db = self._db()
        try:
            with db:
                db.execute("INSERT OR REPLACE INTO identity VALUES (?, ?)",
                           (source_key(spec), json.dumps(identity.to_dict())))
        finally:
            db.close()


def checkpoint_description(pretrained: str | None) -> str | None:
    """The `description` a safetensors checkpoint carries in its header metadata, if any (read
    without loading the weights): what the model is, shown beside the figures it produced."""
    if not pretrained or not pretrained.endswith(".safetensors") or not Path(pretrained).is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(pretrained, "np") as f:
            meta = f.metadata() or {}
    except Exception:  # a damaged header: loading the model reports it, this only adds a note
        return None
    description = meta.get("description")
    return str(description) if description else None


def model_notes(spec: ModelSpec) -> list[str]:
    """Caveats every result of this model carries: random weights say nothing about CLIP; a
    checkpoint that describes itself says what it is."""
    if not spec.pretrained:
        return [f"model {spec.name} has random weights (no pretrained checkpoint): these numbers "
                "exercise the pipeline and say nothing about CLIP"]
    description = checkpoint_description(spec.pretrained)
    return [f"model: {description}"] if description else []
