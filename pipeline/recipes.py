"""The settings one dataset's jobs run with, resolved from four layers, each over the one before:
the method's defaults (a `+ship` variant's own recipe where it has one), the dataset's preset
(presets/datasets.json, by name or `preset:`), the manifest's `heads` / `ship` sections (every
dataset), and the dataset's own entries. Within a layer `coop` applies to coop and coop+ship,
`coop+ship` to that variant only, after it. Torch-free: the planner resolves every job here."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .configs import HeadConfig, ShipConfig
from .manifest import DatasetSpec, Manifest, Protocol
from .registry import (
    DEFAULT_PRESET,
    DatasetPreset,
    dataset_presets,
    ship_variants,
    split_method,
)

DEFAULT_SHIP_EPOCHS = 50
TIP_HEADS = ("tip-adapter", "tip-adapter-f")
SYNC_HEADS = ("sync-clip-fs", "sync-clip")


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
    if head.name in SYNC_HEADS:
        cfg = replace(cfg, epochs=int(preset.sync_clip["epochs"]))
    if cfg.views != "primary" and cfg.views not in manifest.extraction.recipes:
        # A registry default (CoOp: dassl) the manifest does not extract: the primary views.
        cfg = replace(cfg, views="primary")
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


def method_notes(methods: Any) -> list[str]:
    """Caveats a table carries for the methods in it: SYNC-CLIP-FS is shipyard's own design;
    sync-clip is the paper's method, with its prompt depth capped at the model's."""
    names = {m.removesuffix("+ship") for m in methods}
    notes = []
    if "sync-clip-fs" in names:
        notes.append("sync-clip-fs is shipyard's own feature-space variant of SYNC-CLIP (CoOp's "
                     "shared context and a residual adapter per domain over cached features, with "
                     "the paper's three losses), not the paper's method, whose visual prompts "
                     "need the image encoder")
    if "sync-clip" in names:
        notes.append("sync-clip is the paper's method: deep vision-language prompts trained and "
                     "scored with the image encoder in the loop (depth 9, or the model's depth "
                     "when it has fewer blocks)")
    return notes


def index_notes(table: list[dict[str, Any]]) -> list[str]:
    """What an approximate Tip-Adapter cache in a results table says about itself: its index and
    its stored top-1 agreement with the dense result (the lowest over the table's seeds)."""
    out = []
    for row in table:
        i = row.get("index")
        if not i:
            continue
        if i["kind"] == "classes":
            sides = ", ".join(f"{k} {v:.3f}" for k, v in i["scopes"].items())
            how = (f"T = {i['candidates']} candidate classes; top-1 agreement with dense "
                   f"{i['top1_agreement']:.3f} ({sides}) on {_tuning_queries(i)}")
        else:
            how = (f"top-{i['topk']} neighbours; top-1 agreement with dense "
                   f"{i['top1_agreement']:.3f} on {i['sample']} test queries")
        out.append(f"{row['method']}: {i['kind']} cache index, {how}")
    return out


def _tuning_queries(agreement: dict[str, Any]) -> str:
    n, val = agreement["sample"], agreement["val"]
    return f"{n} val queries" if n == val else f"{n} queries ({val} val, {n - val} cache keys)"


def sync_weights(spec: DatasetSpec) -> dict[str, float]:
    """SYNC-CLIP's loss weights on this dataset (its preset): WEIGHT for L_syn, KLWEIGHT for
    L_align."""
    preset = preset_of(spec).sync_clip
    return {"weight": float(preset["weight"]), "kl_weight": float(preset["kl_weight"])}


def ship_settings(manifest: Manifest, spec: DatasetSpec) -> tuple[str, ShipConfig, int]:
    """The SHIP variant's name and config and the generator's epochs on this dataset."""
    preset = preset_of(spec).ship
    variant = manifest.ship.variant or preset.get("variant", "default")
    epochs = manifest.ship.epochs or int(preset.get("epochs", DEFAULT_SHIP_EPOCHS))
    return variant, ship_variants()[variant].config, epochs


# How a reported head state is chosen: `clean` keeps the last epoch of every trained head;
# `paper` follows each public code's own rule (presets/heads.json, "paper").
SELECTIONS = {
    "last": "last epoch",
    "best-epoch": "best test H over epochs",
    "best-generator-epoch": "best test H over generator epochs",
}


def selection(manifest: Manifest, method: str) -> str | None:
    """The selection rule of `method` under the manifest's protocol; None for heads with nothing
    to select (zero-shot, the training-free Tip-Adapter cache)."""
    head, ship = split_method(method)
    rule = head.paper_rule(ship)
    if rule is None or manifest.heads.protocol is Protocol.CLEAN:
        return None if rule is None else "last"
    return rule


def describe_selections(selections: dict[str, str | None]) -> str:
    """One line naming how each head's numbers were chosen ("coop+ship: best test H over
    generator epochs; tip-adapter-f: best test H over epochs; coop: last epoch")."""
    groups: dict[str, list[str]] = {}
    for method, rule in selections.items():
        if rule is not None:
            groups.setdefault(SELECTIONS[rule], []).append(method)
    return "; ".join(f"{', '.join(ms)}: {label}" for label, ms in groups.items())


def generator_epochs(epochs: int) -> list[int]:
    """The generator epochs SHIP trains CoOp at under `paper`: 10, 20, ... (its code evaluates
    every 10th of 50), and the last epoch when it is not one of them."""
    out = list(range(10, epochs + 1, 10))
    return out if out and out[-1] == epochs else [*out, epochs]


def needs_generator_snapshots(manifest: Manifest) -> bool:
    """Whether a head of the manifest selects over generator epochs (the generator then keeps
    its weights at each of them)."""
    return any(selection(manifest, m) == "best-generator-epoch" for m in manifest.heads.methods)
