"""What several stages share: the model with its extractor fingerprint, and finding that
extractor in a store with an error that says what to do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.errors import ExtractorMismatchError
from pipeline.extraction import extractor_description
from pipeline.fingerprint import fingerprint
from pipeline.manifest import Manifest
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
