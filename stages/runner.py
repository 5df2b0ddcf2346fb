"""`run`: every stage of the pipeline in order. Each stage skips work whose output is current."""

from __future__ import annotations

from typing import Any

from pipeline.manifest import Manifest
from pipeline.progress import Progress, Silent
from stages import extract, synthesize, train_generator
from stages.base import StageSpec

# The pipeline, in execution order. A stage joins by being listed here.
PIPELINE: tuple[StageSpec, ...] = (extract.SPEC, train_generator.SPEC, synthesize.SPEC)


def run_all(manifest: Manifest, datasets: tuple[str, ...], device: str,
            progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or Silent()
    stages: dict[str, Any] = {}
    stages["extract"] = extract.run(
        manifest, extract.ExtractOptions(datasets=datasets, device=device), progress)
    stages["train-generator"] = train_generator.run(
        manifest, train_generator.TrainGeneratorOptions(datasets=datasets, device=device), progress)
    stages["synthesize"] = synthesize.run(
        manifest, synthesize.SynthesizeOptions(datasets=datasets, device=device), progress)
    return {"stage": "run", "pipeline": [s.name for s in PIPELINE], "stages": stages}
