"""The HTML report of a run (written by `evaluate` and `run`): the results table, per-class
accuracy, the projection of real vs synthesized features and the training curves, as one file
beside the manifest that carries its own key, so `status` can tell a current report from a stale one.

Model code is imported inside `compute`: planning imports none."""

from __future__ import annotations

from typing import Any

from ..pipeline.artifacts import ADAPTER, GENERATOR, REPORT, RUN, Ref
from ..pipeline.datasets import protocol_warnings
from ..pipeline.identity import model_notes
from ..pipeline.recipes import describe_selections, index_notes, method_notes, tip_init
from ..pipeline.registry import split_method, tunes_on_val
from ..pipeline.report import report_folder, report_key
from ..pipeline.store import FeatureStore
from ..pipeline.zarr_nodes import attrs_of
from .base import Declared, Job, Outcome, Scope, Slot, Stage, Work


def declare(slot: Slot) -> Declared:
    run = slot.upstream["evaluate"]
    inputs: dict[str, Any] = {"run": run.key}
    deps = [run]
    explicit = slot.options.get("explicit")  # one stored head: no projection of SHIP features
    if not explicit and any(split_method(m)[1] for m in slot.heads) \
            and "synthesize" in slot.upstream:
        syn = slot.upstream["synthesize"]  # the first seed's, for the projection
        generators = [slot.per_seed[s]["train-generator"] for s in slot.seeds]
        inputs |= {"synthetic": syn.key, "seed": slot.seeds[0],
                   "generators": [g.key for g in generators]}
        deps += [syn, *generators]
    name = slot.spec.name
    if explicit:
        name += f"-{explicit[0]}-{explicit[1][:12]}"
    folder = report_folder(slot.manifest.path, slot.options.get("report_dir"))
    return Declared(params={"format": 1}, inputs=inputs, deps=tuple(deps),
                    detail=folder / f"{name}.html")


def missing(store: FeatureStore, job: Job) -> list[str]:
    found = report_key(job.detail)
    if found == job.key:
        return []
    return ["not written yet" if found is None else "written for another run"]


def compute(work: Work) -> Outcome:
    from ..pipeline.report import write_report

    job, env, store = work.job, work.env, work.store
    group = store.lookup(Ref.of(RUN, job.inputs["run"]))
    if group is None:
        from ..pipeline.errors import StoreError

        raise StoreError(f"{job.id}: run {job.inputs['run'][:12]} is not in the store")
    attrs, record = attrs_of(group), dict(attrs_of(group)["record"])
    table = attrs["table"]
    seeds = record["params"]["seeds"]
    ds = store.dataset(job.dataset)
    notes = [*model_notes(env.manifest.model), *method_notes(record["inputs"]["heads"]),
             *index_notes(table),
             *protocol_warnings(ds.base_labels, ds.new_labels, int(ds.attrs["splits"]["val"]),
                                tunes_on_val(record["inputs"]["heads"]),
                                tip_init(env.manifest, env.manifest.dataset(job.dataset)))]
    data = {
        "title": f"shipyard: {job.dataset}",
        "notes": [n[0].upper() + n[1:] + "." for n in notes],
        "protocol": (f"transfer: heads trained on {record['params']['transfer_from']}; "
                     if record["params"].get("transfer_from") else "")
                    + f"{record['params']['protocol']}; mean over seeds "
                    f"{', '.join(str(s) for s in seeds)}"
                    + (f" ({chosen})" if (chosen := describe_selections(
                        record["params"].get("selections", {}))) else ""),
        "table": [{k: r[k] for k in ("method", "base", "new", "h", "gzsl_seen", "gzsl_unseen",
                                     "gzsl_h", "seeds", "base_std", "new_std") if k in r}
                  for r in table],
        "per_class": {r["method"]: r["per_class"] for r in table},
        "projection": _projection(work) if "synthetic" in job.inputs else None,
        "curves": _curves(store, job, record["inputs"]["heads"], seeds) or None,
        "curves_y": "loss",
        "sides": {"base": [ds.classnames[i] for i in ds.base_labels],
                  "new": [ds.classnames[i] for i in ds.new_labels]},
        "key": job.key,
        "run": job.inputs["run"],
    }
    path = write_report(data, job.detail)
    return Outcome({}, {"report": str(path)})


def _projection(work: Work) -> dict[str, Any]:
    """Real test vs synthesized features of the new classes, first seed."""
    import torch

    from ..pipeline.head_inputs import head_inputs
    from ..pipeline.head_store import synthetic_features

    job, env, store = work.job, work.env, work.store
    inputs = head_inputs(store, env.extractor(store), env.manifest.dataset(job.dataset),
                         int(job.inputs["seed"]), torch.device("cpu"))
    syn, syn_y = synthetic_features(store, job.inputs["synthetic"], inputs, torch.device("cpu"))
    new = torch.isin(inputs.test.labels, torch.tensor(inputs.new))
    real_x, real_y = inputs.test.features[new], inputs.test.labels[new]
    remap = {c: i for i, c in enumerate(inputs.new)}
    return {"classnames": [inputs.classnames[c] for c in inputs.new],
            "real": {"features": real_x.numpy(), "labels": [remap[int(y)] for y in real_y]},
            "synthetic": {"features": syn.numpy(), "labels": [remap[int(y)] for y in syn_y]}}


def _curves(store: FeatureStore, job: Job, heads: dict[str, Any],
            seeds: list[int]) -> dict[str, dict[str, list[Any]]]:
    """Training losses, one panel per trained head (named as in the table, so it keeps the
    method's colour) and one for the SHIP generator, one series per seed."""
    out: dict[str, dict[str, list[Any]]] = {}
    for seed, key in zip(seeds, job.inputs.get("generators", []), strict=False):
        gen = store.lookup(Ref.of(GENERATOR, key))
        if gen is not None:
            out.setdefault("SHIP generator", {})[f"seed {seed}"] = [
                e["loss"] for e in attrs_of(gen)["log"]]
    for method, head in heads.items():
        for seed, key in zip(seeds, head["keys"], strict=True):
            group = store.lookup(Ref.of(ADAPTER, key)) if head["kind"] == ADAPTER.name and key \
                else None
            if group is not None and attrs_of(group).get("log"):
                out.setdefault(method, {})[f"seed {seed}"] = [e["loss"] for e in
                                                              attrs_of(group)["log"]]
    return out


STAGE = Stage(name="report", kind=REPORT, scope=Scope.DATASET, declare=declare, compute=compute,
              missing=missing, stored=False,
              summary="the HTML report of a run, beside the manifest")
