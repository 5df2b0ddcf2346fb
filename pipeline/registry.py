"""The registries, one per family, read from the presets: head methods (the stage that builds each,
how `+ship` mixes synthetic features, defaults), Tip-Adapter cache index kinds and SHIP variants.
CLI choices, manifest validation, the planner and the report derive from these. Torch-free."""

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
    ship: str | None  # how '+ship' adds synthesized features: pair | join; None: no +ship variant
    reads_val: bool  # tunes on val (alpha/beta), so val is one of its inputs
    reads_text: bool  # uses the zero-shot text classifier (CoOp builds its own from prompts)
    summary: str
    defaults: HeadConfig


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
        out[name] = HeadSpec(name, h["stage"], h["ship"], bool(h["reads_val"]),
                             bool(h["reads_text"]), h["summary"],
                             replace(HeadConfig(), **h["defaults"]))
    return out


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


def head_config(method: str, overrides: dict[str, dict[str, Any]]) -> HeadConfig:
    """The defaults of `method` (with or without '+ship') with the manifest's overrides applied."""
    spec, _ship = split_method(method)
    return replace(spec.defaults, **overrides.get(spec.name, {}))


def config_fields() -> dict[str, type]:
    """HeadConfig's fields and their types, for validating overrides."""
    defaults = HeadConfig()
    return {f.name: type(getattr(defaults, f.name)) for f in fields(HeadConfig)}
