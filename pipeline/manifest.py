"""The manifest's typed, frozen models: what to extract, from which images, with which model, and
what to train on it. Every default lives here; names come from the registries and presets.
Reading a manifest file (YAML, one-line errors, the JSON Schema) is `manifest_files.py`.
"""

from __future__ import annotations

import json
import string
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from . import registry
from .configs import HeadConfig
from .errors import ManifestError
from .locations import is_url
from .remote_paths import RemotePath, image_root


class Device(StrEnum):
    AUTO = "auto"  # CUDA when available, else the CPU
    CPU = "cpu"
    CUDA = "cuda"


class DatasetFormat(StrEnum):
    COOP = "coop"  # CoOp split JSON: {"train": [[path, label, classname], ...], "val", "test"}
    IMAGEFOLDER = "imagefolder"  # one folder per class, optional train/val/test subfolders


class Precision(StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"


class ViewsFor(StrEnum):
    FEWSHOT = "fewshot"  # augmented views only for the K-shot subsets of the listed seeds
    TRAIN = "train"  # augmented views for every training image


class Domain(StrEnum):
    REAL = "real"
    SYNTHETIC = "synthetic"  # generated images of a real dataset's classes (SYNC-CLIP's domain)


class Sampler(StrEnum):
    DASSL = "dassl"  # Dassl's generate_fewshot_dataset: Python random, K train + min(K, 4) val
    NUMPY = "numpy"  # numpy Generator, with replacement when short; val is the whole val split


class Protocol(StrEnum):
    CLEAN = "clean"  # last epoch (or val); seeds averaged
    PAPER = "paper"  # best epoch chosen on the test set, as the public SHIP / Tip-Adapter code do


class Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


Count = Annotated[int, Field(ge=1, strict=True)]
Index = Annotated[int, Field(ge=0, strict=True)]
Name = Annotated[str, Field(min_length=1, pattern=r"\S")]
# A field written as one string or a list of them (read as a list).
OneOrMany = WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "minItems": 1,
                                                           "items": {"type": "string"}}]})


TipScale = tuple[Annotated[float, Field(ge=0.1, le=1000)], Annotated[float, Field(ge=0.1, le=1000)]]


class ModelSpec(Spec):
    name: Name = Field(description="open_clip model name (ViT-B-16, ...) or a config shipped "
                                   "with shipyard (shipyard-tiny)")
    pretrained: str | None = Field(None, description="open_clip tag (openai) or a local checkpoint "
                                                     "path; null: random weights")
    precision: Precision = Precision.FP32
    init_seed: Index = Field(0, description="seeds random initialisation without pretrained weights")

    @field_validator("pretrained")
    @classmethod
    def _local_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is None or not value.strip():
            return None
        local = _base(info) / value
        # A tag is a bare word; anything that exists on disk (or looks like a path) is a file.
        if local.exists() or "/" in value or value.endswith((".pt", ".bin", ".safetensors")):
            return str(local.resolve())
        return value


def _ordered(pair: tuple[float, float]) -> tuple[float, float]:
    if pair[0] > pair[1]:
        raise ValueError(f"expected [low, high] with low <= high, got {list(pair)}")
    return pair


class AugmentSpec(Spec):
    scale: tuple[Annotated[float, Field(ge=0, le=1)], Annotated[float, Field(ge=0, le=1)]] = \
        Field((0.5, 1.0), description="RandomResizedCrop area range (SHIP / Tip-Adapter)")
    ratio: tuple[Annotated[float, Field(ge=0.01, le=100)], Annotated[float, Field(ge=0.01, le=100)]] \
        = (3 / 4, 4 / 3)
    flip: bool = True

    _scale = field_validator("scale", "ratio")(lambda cls, v: _ordered(v))


class ExtractionSpec(Spec):
    views: Index = Field(10, description="augmented views V per training image (Tip-Adapter: 10)")
    views_for: ViewsFor = ViewsFor.FEWSHOT
    augment: AugmentSpec = AugmentSpec()
    recipes: dict[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")], AugmentSpec] = Field(
        default_factory=dict, description=(
            "further view recipes by name, stored beside the primary views (same count and "
            "seed), e.g. dassl: {scale: [0.08, 1]} for the heads that train on Dassl's crops"))
    seed: Index = Field(0, description="with (image key, view index) seeds every augmented view")
    batch_size: Count = 64
    workers: Count = Field(2, description="decode threads")
    chunk_rows: Count = Field(1024, description="rows per Zarr chunk of new extractor groups")
    max_pixels: Count = Field(178_956_970, description=(
        "larger images are reported as failures, not decoded (a small file can decode to GBs)"))


class ImageFolderSplit(Spec):
    """Fractions per class, used only when an image folder has no train/ val/ test/ folders."""

    val: Annotated[float, Field(ge=0, le=0.9)] = 0.1
    test: Annotated[float, Field(ge=0, le=0.9)] = 0.5
    seed: Index = 0

    @model_validator(mode="after")
    def _leaves_train(self) -> ImageFolderSplit:
        if self.val + self.test >= 1.0:
            raise ValueError("val + test must leave some images for train")
        return self


class DatasetSpec(Spec):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]
    format: DatasetFormat
    root: Path | str = Field(description=(
        "image root, a local folder or an fsspec URL (s3://bucket/images); every image path must "
        "resolve under it"))
    root_options: dict[str, Any] = Field(default_factory=dict, description=(
        "fsspec storage options of a URL root and split file (endpoint, credentials)"))
    split_file: Path | str | None = Field(None, description=(
        "CoOp split JSON (format coop only), a local file or an fsspec URL"))
    split: ImageFolderSplit = ImageFolderSplit()
    templates: Annotated[tuple[str, ...], OneOrMany] = Field(
        ("a photo of a {}.",), min_length=1,
        description="a template with one {}, a list of them (an ensemble), or preset:<Name>")
    shots: Count = 16
    seeds: tuple[Index, ...] = Field((1, 2, 3), min_length=1)
    sampler: Sampler = Field(Sampler.DASSL, description=(
        "dassl: CoOp's few-shot subsets seed for seed (K per class, val min(K, 4) per class); "
        "numpy: shipyard's earlier sampler (with replacement when short, the whole val split)"))
    base_new: Literal["half"] = Field("half", description="labels [0, ceil(n/2)) base, rest new")
    domain: Domain = Field(Domain.REAL, description=(
        "synthetic: generated images of the classes of the real dataset `pairs_with` names "
        "(matched by class name); extracted into the same image table, never trained or "
        "evaluated on by itself"))
    pairs_with: str | None = Field(None, description="the real dataset a synthetic one pairs with")
    transfer_from: str | None = Field(None, description=(
        "cross-dataset transfer: evaluate the heads trained on that dataset of the manifest on "
        "this one's class names and test images (heads that transfer only); nothing trains here"))
    preset: str = Field("auto", description=(
        "a benchmark dataset's settings (presets/datasets.json): auto (by the dataset's name), "
        "a preset name, or none"))
    tip_scale: TipScale | None = Field(None, description="[S_beta, S_alpha] for this dataset")
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-method training settings for this dataset")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        """Resolve `preset` to a preset's name (or none) and take its templates when the
        manifest names none."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        wanted = data.get("preset", "auto")
        if not isinstance(wanted, str):
            return data  # the field's own validation says what is wrong
        presets = registry.dataset_presets()
        if wanted == "auto":
            found = registry.find_preset(str(data.get("name", "")))
            data["preset"] = found or "none"
        elif wanted != "none":
            found = registry.find_preset(wanted)
            if found is None:
                known = [p for p in presets if p != registry.DEFAULT_PRESET]
                raise ValueError(f"preset: unknown dataset preset {wanted!r} (known: "
                                 f"{', '.join(known)}, or none)")
            data["preset"] = found
        preset = presets.get(data["preset"])
        if preset and preset.templates and "templates" not in data:
            data["templates"] = "preset:" + preset.templates
        return data

    @field_validator("overrides")
    @classmethod
    def _known_overrides(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return check_overrides(value)

    @field_validator("root", "split_file", mode="before")
    @classmethod
    def _resolve(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None or (isinstance(value, str) and is_url(value)):
            return value  # a URL stays as written
        if not isinstance(value, str | Path):
            return value  # the field's own validation says what is wrong
        return (_base(info) / value).resolve()

    @property
    def images(self) -> Path | RemotePath:
        """The image root as the readers take it: a Path, or a RemotePath for a URL."""
        return image_root(self.root, self.root_options)

    @property
    def split_source(self) -> Path | RemotePath | None:
        return None if self.split_file is None else image_root(self.split_file, self.root_options)

    @field_validator("templates", mode="before")
    @classmethod
    def _templates(cls, value: Any) -> Any:
        if isinstance(value, str) and value.startswith("preset:"):
            presets = template_presets()
            name = value.removeprefix("preset:")
            if name not in presets:
                raise ValueError(f"unknown template preset {name!r} "
                                 f"(known: {', '.join(sorted(presets))})")
            return presets[name]
        return [value] if isinstance(value, str) else value

    @field_validator("templates")
    @classmethod
    def _one_placeholder(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for i, template in enumerate(value):
            check_template(template, f"[{i}]")
        return value

    @model_validator(mode="after")
    def _split_file_for_coop(self) -> DatasetSpec:
        if self.format is DatasetFormat.COOP and self.split_file is None:
            raise ValueError("split_file: missing required field (format coop reads one)")
        if self.format is not DatasetFormat.COOP and self.split_file is not None:
            raise ValueError("split_file: only format coop reads a split file")
        return self


def check_template(template: str, where: str = "") -> None:
    """A template has exactly one `{}` and no other replacement field (`{x}`, `{0}`)."""
    try:
        fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(template)
                  if f is not None]
    except ValueError as exc:
        raise ValueError(f"{where} {template!r}: {exc}".strip()) from None
    if fields != [("", "", None)]:
        raise ValueError(f"{where} expected a string with one '{{}}' and no other replacement "
                         f"field, got {template!r}".strip())


class SynthesizeSpec(Spec):
    classes: Annotated[tuple[Name, ...], OneOrMany] = Field(
        ("new",), min_length=1, description="new | base | all, or class names")
    per_class: Count = 16
    seed: Index = Field(0, description="with the class name, seeds each class's samples")

    @field_validator("classes", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


class ShipSpec(Spec):
    variant: str | None = Field(None, description="a SHIP variant of presets/ship_variants.json; "
                                                   "null: the dataset preset's (else default)")
    epochs: Count | None = Field(None, description="null: the dataset preset's (ImageNet 10), "
                                                   "else 50")
    batch_size: Count = 256
    lr: Annotated[float, Field(ge=1e-8, le=10)] = Field(1e-3, description="AdamW")
    seed: Index = Field(0, description="initialisation, batch order, view choice, noise")
    checkpoint_every: Count = Field(1, description="epochs between resumable checkpoints")
    synthesize: SynthesizeSpec = SynthesizeSpec()

    @field_validator("variant")
    @classmethod
    def _known_variant(cls, value: str | None) -> str | None:
        return None if value is None else _known(value, list(registry.ship_variants()))


class HeadsSpec(Spec):
    methods: tuple[str, ...] = Field(
        ("zero-shot", "coop", "coop+ship", "tip-adapter", "tip-adapter-f", "tip-adapter-f+ship"),
        min_length=1, description="heads to evaluate; +ship adds SHIP's synthesized features")
    protocol: Protocol = Protocol.CLEAN
    tip_scale: TipScale | None = Field(
        None, description="[S_beta, S_alpha] of Tip-Adapter's alpha/beta grid on val, for every "
                          "dataset; null: each dataset's preset ([7, 3] without one)")
    cache_index: str = Field("flat", description="flat (exact) | ivf | hnsw (approximate top-k) | "
                                                 "classes (exact sums over T candidate classes)")
    cache_topk: Count | None = Field(None, description="neighbours of the ivf and hnsw indexes")
    cache_candidates: Count | None = Field(
        None, description="candidate classes T of the classes index; null: the smallest power of "
                          "two whose top-1 agreement with dense on val reaches cache_agreement")
    cache_agreement: float = Field(0.999, gt=0.0, le=1.0, description=(
        "top-1 agreement with dense on val that the classes index's automatic T must reach"))
    overrides: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-method training settings over the defaults")

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        known = registry.head_names()
        for i, method in enumerate(value):
            if method not in known:
                raise ValueError(f"[{i}] unknown method {method!r} (known: {', '.join(known)})")
        return value

    @field_validator("cache_index")
    @classmethod
    def _known_index(cls, value: str) -> str:
        return _known(value, list(registry.cache_indexes()))

    @field_validator("overrides")
    @classmethod
    def _known_overrides(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return check_overrides(value)


def check_overrides(value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Training settings per method: `coop` applies to coop and coop+ship, `coop+ship` to that
    variant only; each key a HeadConfig field of the right type and an allowed value."""
    fields = registry.config_fields()
    for method, settings in value.items():
        _known(method, registry.head_names())
        for key, setting in (settings or {}).items():
            want = fields.get(key)
            if want is None:
                raise ValueError(f"{method}.{key}: unknown field (allowed: "
                                 f"{', '.join(sorted(fields))})")
            ok = isinstance(setting, want) or (want is float and isinstance(setting, int))
            if not ok or (isinstance(setting, bool) and want is not bool):
                raise ValueError(f"{method}.{key}: expected {want.__name__}, got {setting!r}")
            try:
                HeadConfig(**{key: setting})
            except ValueError as exc:
                raise ValueError(f"{method}.{exc}") from None
    return value


class UpstreamSpec(Spec):
    """A read-only store read below the working store: another team's, or a published copy."""

    location: Name = Field(description="a local path or an fsspec URL")
    options: dict[str, Any] = Field(default_factory=dict, description="fsspec storage options")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"location": value} if isinstance(value, str) else value

    @field_validator("location")
    @classmethod
    def _resolve(cls, value: str, info: ValidationInfo) -> str:
        return value if is_url(value) else str((_base(info) / value).resolve())


class Manifest(Spec):
    path: Path = Field(Path("data_manifest.yaml"), exclude=True)
    store: Name = Field(description="the working store: a local path or an fsspec URL")
    store_options: dict[str, Any] = Field(default_factory=dict,
                                          description="fsspec storage options")
    upstream: tuple[UpstreamSpec, ...] = Field(
        (), description="read-only stores every lookup falls through to, in order, after the "
        "working store (a path or URL, or {location, options}); nothing is written to them")
    model: ModelSpec
    extraction: ExtractionSpec = ExtractionSpec()
    datasets: tuple[DatasetSpec, ...] = Field(min_length=1)
    ship: ShipSpec = ShipSpec()
    heads: HeadsSpec = HeadsSpec()

    @field_validator("store")
    @classmethod
    def _resolve_store(cls, value: str, info: ValidationInfo) -> str:
        return value if is_url(value) else str((_base(info) / value).resolve())

    @model_validator(mode="after")
    def _distinct_layers(self) -> Manifest:
        seen = [self.store.rstrip("/")]
        for i, up in enumerate(self.upstream):
            where = up.location.rstrip("/")
            if where in seen:
                raise ValueError(f"upstream[{i}]: {up.location} is " + (
                    "the working store itself" if where == seen[0] else "listed twice"))
            seen.append(where)
        return self

    @property
    def upstreams(self) -> list[tuple[str, dict[str, Any]]]:
        """(location, fsspec options) of each upstream store, in lookup order."""
        return [(u.location, u.options) for u in self.upstream]

    @field_validator("datasets")
    @classmethod
    def _unique_names(cls, value: tuple[DatasetSpec, ...]) -> tuple[DatasetSpec, ...]:
        names = [d.name for d in value]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"dataset name {name!r} is used more than once")
        by_name = {d.name: d for d in value}
        for i, d in enumerate(value):
            synthetic = d.domain is Domain.SYNTHETIC
            if synthetic != (d.pairs_with is not None):
                raise ValueError(f"[{i}].pairs_with: " + (
                    "a synthetic dataset names the real dataset it pairs with" if synthetic
                    else "only a dataset with domain: synthetic pairs with another"))
            if synthetic:
                real = by_name.get(d.pairs_with or "")
                if real is None or real.domain is not Domain.REAL or real.transfer_from:
                    raise ValueError(f"[{i}].pairs_with: {d.pairs_with!r} is not a real dataset "
                                     f"of the manifest that trains (it has: {', '.join(names)})")
                if d.transfer_from:
                    raise ValueError(f"[{i}].transfer_from: a synthetic dataset is not evaluated")
            source = by_name.get(d.transfer_from or "")
            if d.transfer_from is None:
                continue
            if source is None or source is d or source.domain is Domain.SYNTHETIC:
                raise ValueError(f"[{i}].transfer_from: {d.transfer_from!r} is not another "
                                 f"dataset of the manifest (it has: {', '.join(names)})")
            if source.transfer_from is not None:
                raise ValueError(f"[{i}].transfer_from: {source.name} is itself a transfer "
                                 "target; heads are trained on the source dataset")
        return value

    @model_validator(mode="after")
    def _known_view_recipes(self) -> Manifest:
        """A `views` setting names the primary recipe or one of extraction.recipes."""
        known = ["primary", *self.extraction.recipes]
        layers = [("heads.overrides", self.heads.overrides)]
        layers += [(f"datasets[{i}].overrides", d.overrides) for i, d in enumerate(self.datasets)]
        for where, overrides in layers:
            for method, settings in overrides.items():
                views = (settings or {}).get("views")
                if views is not None and views not in known:
                    raise ValueError(f"{where}.{method}.views: unknown view recipe {views!r} "
                                     f"(known: {', '.join(known)}; add it to extraction.recipes)")
        return self

    def dataset(self, name: str) -> DatasetSpec:
        for ds in self.datasets:
            if ds.name == name:
                return ds
        known = ", ".join(d.name for d in self.datasets)
        raise ManifestError(f"{self.path}: no dataset named {name!r} (manifest has: {known})")


def _base(info: ValidationInfo) -> Path:
    context = info.context or {}
    return Path(context.get("base", "."))


def _known(value: str, known: list[str]) -> str:
    if value not in known:
        raise ValueError(f"unknown value {value!r} (expected one of: {', '.join(known)})")
    return value


def template_presets() -> dict[str, list[str]]:
    """Named prompt templates (METHODS.md), shipped as data in pipeline/presets/templates.json."""
    text = resources.files(__package__).joinpath("presets/templates.json").read_text("utf-8")
    presets: dict[str, list[str]] = json.loads(text)
    return presets
