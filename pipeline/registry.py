"""The registries, one per family, read from the presets: head methods (the stage that builds each,
how `+ship` mixes synthetic features, defaults), Tip-Adapter cache index kinds, SHIP variants and
the benchmark datasets' presets. CLI choices, manifest validation, the planner and the report
derive from these. Torch-free."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from functools import cache
from importlib import resources
from typing import Any

from .configs import HeadConfig, ShipConfig

SHIP_SUFFIX = "+ship"


def _preset(name: str) -> dict[str, Any]:
    text = resources.files(__package__).joinpath(f"presets/{name}.json").read_text("utf-8")
    data: dict[str, Any] = json.loads(text)
    return {k: v for k, v in data.items() if not k.startswith("_")}


@dataclass(frozen=True)
class HeadSpec:
    name: str
    stage: str | None  # the stage that builds it: train-adapter | build-cache; None: nothing to build
    ship: str | None  # how '+ship' adds synthesized features: pair | join | domain; None: none
    reads_val: bool  # tunes on val (alpha/beta), so val is one of its inputs
    reads_text: bool  # uses the zero-shot text classifier (CoOp builds its own from prompts)
    summary: str
    defaults: HeadConfig
    ship_defaults: HeadConfig | None  # the '+ship' variant's recipe, when it has its own
    paper: str | None = None  # the `paper` protocol's selection rule (presets/heads.json)
    transfers: bool = False  # evaluable on another dataset's classes (cross-dataset transfer)
    ship_paper: str | None = None  # the '+ship' variant's, when it has its own
    synthetic_domain: bool = False  # trains on the paired synthetic-domain dataset (SYNC-CLIP)
    reads_images: bool = False  # the image encoder runs in its loop and when it is scored

    def config(self, ship: bool) -> HeadConfig:
        return self.ship_defaults if ship and self.ship_defaults else self.defaults

    def paper_rule(self, ship: bool) -> str | None:
        return self.ship_paper if ship and self.ship_paper else self.paper


@dataclass(frozen=True)
class IndexSpec:
    name: str
    exact: bool
    summary: str


@dataclass(frozen=True)
class ShipVariantSpec:
    name: str
    summary: str
    config: ShipConfig


@cache
def heads() -> dict[str, HeadSpec]:
    out = {}
    for name, h in _preset("heads").items():
        defaults = replace(HeadConfig(), **h["defaults"])
        ship = replace(defaults, **h["ship_defaults"]) if "ship_defaults" in h else None
        out[name] = HeadSpec(name, h["stage"], h["ship"], bool(h["reads_val"]),
                             bool(h["reads_text"]), h["summary"], defaults, ship,
                             paper=h.get("paper"), ship_paper=h.get("ship_paper"),
                             transfers=bool(h.get("transfers")),
                             synthetic_domain=bool(h.get("synthetic_domain")),
                             reads_images=bool(h.get("reads_images")))
    return out


@dataclass(frozen=True)
class DatasetPreset:
    """A benchmark dataset's settings from the public codes (presets/datasets.json)."""

    name: str
    aliases: tuple[str, ...]
    templates: str | None  # a template preset (templates.json); None: the manifest's default
    tip_scale: tuple[float, float]  # Tip-Adapter's [S_beta, S_alpha]
    tip_init: tuple[float, float]  # Tip-Adapter's init [alpha, beta]
    heads: dict[str, dict[str, Any]]  # HeadConfig fields per method ('+ship' keys: that variant)
    ship: dict[str, Any]  # SHIP generator settings (epochs, variant)
    sync_clip: dict[str, float]  # SYNC-CLIP's epochs and loss weights


DEFAULT_PRESET = "default"


@cache
def dataset_presets() -> dict[str, DatasetPreset]:
    out = {}
    for name, p in _preset("datasets").items():
        out[name] = DatasetPreset(
            name, tuple(p["aliases"]), p["templates"],
            (float(p["tip"]["scale"][0]), float(p["tip"]["scale"][1])),
            (float(p["tip"]["init"][0]), float(p["tip"]["init"][1])),
            p["heads"], p["ship"], p["sync_clip"])
    return out


def _folded(name: str) -> str:
    return "".join(c for c in name.lower() if c.isalnum())


def find_preset(name: str) -> str | None:
    """The preset a dataset name selects: a preset's name or one of its aliases, case and
    punctuation ignored (`oxford_pets`, `OxfordPets`, `oxford-pets`); None for any other name."""
    want = _folded(name)
    for preset in dataset_presets().values():
        if preset.name != DEFAULT_PRESET and want in {_folded(a) for a in
                                                      (preset.name, *preset.aliases)}:
            return preset.name
    return None


@cache
def cache_indexes() -> dict[str, IndexSpec]:
    return {name: IndexSpec(name, bool(i["exact"]), i["summary"])
            for name, i in _preset("cache_indexes").items()}


@cache
def ship_variants() -> dict[str, ShipVariantSpec]:
    return {name: ShipVariantSpec(name, v["summary"], replace(ShipConfig(), **v["config"]))
            for name, v in _preset("ship_variants").items()}


def head_names(with_ship: bool = True) -> list[str]:
    """Every method name a manifest may list: each head, and `<head>+ship` where it has one."""
    out = []
    for spec in heads().values():
        out.append(spec.name)
        if with_ship and spec.ship:
            out.append(spec.name + SHIP_SUFFIX)
    return out


def split_method(method: str) -> tuple[HeadSpec, bool]:
    """`coop+ship` -> (the coop spec, True). KeyError for an unknown name."""
    ship = method.endswith(SHIP_SUFFIX)
    spec = heads()[method.removesuffix(SHIP_SUFFIX)]
    if ship and not spec.ship:
        raise KeyError(method)
    return spec, ship


def tunes_on_val(methods: Iterable[str]) -> bool:
    """Whether any of these head methods tunes on val (names outside the registry count as no)."""
    for method in methods:
        try:
            if split_method(method)[0].reads_val:
                return True
        except KeyError:
            continue
    return False


def config_fields() -> dict[str, type]:
    """HeadConfig's fields and their types, for validating overrides."""
    defaults = HeadConfig()
    return {f.name: type(getattr(defaults, f.name)) for f in fields(HeadConfig)}
