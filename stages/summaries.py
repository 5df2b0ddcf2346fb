"""What each command reports: its jobs' results folded into one JSON-able summary per stage (the
shape `--json` prints and the CLI's text rendering reads)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..pipeline.datasets import protocol_warnings
from ..pipeline.identity import model_notes
from ..pipeline.recipes import describe_selections, index_notes, method_notes, tip_init
from ..pipeline.registry import tunes_on_val
from .base import Environment
from .runner import Plan, Result

Summary = dict[str, Any]


def _entry(r: Result, name: str) -> Summary:
    return {"dataset": r.job.dataset, "seed": r.job.seed, name: r.job.key, "status": r.status,
            "seconds": round(r.seconds, 3)}


def extract_summary(results: list[Result], plan: Plan, env: Environment) -> Summary:
    built = [r.summary for r in results if r.status != "up to date"]
    if built:
        return built[0]
    planned = [plan.datasets[r.job.dataset] for r in results]
    distinct = {k for d in planned for _, k in d.plan.hashed()}
    failures = [f.to_dict() for d in planned for f in d.plan.failures]
    failures += [f for d in planned for f in d.known_failures]
    return {"stage": "extract", "extractor": plan.extractor, "store": env.manifest.store,
            "datasets": [d.spec.name for d in planned], "records_updated": [],
            "images": len(distinct), "extracted": 0, "reused": len(distinct),
            "failed": len(failures), "failures": failures, "views_extracted": 0,
            "views_failed": 0, "texts_extracted": 0, "seconds": 0.0, "images_per_second": 0.0,
            "model_seconds": 0.0, "timings": {}}


def generator_summary(results: list[Result], plan: Plan, env: Environment) -> Summary:
    from .train_generator import final_loss

    rows = []
    for r in results:
        row = {**_entry(r, "generator"), "epochs_run": 0, "resumed_from_epoch": 0}
        if r.status == "up to date":
            row["final"] = final_loss(r.summary.get("log", []))
        else:
            row.update({k: r.summary[k] for k in ("epochs_run", "resumed_from_epoch", "final")})
            row["status"] = r.summary["status"]
        rows.append(row)
    return {"stage": "train-generator", "extractor": plan.extractor, "device": env.device_name,
            "generators": rows}


def synthetic_summary(results: list[Result], plan: Plan, env: Environment) -> Summary:
    rows = []
    for r in results:
        row = {**_entry(r, "synthetic"), "generator": r.job.inputs["generator"],
               "classes": len(r.job.detail), "synthesized": 0, "reused": len(r.job.detail)}
        if r.status != "up to date":
            row.update({k: r.summary[k] for k in ("classes", "synthesized", "reused")})
        rows.append(row)
    per_class = results[0].job.params["per_class"] if results else None
    return {"stage": "synthesize", "extractor": plan.extractor, "per_class": per_class,
            "sets": rows}


def adapter_summary(results: list[Result], plan: Plan, env: Environment) -> Summary:
    rows = []
    for r in results:
        row = {**_entry(r, "adapter"), "method": r.job.method,
               "synthetic": r.job.inputs.get("synthetic"),
               "selected_epoch": r.summary.get("selected_epoch")}
        if r.job.params.get("domain"):  # SYNC-CLIP's synthetic domain: a paired dataset
            row["domain"] = r.job.params["domain"]
        for k in ("final_loss", "final_align", "prompt_depth", "resumed_from_epoch", "alpha",
                  "beta", "c", "val_accuracy"):
            if k in r.summary:
                row[k] = r.summary[k]
        rows.append(row)
    methods = sorted({r.job.method for r in results if r.job.method})
    return {"stage": "train-adapter", "methods": methods, "adapters": rows}


def cache_summary(results: list[Result], plan: Plan, env: Environment) -> Summary:
    rows = []
    for r in results:
        rows.append({**_entry(r, "cache"), "method": r.job.method,
                     **{k: r.summary.get(k) for k in ("keys", "alpha", "beta", "val_accuracy",
                                                      "agreement")}})
    first = results[0].job.params if results else {}
    return {"stage": "build-cache", "index": first.get("index"), "topk": first.get("topk"),
            "caches": rows}


def evaluate_summary(results: list[Result], plan: Plan, env: Environment) -> Summary:
    reports = {r.job.dataset: str(r.job.detail) for r in results
               if r.job.stage == "report" and r.status != "failed"}
    failed = {r.job.dataset: r.summary["error"] for r in results
              if r.job.stage == "report" and r.status == "failed"}
    datasets = []
    protocol = env.manifest.heads.protocol.value
    for r in results:
        if r.job.stage != "evaluate":
            continue
        table = [{k: v for k, v in row.items() if k != "per_class"}
                 for row in r.summary.get("table", [])]
        protocol = r.job.params["protocol"]
        planned = plan.datasets[r.job.dataset]
        warnings = protocol_warnings(planned.facts.base, planned.facts.new,
                                     planned.attrs["splits"]["val"],
                                     tunes_on_val(r.job.inputs["heads"]),
                                     tip_init(env.manifest, planned.spec))
        datasets.append({"name": r.job.dataset, "run": r.job.key, "status": r.status,
                         "table": table, "report": reports.get(r.job.dataset),
                         "selection": describe_selections(r.job.params.get("selections", {})),
                         "transfer_from": r.job.params.get("transfer_from"),
                         "warnings": warnings, "cache_notes": index_notes(table),
                         **({"report_error": failed[r.job.dataset]} if r.job.dataset in failed
                            else {}),
                         "seconds": round(r.seconds, 3)})
    methods = {m for r in results for m in r.job.inputs.get("heads", {})}
    return {"stage": "evaluate", "protocol": protocol,
            "notes": model_notes(env.manifest.model) + method_notes(sorted(methods)),
            "datasets": datasets}


SUMMARIES: dict[str, Callable[[list[Result], Plan, Environment], Summary]] = {
    "extract": extract_summary, "train-generator": generator_summary,
    "synthesize": synthetic_summary, "train-adapter": adapter_summary,
    "build-cache": cache_summary, "evaluate": evaluate_summary}
# The report is part of evaluate's summary.
FOLDED = {"report": "evaluate"}


def summarize(results: list[Result], plan: Plan, env: Environment) -> dict[str, Summary]:
    """Per stage (in pipeline order), the summary of its results."""
    by_stage: dict[str, list[Result]] = {}
    for r in results:
        by_stage.setdefault(FOLDED.get(r.job.stage, r.job.stage), []).append(r)
    return {name: SUMMARIES[name](rs, plan, env) for name, rs in by_stage.items()}
