"""What several stages share: the model with its extractor fingerprint, and finding that
extractor in a store with an error that says what to do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.errors import ExtractorMismatchError, UsageError
from pipeline.extraction import extractor_description
from pipeline.fingerprint import fingerprint
from pipeline.manifest import DatasetSpec, Manifest
from pipeline.models import ClipModel, load_clip, resolve_device
from pipeline.store import Extractor, FeatureStore


@dataclass(frozen=True)
class ModelContext:
    clip: ClipModel
    description: dict[str, Any]  # the extractor description this manifest's model + recipe give
    extractor_fp: str


def model_context(manifest: Manifest, device: str) -> ModelContext:
    clip = load_clip(manifest.model, resolve_device(device))
    description = extractor_description(clip, manifest.extraction)
    return ModelContext(clip, description, fingerprint(description))


def require_extractor(store: FeatureStore, ctx: ModelContext) -> Extractor:
    if not store.has_extractor(ctx.extractor_fp):
        others = ", ".join(f[:12] for f in store.extractor_fps()) or "none"
        raise ExtractorMismatchError(
            f"{store.location} has no features of this manifest's model and preprocessing "
            f"(extractor {ctx.extractor_fp[:12]}; the store has: {others}); run `shipyard extract`")
    return store.extractor(ctx.extractor_fp)


def seeds_of(spec: DatasetSpec, seeds: tuple[int, ...]) -> tuple[int, ...]:
    """The requested few-shot seeds (default: the dataset's), each one the manifest lists."""
    for seed in seeds:
        if seed not in spec.seeds:
            raise UsageError(f"dataset {spec.name}: seed {seed} is not in its seeds {spec.seeds}")
    return seeds or spec.seeds


def dataset_seeds(manifest: Manifest, names: tuple[str, ...],
                  seeds: tuple[int, ...]) -> list[tuple[DatasetSpec, int]]:
    """Every (dataset, few-shot seed) a stage works on: the named datasets (default: all)."""
    specs = [manifest.dataset(n) for n in names] if names else list(manifest.datasets)
    return [(spec, seed) for spec in specs for seed in seeds_of(spec, seeds)]
