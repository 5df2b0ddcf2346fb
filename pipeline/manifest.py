"""The manifest: what to extract, from which images, with which model. Validated on load.

Every error names the file and the field (`data_manifest.yaml: datasets[0].shots: expected an
integer >= 1, got 'x'`) and is raised before anything is written.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import ManifestError
from .locations import is_url

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


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


@dataclass(frozen=True)
class ModelSpec:
    name: str  # open_clip model name, or a config shipped with shipyard (e.g. shipyard-tiny)
    pretrained: str | None = None  # open_clip tag or local checkpoint path; None = random weights
    precision: Precision = Precision.FP32
    init_seed: int = 0  # seeds random initialisation when there are no pretrained weights


@dataclass(frozen=True)
class AugmentSpec:
    scale: tuple[float, float] = (0.5, 1.0)  # RandomResizedCrop area range (SHIP / Tip-Adapter)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True


@dataclass(frozen=True)
class ExtractionSpec:
    views: int = 10  # augmented views V per training image (Tip-Adapter uses 10)
    views_for: ViewsFor = ViewsFor.FEWSHOT
    augment: AugmentSpec = field(default_factory=AugmentSpec)
    seed: int = 0  # with (image key, view index) this seeds every augmented view
    batch_size: int = 64
    workers: int = 2  # decode threads
    chunk_rows: int = 1024  # rows per Zarr chunk for new extractor groups


@dataclass(frozen=True)
class ImageFolderSplit:
    val: float = 0.1  # fractions per class, used only when the folder has no train/val/test
    test: float = 0.5
    seed: int = 0


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    format: DatasetFormat
    root: Path  # image root; every image path must resolve under it
    split_file: Path | None = None  # required for format coop
    split: ImageFolderSplit = field(default_factory=ImageFolderSplit)
    templates: tuple[str, ...] = ("a photo of a {}.",)
    shots: int = 16
    seeds: tuple[int, ...] = (1, 2, 3)
    base_new: str = "half"  # the first ceil(n/2) labels are base, the rest new


class ShipVariant(StrEnum):
    DEFAULT = "default"  # encoder hidden 2048, ReLU generator
    IMAGENET = "imagenet"  # encoder hidden 4096, LeakyReLU(0.2) generator


@dataclass(frozen=True)
class SynthesizeSpec:
    classes: tuple[str, ...] = ("new",)  # new | base | all, or class names
    per_class: int = 16
    seed: int = 0  # with the class name, seeds each class's samples


@dataclass(frozen=True)
class ShipSpec:
    variant: ShipVariant = ShipVariant.DEFAULT
    epochs: int = 50  # ImageNet: 10
    batch_size: int = 256
    lr: float = 1e-3
    seed: int = 0  # initialisation, batch order, view choice, noise
    checkpoint_every: int = 1  # epochs between resumable checkpoints
    synthesize: SynthesizeSpec = field(default_factory=SynthesizeSpec)


class Protocol(StrEnum):
    CLEAN = "clean"  # last epoch (or val); seeds averaged
    PAPER = "paper"  # best epoch chosen on the test set, as the public SHIP / Tip-Adapter code do


@dataclass(frozen=True)
class HeadsSpec:
    # Heads to evaluate; a '+ship' suffix adds the SHIP synthesized features of the new classes.
    methods: tuple[str, ...] = ("zero-shot", "coop", "coop+ship", "tip-adapter", "tip-adapter-f",
                                "tip-adapter-f+ship")
    protocol: Protocol = Protocol.CLEAN
    tip_scale: tuple[float, float] = (7.0, 3.0)  # [S_beta, S_alpha] of the alpha/beta grid on val
    cache_index: str = "flat"  # flat (exact) | ivf | hnsw (approximate, top-k)
    cache_topk: int | None = None  # neighbours for the approximate modes
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)  # method -> HeadConfig fields


@dataclass(frozen=True)
class Manifest:
    path: Path
    store: str  # local path (resolved) or fsspec URL
    model: ModelSpec
    extraction: ExtractionSpec
    datasets: tuple[DatasetSpec, ...]
    store_options: dict[str, Any] = field(default_factory=dict)  # fsspec storage options
    ship: ShipSpec = field(default_factory=ShipSpec)
    heads: HeadsSpec = field(default_factory=HeadsSpec)

    def dataset(self, name: str) -> DatasetSpec:
        for ds in self.datasets:
            if ds.name == name:
                return ds
        known = ", ".join(d.name for d in self.datasets)
        raise ManifestError(f"{self.path}: no dataset named {name!r} (manifest has: {known})")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["path"] = str(self.path)
        for ds in out["datasets"]:
            ds["root"] = str(ds["root"])
            ds["split_file"] = None if ds["split_file"] is None else str(ds["split_file"])
        return out


class _Reader:
    """Walks the parsed YAML, checking types and collecting the field path for messages."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, where: str, message: str) -> ManifestError:
        return ManifestError(f"{self.path}: {where}: {message}")

    def mapping(self, value: Any, where: str, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping, got {_kind(value)}")
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise self.fail(f"{where}.{unknown[0]}" if where else unknown[0],
                            f"unknown field (allowed: {', '.join(sorted(allowed))})")
        return value

    def required(self, data: dict[str, Any], key: str, where: str) -> Any:
        if key not in data or data[key] is None:
            raise self.fail(_join(where, key), "missing required field")
        return data[key]

    def string(self, value: Any, where: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"expected a non-empty string, got {_kind(value)}")
        return value

    def integer(self, value: Any, where: str, minimum: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(where, f"expected an integer >= {minimum}, got {value!r}")
        return value

    def number(self, value: Any, where: str, lo: float, hi: float) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
            raise self.fail(where, f"expected a number in [{lo}, {hi}], got {value!r}")
        return float(value)

    def boolean(self, value: Any, where: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(where, f"expected true or false, got {value!r}")
        return value

    def choice(self, value: Any, where: str, enum: type[StrEnum]) -> Any:
        options = [e.value for e in enum]
        if value not in options:
            raise self.fail(where, f"unknown value {value!r} (expected one of: {', '.join(options)})")
        return enum(value)

    def pair(self, value: Any, where: str, lo: float, hi: float,
             ordered: bool = True) -> tuple[float, float]:
        if not isinstance(value, list | tuple) or len(value) != 2:
            raise self.fail(where, f"expected a list of two numbers, got {value!r}")
        a = self.number(value[0], f"{where}[0]", lo, hi)
        b = self.number(value[1], f"{where}[1]", lo, hi)
        if ordered and a > b:
            raise self.fail(where, f"expected [low, high] with low <= high, got {value!r}")
        return (a, b)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


def load_manifest(path: Path | str, store_override: str | None = None) -> Manifest:
    """Read and validate a manifest; relative paths resolve against the manifest's folder."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ManifestError(f"{path}: not valid YAML ({first})") from None
    return parse_manifest(data, path, store_override)


def parse_manifest(data: Any, path: Path, store_override: str | None = None) -> Manifest:
    r = _Reader(path)
    top = r.mapping(data, "", {"store", "store_options", "model", "extraction", "datasets", "ship",
                               "heads"})
    base = path.resolve().parent
    store = store_override or r.string(r.required(top, "store", ""), "store")
    if not is_url(store):
        store = str((base / store).resolve()) if not Path(store).is_absolute() else store
    options = top.get("store_options") or {}
    if not isinstance(options, dict):
        raise r.fail("store_options", f"expected a mapping, got {_kind(options)}")
    model = _parse_model(r, r.required(top, "model", ""), base)
    extraction = _parse_extraction(r, top.get("extraction") or {})
    raw_datasets = r.required(top, "datasets", "")
    if not isinstance(raw_datasets, list) or not raw_datasets:
        raise r.fail("datasets", "expected a non-empty list of datasets")
    datasets = tuple(_parse_dataset(r, d, f"datasets[{i}]", base) for i, d in enumerate(raw_datasets))
    names = [d.name for d in datasets]
    for name in names:
        if names.count(name) > 1:
            raise r.fail("datasets", f"dataset name {name!r} is used more than once")
    ship = _parse_ship(r, top.get("ship") or {})
    heads = _parse_heads(r, top.get("heads") or {})
    return Manifest(path, store, model, extraction, datasets, dict(options), ship, heads)


def _parse_model(r: _Reader, raw: Any, base: Path) -> ModelSpec:
    m = r.mapping(raw, "model", {"name", "pretrained", "precision", "init_seed"})
    pretrained = m.get("pretrained")
    if pretrained is not None:
        pretrained = r.string(pretrained, "model.pretrained")
        local = base / pretrained
        # A tag is a bare word; anything that exists on disk (or looks like a path) is a file.
        if local.exists() or "/" in pretrained or pretrained.endswith((".pt", ".bin", ".safetensors")):
            pretrained = str(local.resolve())
    return ModelSpec(
        name=r.string(r.required(m, "name", "model"), "model.name"),
        pretrained=pretrained,
        precision=r.choice(m.get("precision", "fp32"), "model.precision", Precision),
        init_seed=r.integer(m.get("init_seed", 0), "model.init_seed", 0),
    )


def _parse_heads(r: _Reader, raw: Any) -> HeadsSpec:
    from . import registry

    allowed = {"methods", "protocol", "tip_scale", "cache_index", "cache_topk", "overrides"}
    h = r.mapping(raw, "heads", allowed)
    d = HeadsSpec()
    methods = h.get("methods", list(d.methods))
    if not isinstance(methods, list) or not methods:
        raise r.fail("heads.methods", f"expected a non-empty list of methods, got {methods!r}")
    known = registry.head_names()
    for i, m in enumerate(methods):
        if not isinstance(m, str) or m not in known:
            raise r.fail(f"heads.methods[{i}]", f"unknown method {m!r} (known: {', '.join(known)})")
    index = h.get("cache_index", d.cache_index)
    if index not in registry.cache_indexes():
        raise r.fail("heads.cache_index", f"unknown index {index!r} (expected one of "
                                          f"{', '.join(registry.cache_indexes())})")
    topk = h.get("cache_topk")
    if topk is not None:
        topk = r.integer(topk, "heads.cache_topk", 1)
    overrides = r.mapping(h.get("overrides") or {}, "heads.overrides", set(registry.heads()))
    fields = registry.config_fields()
    for method, values in overrides.items():
        r.mapping(values, f"heads.overrides.{method}", set(fields))
        for key, value in values.items():
            want = fields[key]
            ok = isinstance(value, want) or (want is float and isinstance(value, int))
            if not ok or isinstance(value, bool):
                raise r.fail(f"heads.overrides.{method}.{key}",
                             f"expected {want.__name__}, got {value!r}")
    return HeadsSpec(
        methods=tuple(methods),
        protocol=r.choice(h.get("protocol", d.protocol.value), "heads.protocol", Protocol),
        tip_scale=r.pair(h.get("tip_scale", list(d.tip_scale)), "heads.tip_scale", 0.1, 1000.0,
                         ordered=False),
        cache_index=index,
        cache_topk=topk,
        overrides={m: dict(v) for m, v in overrides.items()},
    )


def _parse_ship(r: _Reader, raw: Any) -> ShipSpec:
    allowed = {"variant", "epochs", "batch_size", "lr", "seed", "checkpoint_every", "synthesize"}
    s = r.mapping(raw, "ship", allowed)
    syn = r.mapping(s.get("synthesize") or {}, "ship.synthesize", {"classes", "per_class", "seed"})
    classes = syn.get("classes", "new")
    if isinstance(classes, str):
        classes = [classes]
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        raise r.fail("ship.synthesize.classes", f"expected new, base, all or a list of class "
                                                f"names, got {classes!r}")
    d = ShipSpec()
    return ShipSpec(
        variant=r.choice(s.get("variant", d.variant.value), "ship.variant", ShipVariant),
        epochs=r.integer(s.get("epochs", d.epochs), "ship.epochs", 1),
        batch_size=r.integer(s.get("batch_size", d.batch_size), "ship.batch_size", 1),
        lr=r.number(s.get("lr", d.lr), "ship.lr", 1e-8, 10.0),
        seed=r.integer(s.get("seed", d.seed), "ship.seed", 0),
        checkpoint_every=r.integer(s.get("checkpoint_every", 1), "ship.checkpoint_every", 1),
        synthesize=SynthesizeSpec(
            classes=tuple(classes),
            per_class=r.integer(syn.get("per_class", 16), "ship.synthesize.per_class", 1),
            seed=r.integer(syn.get("seed", 0), "ship.synthesize.seed", 0),
        ),
    )


def _parse_extraction(r: _Reader, raw: Any) -> ExtractionSpec:
    allowed = {"views", "views_for", "augment", "seed", "batch_size", "workers", "chunk_rows"}
    e = r.mapping(raw, "extraction", allowed)
    a = r.mapping(e.get("augment") or {}, "extraction.augment", {"scale", "ratio", "flip"})
    default = AugmentSpec()
    augment = AugmentSpec(
        scale=r.pair(a.get("scale", list(default.scale)), "extraction.augment.scale", 0.0, 1.0),
        ratio=r.pair(a.get("ratio", list(default.ratio)), "extraction.augment.ratio", 0.01, 100.0),
        flip=r.boolean(a.get("flip", default.flip), "extraction.augment.flip"),
    )
    d = ExtractionSpec()
    return ExtractionSpec(
        views=r.integer(e.get("views", d.views), "extraction.views", 0),
        views_for=r.choice(e.get("views_for", d.views_for.value), "extraction.views_for", ViewsFor),
        augment=augment,
        seed=r.integer(e.get("seed", d.seed), "extraction.seed", 0),
        batch_size=r.integer(e.get("batch_size", d.batch_size), "extraction.batch_size", 1),
        workers=r.integer(e.get("workers", d.workers), "extraction.workers", 1),
        chunk_rows=r.integer(e.get("chunk_rows", d.chunk_rows), "extraction.chunk_rows", 1),
    )


def template_presets() -> dict[str, list[str]]:
    """Named prompt templates (METHODS.md), shipped as data in pipeline/presets/templates.json."""
    text = resources.files(__package__).joinpath("presets/templates.json").read_text("utf-8")
    presets: dict[str, list[str]] = json.loads(text)
    return presets


def _template_preset(r: _Reader, name: str, where: str) -> list[str]:
    presets = template_presets()
    if name not in presets:
        raise r.fail(where, f"unknown template preset {name!r} (known: {', '.join(sorted(presets))})")
    return presets[name]


def _parse_dataset(r: _Reader, raw: Any, where: str, base: Path) -> DatasetSpec:
    allowed = {"name", "format", "root", "split_file", "split", "templates", "shots", "seeds",
               "base_new"}
    d = r.mapping(raw, where, allowed)
    name = r.string(r.required(d, "name", where), f"{where}.name")
    if not _NAME_RE.match(name):
        raise r.fail(f"{where}.name", f"{name!r} may use only letters, digits, '_', '.', '-'")
    fmt = r.choice(r.required(d, "format", where), f"{where}.format", DatasetFormat)
    root = (base / r.string(r.required(d, "root", where), f"{where}.root")).resolve()
    split_file = None
    if fmt is DatasetFormat.COOP:
        rel = r.string(r.required(d, "split_file", where), f"{where}.split_file")
        split_file = (base / rel).resolve()
    elif d.get("split_file") is not None:
        raise r.fail(f"{where}.split_file", "only format coop reads a split file")
    s = r.mapping(d.get("split") or {}, f"{where}.split", {"val", "test", "seed"})
    split = ImageFolderSplit(
        val=r.number(s.get("val", 0.1), f"{where}.split.val", 0.0, 0.9),
        test=r.number(s.get("test", 0.5), f"{where}.split.test", 0.0, 0.9),
        seed=r.integer(s.get("seed", 0), f"{where}.split.seed", 0),
    )
    if split.val + split.test >= 1.0:
        raise r.fail(f"{where}.split", "val + test must leave some images for train")
    templates = d.get("templates", ["a photo of a {}."])
    if isinstance(templates, str) and templates.startswith("preset:"):
        templates = _template_preset(r, templates.removeprefix("preset:"), f"{where}.templates")
    elif isinstance(templates, str):
        templates = [templates]
    if not isinstance(templates, list) or not templates:
        raise r.fail(f"{where}.templates", "expected a template or a non-empty list of templates")
    for i, t in enumerate(templates):
        if not isinstance(t, str) or t.count("{}") != 1:
            raise r.fail(f"{where}.templates[{i}]", f"expected a string with one '{{}}', got {t!r}")
    seeds = d.get("seeds", [1, 2, 3])
    if not isinstance(seeds, list) or not seeds:
        raise r.fail(f"{where}.seeds", f"expected a non-empty list of integers, got {seeds!r}")
    base_new = d.get("base_new", "half")
    if base_new != "half":
        raise r.fail(f"{where}.base_new", f"unknown rule {base_new!r} (expected: half)")
    return DatasetSpec(
        name=name,
        format=fmt,
        root=root,
        split_file=split_file,
        split=split,
        templates=tuple(templates),
        shots=r.integer(d.get("shots", 16), f"{where}.shots", 1),
        seeds=tuple(r.integer(s, f"{where}.seeds[{i}]", 0) for i, s in enumerate(seeds)),
        base_new=base_new,
    )
