"""`synthesize`: features for class names from a trained generator, written into the store."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import UsageError
from pipeline.features import select_labels
from pipeline.fingerprint import fingerprint
from pipeline.manifest import Manifest
from pipeline.progress import Progress, Silent
from pipeline.store import FeatureStore, RowTable, attrs_of, child_group
from pipeline.synthesis import Synthesizer
from stages.base import StageSpec
from stages.common import ModelContext, dataset_seeds, model_context, require_extractor
from stages.train_generator import generator_inputs, load_generator, ship_config, train_config

SPEC = StageSpec(
    name="synthesize",
    version=1,
    inputs=("generators/<fp>",),
    params=("ship.synthesize.classes", "ship.synthesize.per_class", "ship.synthesize.seed"),
    outputs=("synthetic/<fp>",),
    summary="sample synthetic image features per class name into the store (domain synthetic)",
)

CHUNK_CLASSES = 64  # classes per chunk of synthetic/<fp>/features


@dataclass(frozen=True)
class SynthesizeOptions:
    datasets: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()  # few-shot seeds, i.e. which generators
    classes: tuple[str, ...] = ()  # new | base | all | class names; empty: the manifest's
    per_class: int | None = None
    device: str = "auto"


def synthetic_description(generator_fp: str, per_class: int, seed: int) -> dict[str, Any]:
    return {"stage": SPEC.name, "version": SPEC.version, "generator": generator_fp,
            "per_class": per_class, "seed": seed, "sampling": "z~N(0,I)", "domain": "synthetic"}


def class_key(name: str) -> bytes:
    return hashlib.sha256(name.encode("utf-8")).digest()


def run(manifest: Manifest, opts: SynthesizeOptions,
        progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or Silent()
    ctx = model_context(manifest, opts.device)
    syn = manifest.ship.synthesize
    per_class = opts.per_class or syn.per_class
    results = []
    with FeatureStore.open(manifest.store, read_only=False, options=manifest.store_options) as store:
        ex = require_extractor(store, ctx)
        config, train = ship_config(manifest.ship.variant), train_config(manifest)
        for spec, seed in dataset_seeds(manifest, opts.datasets, opts.seeds):
            classnames = resolve_classes(store, spec.name, opts.classes or syn.classes)
            _data, desc = generator_inputs(store, ex, ctx, spec, seed, config, train)
            gen_fp = fingerprint(desc)
            if store.artifact("generators", gen_fp) is None:
                raise UsageError(f"dataset {spec.name} seed {seed}: no trained generator for this "
                                 "manifest's model and ship settings (run `shipyard "
                                 "train-generator` first)")
            out = synthesize_into(store, ctx, gen_fp, classnames, per_class, syn.seed, progress)
            results.append({"dataset": spec.name, "seed": seed, **out})
    return {"stage": SPEC.name, "extractor": ctx.extractor_fp, "per_class": per_class,
            "sets": results}


def resolve_classes(store: FeatureStore, dataset: str, selection: tuple[str, ...]) -> list[str]:
    """`new`, `base`, `all` (the dataset's classes) or explicit class names, in order."""
    names = store.dataset(dataset).classnames
    out: list[str] = []
    for item in selection:
        if item in ("new", "base", "all"):
            out += [names[i] for i in select_labels(store, dataset, item)]
        elif item.strip():
            out.append(item.strip())
        else:
            raise UsageError("--classes: empty class name")
    return list(dict.fromkeys(out))  # de-duplicated, order kept


def synthesize_into(store: FeatureStore, ctx: ModelContext, generator_fp: str,
                    classnames: list[str], per_class: int, seed: int,
                    progress: Progress) -> dict[str, Any]:
    """Sample the classes `synthetic/<fp>` lacks; one row per class, (per_class, D) features."""
    started = time.perf_counter()
    desc = synthetic_description(generator_fp, per_class, seed)
    fp = fingerprint(desc)
    group = store.artifact("synthetic", fp, complete=False)
    if group is None:
        group = store.create_artifact("synthetic", fp, desc)
        RowTable.create(group, "classes", {"features": ((per_class, ctx.clip.embed_dim), "float16")},
                        CHUNK_CLASSES)
        group.update_attributes({"classnames": [], "complete": True})
    table = RowTable(child_group(group, "classes"), read_only=False)
    have = table.index()
    missing = [c for c in classnames if class_key(c) not in have]
    if missing:
        synth = Synthesizer(load_generator(store, generator_fp, ctx), missing)
        # Names first, rows second: readers pair names[:rows] with the committed rows.
        group.attrs["classnames"] = list(attrs_of(group)["classnames"])[: table.rows] + missing
        writer = table.writer()
        task = progress.task("synthesize", len(missing), "class")
        try:
            for i, name in enumerate(missing):
                feats = synth.per_class(i, per_class, seed).cpu().numpy()  # (per_class, D)
                writer.add(np.frombuffer(class_key(name), np.uint8)[None], features=feats[None])
                task.advance(1)
        finally:
            writer.flush()
            task.close()
    return {"synthetic": fp, "generator": generator_fp, "classes": len(classnames),
            "synthesized": len(missing), "reused": len(classnames) - len(missing),
            "seconds": round(time.perf_counter() - started, 3)}


def read_synthetic(store: FeatureStore, fp: str, classnames: list[str]) -> dict[str, np.ndarray]:
    """classname -> (per_class, D) float16 features, for classes present in `synthetic/<fp>`."""
    group = store.artifact("synthetic", fp)
    if group is None:
        raise UsageError(f"{store.location} has no synthetic set {fp[:12]} (run `shipyard synthesize`)")
    table = RowTable(child_group(group, "classes"), read_only=True)
    index = table.index()
    rows = [index[class_key(c)] for c in classnames if class_key(c) in index]
    feats = table.read("features", np.array(rows, dtype=np.int64))
    present = [c for c in classnames if class_key(c) in index]
    return dict(zip(present, feats, strict=True))
