"""`evaluate`: base / new / H with restricted logits, GZSL and per-class accuracy for every head
of the manifest, averaged over seeds; results into `runs/<fp>`, a JSON summary and an HTML report."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from pipeline.errors import UsageError
from pipeline.fingerprint import fingerprint
from pipeline.heads import ZeroShot
from pipeline.manifest import Manifest
from pipeline.metrics import average_rows, base_new, gzsl, per_class_accuracy
from pipeline.progress import Progress, Silent
from pipeline.report import write_report
from pipeline.store import FeatureStore, attrs_of
from stages.base import StageSpec
from stages.build_cache import cache_description, load_cache
from stages.common import ModelContext, model_context, require_extractor, seeds_of
from stages.head_inputs import (
    HeadInputs,
    head_inputs,
    resolve_synthetic,
    synthetic_features,
    synthetic_fp,
)
from stages.train_adapter import adapter_fp, load_adapter

SPEC = StageSpec(
    name="evaluate",
    version=1,
    inputs=("adapters/<fp>", "caches/<fp>", "extractors/<fp>/images"),
    params=("heads.methods", "heads.protocol"),
    outputs=("runs/<fp>", "reports/<dataset>.html"),
    summary="base-to-new and GZSL accuracy of every head, mean over seeds, with an HTML report",
)


@dataclass(frozen=True)
class EvaluateOptions:
    datasets: tuple[str, ...] = ()
    seeds: tuple[int, ...] = ()
    device: str = "auto"
    report_dir: Path | None = None  # default: reports/ beside the manifest
    adapter: str | None = None  # evaluate this stored adapter instead of the manifest's heads
    cache: str | None = None  # evaluate this stored cache instead of the manifest's heads


def head_for(store: FeatureStore, ctx: ModelContext, manifest: Manifest, inputs: HeadInputs,
             method: str) -> tuple[nn.Module, str | None]:
    """The head a method name denotes for this dataset and seed, and its stored artefact."""
    base = method.removesuffix("+ship")
    synthetic = resolve_synthetic(store, ctx, manifest, inputs,
                                  "auto" if method.endswith("+ship") else "none")
    if base == "zero-shot":
        return ZeroShot(inputs.text), None
    if base == "tip-adapter":
        h = manifest.heads
        fp = fingerprint(cache_description(ctx, inputs, synthetic, h.cache_index, h.cache_topk,
                                           h.tip_scale))
        return load_cache(store, fp, ctx, inputs), fp
    fp = adapter_fp(ctx, manifest, inputs, base, synthetic)
    return load_adapter(store, fp, ctx, inputs), fp


@torch.no_grad()
def score(head: nn.Module, inputs: HeadInputs) -> dict[str, Any]:
    logits = torch.cat([head(x) for x in inputs.test.features.split(1024)]).float().cpu()
    labels = inputs.test.labels.cpu()
    row = base_new(logits, labels, inputs.base, inputs.new)
    g = gzsl(logits, labels, inputs.base, inputs.new)
    per_class = {**per_class_accuracy(logits, labels, inputs.base, restrict=True),
                 **per_class_accuracy(logits, labels, inputs.new, restrict=True)}
    return {**row, "gzsl_seen": g["seen"], "gzsl_unseen": g["unseen"], "gzsl_h": g["h"],
            "per_class": {inputs.classnames[c]: v for c, v in per_class.items()}}


def run(manifest: Manifest, opts: EvaluateOptions,
        progress: Progress | None = None) -> dict[str, Any]:
    progress = progress or Silent()
    ctx = model_context(manifest, opts.device)
    out = []
    with FeatureStore.open(manifest.store, read_only=False, options=manifest.store_options) as store:
        ex = require_extractor(store, ctx)
        specs = [manifest.dataset(n) for n in opts.datasets] or list(manifest.datasets)
        for spec in specs:
            out.append(_evaluate_dataset(store, ctx, ex, manifest, spec, opts, progress))
    notes = [] if manifest.model.pretrained else [
        f"model {manifest.model.name} has random weights (no pretrained checkpoint): these numbers "
        "exercise the pipeline and say nothing about CLIP"]
    return {"stage": SPEC.name, "protocol": manifest.heads.protocol.value, "notes": notes,
            "datasets": out}


def _evaluate_dataset(store: FeatureStore, ctx: ModelContext, ex: Any, manifest: Manifest,
                      spec: Any, opts: EvaluateOptions, progress: Progress) -> dict[str, Any]:
    started = time.perf_counter()
    seeds = seeds_of(spec, opts.seeds)
    explicit = opts.adapter or opts.cache
    methods: list[str] = [explicit] if explicit else list(manifest.heads.methods)
    rows: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    used: dict[str, list[str | None]] = {m: [] for m in methods}
    task = progress.task(f"evaluate {spec.name}", len(seeds) * len(methods), "head")
    first: HeadInputs | None = None
    for seed in seeds:
        inputs = head_inputs(store, ex, spec, seed, ctx.clip.device)
        first = first or inputs
        for method in methods:
            head: nn.Module
            fp: str | None
            if opts.adapter and method == opts.adapter:
                head, fp = load_adapter(store, opts.adapter, ctx, inputs), opts.adapter
            elif opts.cache and method == opts.cache:
                head, fp = load_cache(store, opts.cache, ctx, inputs), opts.cache
            else:
                head, fp = head_for(store, ctx, manifest, inputs, method)
            rows[method].append({"seed": seed, **score(head, inputs)})
            used[method].append(fp)
            task.advance(1)
    task.close()
    table = [{"method": m, **_mean(rs), "seeds": len(rs)} for m, rs in rows.items()]
    desc = {"stage": SPEC.name, "version": SPEC.version, "extractor": ctx.extractor_fp,
            "dataset": spec.name, "seeds": list(seeds), "heads": used,
            "protocol": manifest.heads.protocol.value}
    fp = fingerprint(desc)
    group = store.create_artifact("runs", fp, desc)
    group.update_attributes({"table": table, "per_seed": rows})
    group.attrs["complete"] = True
    assert first is not None  # a dataset has at least one seed (the manifest checks it)
    extras = _figures(store, ctx, manifest, first, {m: u[0] for m, u in used.items()})
    report = _report(manifest, opts, spec.name, table, rows, extras)
    return {"name": spec.name, "run": fp, "table": [{k: v for k, v in r.items() if k != "per_class"}
                                                     for r in table],
            "report": str(report), "seconds": round(time.perf_counter() - started, 3)}


def _mean(rows: list[dict[str, Any]]) -> dict[str, Any]:
    numeric = [{k: v for k, v in r.items() if k not in ("seed", "per_class")} for r in rows]
    avg = average_rows(numeric)
    names = rows[0]["per_class"].keys()
    avg["per_class"] = {n: float(np.nanmean([r["per_class"][n] for r in rows])) for n in names}
    return avg


def _figures(store: FeatureStore, ctx: ModelContext, manifest: Manifest, inputs: HeadInputs,
             heads: dict[str, str | None]) -> dict[str, Any]:
    """The first seed's projection (real test vs synthesized features of the new classes) and
    training curves (generator loss, each trained head's loss), where the store has them."""
    out: dict[str, Any] = {"curves": {}}
    syn_fp = synthetic_fp(ctx, manifest, inputs)
    group = store.artifact("synthetic", syn_fp)
    if group is not None:
        gen_fp = attrs_of(group)["fingerprint"]["generator"]
        gen = store.artifact("generators", gen_fp)
        if gen is not None:
            out["curves"][f"SHIP generator loss (seed {inputs.seed})"] = [
                e["loss"] for e in attrs_of(gen)["log"]]
        try:
            syn, syn_y = synthetic_features(store, syn_fp, inputs, torch.device("cpu"))
        except UsageError:
            syn = None
        if syn is not None:
            new = torch.isin(inputs.test.labels.cpu(), torch.tensor(inputs.new))
            real_x, real_y = inputs.test.features.cpu()[new], inputs.test.labels.cpu()[new]
            names = [inputs.classnames[c] for c in inputs.new]
            remap = {c: i for i, c in enumerate(inputs.new)}
            out["projection"] = {
                "classnames": names,
                "real": {"features": real_x.numpy(), "labels": [remap[int(y)] for y in real_y]},
                "synthetic": {"features": syn.numpy(), "labels": [remap[int(y)] for y in syn_y]}}
    for method, fp in heads.items():
        adapter = store.artifact("adapters", fp) if fp else None
        if adapter is not None and attrs_of(adapter).get("log"):
            out["curves"][f"{method} loss (seed {inputs.seed})"] = [
                e["loss"] for e in attrs_of(adapter)["log"]]
    return out


def _report(manifest: Manifest, opts: EvaluateOptions, dataset: str, table: list[dict[str, Any]],
            rows: dict[str, list[dict[str, Any]]], extras: dict[str, Any]) -> Path:
    folder = opts.report_dir or manifest.path.resolve().parent / "reports"
    notes = [] if manifest.model.pretrained else [
        "Random weights (no pretrained checkpoint): the numbers exercise the pipeline and say "
        "nothing about CLIP."]
    data = {
        "title": f"shipyard: {dataset}",
        "notes": notes,
        "protocol": f"{manifest.heads.protocol.value}; mean over seeds "
                    f"{', '.join(str(r['seed']) for r in next(iter(rows.values())))}",
        "table": [{k: r[k] for k in ("method", "base", "new", "h", "gzsl_seen", "gzsl_unseen",
                                     "gzsl_h", "seeds", "base_std", "new_std") if k in r}
                  for r in table],
        "per_class": {r["method"]: r["per_class"] for r in table},
        "projection": extras.get("projection"),
        "curves": extras["curves"] or None,
    }
    return write_report(data, folder / f"{dataset}.html")
