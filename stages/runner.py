"""`run`: every stage of the pipeline in order. Each stage skips work whose output is current."""

from __future__ import annotations

from typing import Any

from pipeline.manifest import Manifest
from pipeline.progress import Progress, Silent
from stages import build_cache, evaluate, extract, synthesize, train_adapter, train_generator
from stages.base import StageSpec

# The pipeline, in execution order. A stage joins by being listed here.
PIPELINE: tuple[StageSpec, ...] = (extract.SPEC, train_generator.SPEC, synthesize.SPEC,
                                   train_adapter.SPEC, build_cache.SPEC, evaluate.SPEC)


def run_all(manifest: Manifest, datasets: tuple[str, ...], device: str,
            progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or Silent()
    methods = manifest.heads.methods
    needs_ship = any(m.endswith("+ship") for m in methods)
    stages: dict[str, Any] = {}
    stages["extract"] = extract.run(
        manifest, extract.ExtractOptions(datasets=datasets, device=device), progress)
    if needs_ship:
        stages["train-generator"] = train_generator.run(
            manifest, train_generator.TrainGeneratorOptions(datasets=datasets, device=device),
            progress)
        stages["synthesize"] = synthesize.run(
            manifest, synthesize.SynthesizeOptions(datasets=datasets, device=device), progress)
    adapters = []
    for method in methods:
        base = method.removesuffix("+ship")
        synthetic = "auto" if method.endswith("+ship") else "none"
        if base in train_adapter.TRAINED:
            opts = train_adapter.TrainAdapterOptions(method=base, synthetic=synthetic,
                                                     datasets=datasets, device=device)
            adapters.append({"method": method, **train_adapter.run(manifest, opts, progress)})
        elif base == "tip-adapter":
            opts_c = build_cache.BuildCacheOptions(synthetic=synthetic, datasets=datasets,
                                                   device=device)
            stages.setdefault("build-cache", []).append(build_cache.run(manifest, opts_c, progress))
    stages["train-adapter"] = adapters
    stages["evaluate"] = evaluate.run(
        manifest, evaluate.EvaluateOptions(datasets=datasets, device=device), progress)
    return {"stage": "run", "pipeline": [s.name for s in PIPELINE], "stages": stages}
