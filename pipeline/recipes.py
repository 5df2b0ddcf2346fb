"""The settings one dataset's jobs run with, resolved from four layers, each over the one before:
the method's defaults (a `+ship` variant's own recipe where it has one), the dataset's preset
(presets/datasets.json, by name or `preset:`), the manifest's `heads` / `ship` sections (every
dataset), and the dataset's own entries. Within a layer `coop` applies to coop and coop+ship,
`coop+ship` to that variant only, after it. Torch-free: the planner resolves every job here."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .configs import HeadConfig, ShipConfig
from .manifest import DatasetSpec, Manifest
from .registry import (
    DEFAULT_PRESET,
    SHIP_SUFFIX,
    DatasetPreset,
    dataset_presets,
    ship_variants,
    split_method,
)

DEFAULT_SHIP_EPOCHS = 50
TIP_HEADS = ("tip-adapter", "tip-adapter-f")


def preset_of(spec: DatasetSpec) -> DatasetPreset:
    """The dataset's preset, or the `default` one for a dataset without."""
    presets = dataset_presets()
    return presets.get(spec.preset, presets[DEFAULT_PRESET])


def _layer(overrides: dict[str, dict[str, Any]], family: str, method: str) -> dict[str, Any]:
    out = dict(overrides.get(family) or {})
    if method != family:
        out.update(overrides.get(method) or {})
    return out


def head_config(manifest: Manifest, spec: DatasetSpec, method: str) -> HeadConfig:
    """The training settings of `method` (with or without '+ship') on dataset `spec`."""
    head, ship = split_method(method)
    preset = preset_of(spec)
    cfg = head.config(ship)
    if head.name in TIP_HEADS:
        cfg = replace(cfg, alpha=preset.tip_init[0], beta=preset.tip_init[1])
    for overrides in (preset.heads, manifest.heads.overrides, spec.overrides):
        cfg = replace(cfg, **_layer(overrides, head.name, method))
    return cfg


def tip_scale(manifest: Manifest, spec: DatasetSpec) -> tuple[float, float]:
    """[S_beta, S_alpha] of the alpha/beta search: the dataset's, else the manifest's, else the
    preset's."""
    return spec.tip_scale or manifest.heads.tip_scale or preset_of(spec).tip_scale


def tip_init(manifest: Manifest, spec: DatasetSpec) -> tuple[float, float]:
    """Tip-Adapter's initial (alpha, beta) on this dataset: what a cache keeps without val."""
    cfg = head_config(manifest, spec, "tip-adapter")
    return cfg.alpha, cfg.beta


def ship_settings(manifest: Manifest, spec: DatasetSpec) -> tuple[str, ShipConfig, int]:
    """The SHIP variant's name and config and the generator's epochs on this dataset."""
    preset = preset_of(spec).ship
    variant = manifest.ship.variant or preset.get("variant", "default")
    epochs = manifest.ship.epochs or int(preset.get("epochs", DEFAULT_SHIP_EPOCHS))
    return variant, ship_variants()[variant].config, epochs


def family(method: str) -> str:
    return method.removesuffix(SHIP_SUFFIX)
