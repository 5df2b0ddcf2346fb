"""`evaluate`: base / new / H with restricted logits, GZSL and per-class accuracy of every head of
the manifest, per seed and averaged; the results go into `runs/<key>`.

Model code is imported inside `compute`: planning imports none."""

from __future__ import annotations

from typing import Any

from ..pipeline.artifacts import ADAPTER, CACHE, RUN, Kind, Ref
from ..pipeline.recipes import selection
from ..pipeline.registry import split_method
from .base import Declared, Job, Outcome, Scope, Slot, Stage, Work

# Which kind of stored head the stage that builds a method makes.
HEAD_KINDS: dict[str, Kind] = {"train-adapter": ADAPTER, "build-cache": CACHE}


def declare(slot: Slot) -> Declared:
    explicit = slot.options.get("explicit")  # (kind name, key): one stored head, not the manifest's
    heads: dict[str, dict[str, Any]] = {}
    deps: list[Job] = [slot.upstream["extract"]]
    requires: tuple[Ref, ...] = ()
    if explicit:
        kind, key = explicit
        heads[f"{kind} {key[:12]}"] = {"kind": kind, "keys": [key] * len(slot.seeds)}
        requires = (Ref.of(ADAPTER if kind == ADAPTER.name else CACHE, key),)
    else:
        for method, jobs in slot.heads.items():
            spec, _ship = split_method(method)
            kind = HEAD_KINDS[spec.stage].name if spec.stage else None
            heads[method] = {"kind": kind, "keys": [j.key if j else None for j in jobs]}
            deps += [j for j in jobs if j is not None]
    protocol = slot.manifest.heads.protocol.value
    selections = {m: selection(slot.manifest, m) for m in heads if not explicit}
    params: dict[str, Any] = {"protocol": protocol, "seeds": list(slot.seeds),
                              "selections": selections}
    if slot.spec.transfer_from:
        params["transfer_from"] = slot.spec.transfer_from
    return Declared(params=params,
                    inputs={"extractor": slot.extractor, "test": slot.facts.test,
                            "text": slot.texts, "heads": heads},
                    deps=tuple(deps), requires=requires)


def compute(work: Work) -> Outcome:
    from ..pipeline.head_inputs import head_inputs, transfer_inputs

    job, env, store = work.job, work.env, work.store
    spec = env.manifest.dataset(job.dataset)
    ex = env.extractor(store)
    transfer = job.params.get("transfer_from")
    target = transfer_inputs(store, ex, spec, env.clip.device) if transfer else None
    heads: dict[str, dict[str, Any]] = job.inputs["heads"]
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in heads}
    pixels: list[Any] = []  # the test images, read once for heads that encode them themselves
    task = env.progress.task(f"evaluate {job.dataset}", len(job.params["seeds"]) * len(heads),
                             "head")
    try:
        for i, seed in enumerate(job.params["seeds"]):
            inputs = target or head_inputs(store, ex, spec, seed, env.clip.device)
            inputs.check({k: job.inputs[k] for k in ("test", "text")}, job.id)
            for method, head in heads.items():
                model = _load(work, head["kind"], head["keys"][i], inputs, bool(transfer))
                index = getattr(model, "index_note", None)
                scored = own_features(work, model, inputs, pixels)
                rows[method].append({"seed": seed, **score(model, scored),
                                     **({"index": index} if index else {})})
                task.advance(1)
    finally:
        task.close()
    selections = job.params.get("selections", {})
    table = [{"method": m, **mean_row(rs), "seeds": len(rs), "selection": selections.get(m)}
             for m, rs in rows.items()]
    summary = {"table": [{k: v for k, v in r.items() if k != "per_class"} for r in table],
               "protocol": job.params["protocol"]}
    return Outcome({"table": table, "per_seed": rows}, summary)


def own_features(work: Work, model: Any, inputs: Any, pixels: list[Any]) -> Any:
    """`inputs` with the test features a head computes itself (SYNC-CLIP's prompted image
    encoder) in place of the cached ones; `inputs` itself for every other head. `pixels` keeps
    the test images once read (uint8, checked against their keys)."""
    from dataclasses import replace

    import numpy as np

    from ..pipeline.datasets import Split
    from ..pipeline.image_sets import read_rows, stack_clean

    if not hasattr(model, "image_features"):
        return inputs
    env = work.env
    if not pixels:
        spec, ds = env.manifest.dataset(work.job.dataset), work.store.dataset(work.job.dataset)
        rows = np.flatnonzero(ds.splits() == Split.TEST)
        images = read_rows(spec, ds, rows, env.manifest.extraction.max_pixels)
        pixels.append(stack_clean(images, env.clip.preprocess))
    features = model.image_features(pixels[0], env.clip.preprocess)
    return replace(inputs, test=replace(inputs.test, features=features))


def _load(work: Work, kind: str | None, key: str | None, inputs: Any, transfer: bool) -> Any:
    from ..pipeline.head_store import load_adapter, load_cache
    from ..pipeline.heads import ZeroShot

    env, store = work.env, work.store
    if kind is None:
        return ZeroShot(inputs.text)
    assert key is not None
    if kind == ADAPTER.name:
        return load_adapter(store, key, env.clip, env.extractor_fp, inputs, transfer=transfer)
    return load_cache(store, key, env.extractor_fp, inputs)


def score(head: Any, inputs: Any) -> dict[str, Any]:

    from ..pipeline.metrics import base_new, gzsl, per_class_accuracy

    logits = _logits(head, inputs.test.features, None)
    # Base and new accuracy read only their own classes' columns: a head that picks its answer
    # within the scored classes (the classes cache's candidates) is asked once per side.
    sided = logits
    if getattr(head, "sided", False):
        sided = logits.clone()
        for side in (inputs.base, inputs.new):
            if side:
                sided[:, side] = _logits(head, inputs.test.features, side)[:, side]
    labels = inputs.test.labels.cpu()
    row = base_new(sided, labels, inputs.base, inputs.new)
    row["accuracy"] = float(100.0 * (logits.argmax(1) == labels).float().mean()) \
        if len(labels) else float("nan")  # over every class (cross-dataset transfer's number)
    g = gzsl(logits, labels, inputs.base, inputs.new)
    per_class = {**per_class_accuracy(sided, labels, inputs.base, restrict=True),
                 **per_class_accuracy(sided, labels, inputs.new, restrict=True)}
    return {**row, "gzsl_seen": g["seen"], "gzsl_unseen": g["unseen"], "gzsl_h": g["h"],
            "per_class": {inputs.classnames[c]: v for c, v in per_class.items()}}


def _logits(head: Any, features: Any, classes: list[int] | None) -> Any:
    """The head's (N, C) logits over the features in batches of 1024, on the CPU."""
    import torch

    with torch.no_grad():
        parts = [head(x) if classes is None else head.scoped(x, classes)
                 for x in features.split(1024)]
    return torch.cat(parts).float().cpu()


def mean_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    from ..pipeline.metrics import average_rows

    numeric = [{k: v for k, v in r.items() if k not in ("seed", "per_class", "index")}
               for r in rows]
    avg = average_rows(numeric)
    indexes = [r["index"] for r in rows if r.get("index")]
    if indexes:  # an approximate cache: the seed whose agreement with dense is lowest
        avg["index"] = min(indexes, key=lambda i: i["top1_agreement"])
    names = rows[0]["per_class"].keys()
    avg["per_class"] = {n: float(np.nanmean([r["per_class"][n] for r in rows])) for n in names}
    return avg


STAGE = Stage(name="evaluate", kind=RUN, scope=Scope.DATASET, declare=declare, compute=compute,
              summary="base-to-new and GZSL accuracy of every head, mean over seeds")
