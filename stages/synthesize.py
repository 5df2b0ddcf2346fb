"""`synthesize`: features for class names from a trained generator, written into the store.

A synthetic set is keyed by its generator and sampling settings, not by its classes: one row per
class, sampled from an RNG seeded by (seed, class name), so asking for more classes later samples
only those. Model code is imported inside `compute`: planning imports none."""

from __future__ import annotations

from ..pipeline.artifacts import SYNTHETIC, Ref
from ..pipeline.errors import UsageError
from ..pipeline.records import class_key
from ..pipeline.rows import RowTable
from ..pipeline.store import FeatureStore
from ..pipeline.zarr_nodes import attrs_of, child_group
from .base import Declared, Job, Outcome, Scope, Slot, Stage, Work

CHUNK_CLASSES = 64  # classes per chunk of synthetic/<key>/classes/features


def resolve_classes(slot: Slot, selection: tuple[str, ...]) -> list[str]:
    """`new`, `base`, `all` (the dataset's classes) or explicit class names, in order."""
    facts = slot.facts
    groups = {"base": facts.base, "new": facts.new, "all": list(range(len(facts.classnames)))}
    out: list[str] = []
    for item in selection:
        if item in groups:
            out += [facts.classnames[i] for i in groups[item]]
        elif item.strip():
            out.append(item.strip())
        else:
            raise UsageError("--classes: empty class name")
    return list(dict.fromkeys(out))  # de-duplicated, order kept


def declare(slot: Slot) -> Declared:
    syn = slot.manifest.ship.synthesize
    per_class = slot.options.get("per_class") or syn.per_class
    generator = slot.upstream["train-generator"]
    classes = resolve_classes(slot, slot.options.get("classes") or syn.classes)
    return Declared(params={"per_class": per_class, "seed": syn.seed, "sampling": "z~N(0,I)",
                            "domain": "synthetic"},
                    inputs={"generator": generator.key}, deps=(generator,), detail=classes)


def missing(store: FeatureStore, job: Job) -> list[str]:
    group = store.lookup(Ref.of(SYNTHETIC, job.key))
    if group is None or "classes" not in group:
        return ["not sampled yet"]
    have = RowTable(child_group(group, "classes"), read_only=True).index()
    lacking = [c for c in job.detail if class_key(c) not in have]
    return [f"{len(lacking)} classes not sampled yet"] if lacking else []


def compute(work: Work) -> Outcome:
    import numpy as np

    from ..pipeline.generators import load_generator
    from ..pipeline.synthesis import Synthesizer

    job, env, group = work.job, work.env, work.group
    per_class, seed = int(job.params["per_class"]), int(job.params["seed"])
    if "classes" not in group:
        RowTable.create(group, "classes", {"features": ((per_class, env.identity.embed_dim),
                                                        "float16")}, CHUNK_CLASSES)
        group.attrs["classnames"] = []
    table = RowTable(child_group(group, "classes"), read_only=False)
    have = table.index()
    classnames: list[str] = job.detail
    lacking = [c for c in classnames if class_key(c) not in have]
    if lacking:
        synth = Synthesizer(load_generator(work.store, job.inputs["generator"], env.clip,
                                           env.extractor_fp), lacking)
        # Names first, rows second: readers pair names[:rows] with the committed rows.
        named = list(attrs_of(group).get("classnames", []))[: table.rows] + lacking
        group.attrs["classnames"] = named
        writer = table.writer()
        task = env.progress.task("synthesize", len(lacking), "class")
        try:
            for i, name in enumerate(lacking):
                feats = synth.per_class(i, per_class, seed).cpu().numpy()  # (per_class, D)
                writer.add(np.frombuffer(class_key(name), np.uint8)[None], features=feats[None])
                task.advance(1)
        finally:
            writer.flush()
            task.close()
    summary = {"generator": job.inputs["generator"], "classes": len(classnames),
               "synthesized": len(lacking), "reused": len(classnames) - len(lacking)}
    return Outcome({"classnames": list(attrs_of(group).get("classnames", []))}, summary)


STAGE = Stage(name="synthesize", kind=SYNTHETIC, scope=Scope.SEED, declare=declare,
              compute=compute, missing=missing, appendable=True,
              summary="sample synthetic image features per class name into the store")
