"""shipyard's command line: the only module that imports typer or prints for people.

Every command builds its options, calls one stage, and reports: a short text on stdout, or with
--json exactly one JSON object. Progress and logs go to stderr. Exit codes: 0 done, 1 failure,
2 bad usage or bad manifest (nothing written).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from pipeline.errors import ShipyardError
from pipeline.manifest import Manifest, load_manifest
from pipeline.models import Device
from pipeline.progress import Progress, Task

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Feature-cache pipeline for SHIP: CLIP features in Zarr, synthesized "
                       "features, adapters and Tip-Adapter caches.")
store_app = typer.Typer(no_args_is_help=True, help="Inspect and check a feature store.")
app.add_typer(store_app, name="store")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
DatasetOpt = Annotated[list[str] | None, typer.Option(
    "--dataset", "-d", help="Only this manifest dataset (repeatable). Default: all.")]


@dataclass(frozen=True)
class Globals:
    manifest: Path
    store: str | None  # overrides the manifest's store location
    device: Device
    verbosity: int  # -1 quiet, 0 normal, 1+ verbose

    def load(self) -> Manifest:
        return load_manifest(self.manifest, store_override=self.store)

    def store_location(self) -> tuple[str, dict[str, Any]]:
        """--store if given (no manifest needed), else the manifest's store."""
        if self.store:
            return self.store, {}
        m = self.load()
        return m.store, m.store_options


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time of each record (in-process test runners
    swap it), not to the stream that was current when logging was configured."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


class _DropRandomWeightsWarning(logging.Filter):
    """open_clip warns on every random-weights model; shipyard reports that itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No pretrained weights loaded")


class _BarTask:
    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def note(self, text: str) -> None:
        self.bar.set_postfix_str(text)

    def close(self) -> None:
        self.bar.close()


class BarProgress:
    """Progress bars on stderr (tqdm shows the rate, e.g. images/s)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled

    def task(self, description: str, total: int | None, unit: str) -> Task:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=description, unit=unit, file=sys.stderr,
                   disable=not self.enabled, dynamic_ncols=True, leave=False)
        return _BarTask(bar)


def _progress(g: Globals) -> Progress:
    return BarProgress(enabled=g.verbosity >= 0 and sys.stderr.isatty())


@app.callback()
def main(
    ctx: typer.Context,
    manifest: Annotated[Path, typer.Option(help="Manifest file.")] = Path("data_manifest.yaml"),
    store: Annotated[str | None, typer.Option(
        help="Store location: a path or an fsspec URL (s3://bucket/team.zarr). "
             "Overrides the manifest.")] = None,
    device: Annotated[Device, typer.Option(help="Where models run.")] = Device.AUTO,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logs.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, warnings only.")] = False,
) -> None:
    verbosity = -1 if quiet else verbose
    level = logging.DEBUG if verbosity > 1 else logging.INFO if verbosity == 1 else logging.WARNING
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_DropRandomWeightsWarning())
    root.addHandler(handler)
    root.setLevel(level)
    # aiohttp sessions of fsspec backends complain on interpreter exit after a failed request;
    # the one-line error already said what failed.
    logging.getLogger("asyncio").setLevel(logging.DEBUG if verbosity > 1 else logging.CRITICAL)
    ctx.obj = Globals(manifest=manifest, store=store, device=device, verbosity=verbosity)


Summary = dict[str, Any]


def _run(as_json: bool, work: Callable[[], Summary], human: Callable[[Summary], str],
         ok: Callable[[Summary], bool] = lambda _: True) -> None:
    """Run a command body; report its summary; map shipyard errors to exit codes."""
    try:
        summary = work()
    except ShipyardError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
    except KeyboardInterrupt:
        typer.echo("interrupted: committed work is kept; run the command again to resume", err=True)
        raise typer.Exit(130) from None
    typer.echo(json.dumps(summary) if as_json else human(summary))
    if not ok(summary):
        raise typer.Exit(1)


@app.command()
def extract(
    ctx: typer.Context,
    dataset: DatasetOpt = None,
    strict: Annotated[bool, typer.Option(help="Stop at the first unusable image.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Encode the manifest's images and class names; only what the store lacks."""
    from stages import extract as stage

    g: Globals = ctx.obj
    opts = stage.ExtractOptions(datasets=tuple(dataset or ()), strict=strict, device=g.device)
    _run(as_json, lambda: stage.run(g.load(), opts, _progress(g)), _extract_text)


def _extract_text(s: dict[str, Any]) -> str:
    lines = [
        f"extract: {s['images']} images: {s['extracted']} extracted, {s['reused']} reused, "
        f"{s['failed']} failed ({s['seconds']:.1f} s, {s['images_per_second']:.1f} images/s)",
        f"  views: {s['views_extracted']} images augmented; text sets: {s['texts_extracted']} new",
        f"  extractor {s['extractor'][:12]} in {s['store']}",
    ]
    lines += [f"  failed: {f['path']}: {f['reason']}" for f in s["failures"][:50]]
    if len(s["failures"]) > 50:
        lines.append(f"  ... and {len(s['failures']) - 50} more (--json lists all)")
    return "\n".join(lines)


class Method(StrEnum):
    LINEAR_PROBE = "linear-probe"
    CLIP_ADAPTER = "clip-adapter"
    COOP = "coop"
    TIP_ADAPTER_F = "tip-adapter-f"


class IndexKind(StrEnum):
    FLAT = "flat"
    IVF = "ivf"
    HNSW = "hnsw"


SeedOpt = Annotated[list[int] | None, typer.Option(
    "--seed", help="Only this few-shot seed (repeatable). Default: the dataset's seeds.")]


@app.command("train-generator")
def train_generator(
    ctx: typer.Context,
    dataset: DatasetOpt = None,
    seed: SeedOpt = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Override ship.epochs.")] = None,
    force: Annotated[bool, typer.Option(help="Retrain even if up to date.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the SHIP generator on each dataset's base-class K-shot features."""
    from stages import train_generator as stage

    g: Globals = ctx.obj
    opts = stage.TrainGeneratorOptions(datasets=tuple(dataset or ()), seeds=tuple(seed or ()),
                                       epochs=epochs, device=g.device, force=force)
    _run(as_json, lambda: stage.run(g.load(), opts, _progress(g)), _generator_text)


def _generator_text(s: Summary) -> str:
    lines = [f"train-generator on {s['device']}:"]
    for r in s["generators"]:
        final = ", ".join(f"{k} {v:.4f}" for k, v in r["final"].items())
        lines.append(f"  {r['dataset']} seed {r['seed']}: {r['status']}, {r['epochs_run']} epochs "
                     f"in {r['seconds']:.1f} s ({final}); generator {r['generator'][:12]}")
    return "\n".join(lines)


@app.command()
def synthesize(
    ctx: typer.Context,
    dataset: DatasetOpt = None,
    seed: SeedOpt = None,
    classes: Annotated[str | None, typer.Option(
        help="new, base, all, or comma-separated class names. Default: ship.synthesize.classes.")
    ] = None,
    per_class: Annotated[int | None, typer.Option(min=1, help="Samples per class.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Sample synthetic features per class from the trained generators into the store."""
    from stages import synthesize as stage

    g: Globals = ctx.obj
    chosen = tuple(c.strip() for c in classes.split(",")) if classes else ()
    opts = stage.SynthesizeOptions(datasets=tuple(dataset or ()), seeds=tuple(seed or ()),
                                   classes=chosen, per_class=per_class, device=g.device)
    _run(as_json, lambda: stage.run(g.load(), opts, _progress(g)), _synthesize_text)


def _synthesize_text(s: Summary) -> str:
    lines = [f"synthesize: {s['per_class']} features per class"]
    for r in s["sets"]:
        lines.append(f"  {r['dataset']} seed {r['seed']}: {r['classes']} classes, "
                     f"{r['synthesized']} sampled, {r['reused']} reused; "
                     f"synthetic {r['synthetic'][:12]}")
    return "\n".join(lines)


SyntheticOpt = Annotated[str, typer.Option(
    help="Synthesized features to add: none, auto (this manifest's synthetic set) or a fingerprint.")]


@app.command("train-adapter")
def train_adapter(
    ctx: typer.Context,
    method: Annotated[Method, typer.Option(help="The head to train.")],
    synthetic: SyntheticOpt = "none",
    dataset: DatasetOpt = None,
    seed: SeedOpt = None,
    force: Annotated[bool, typer.Option(help="Retrain even if up to date.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a head on cached real (+ synthesized) features."""
    from stages import train_adapter as stage

    g: Globals = ctx.obj
    opts = stage.TrainAdapterOptions(method=method.value, synthetic=synthetic,
                                     datasets=tuple(dataset or ()), seeds=tuple(seed or ()),
                                     device=g.device, force=force)
    _run(as_json, lambda: stage.run(g.load(), opts, _progress(g)), _adapter_text)


def _adapter_text(s: Summary) -> str:
    lines = [f"train-adapter {s['method']}:"]
    for r in s["adapters"]:
        syn = f", synthetic {r['synthetic'][:12]}" if r["synthetic"] else ""
        lines.append(f"  {r['dataset']} seed {r['seed']}: {r['status']}{syn} "
                     f"({r['seconds']:.1f} s); adapter {r['adapter'][:12]}")
    return "\n".join(lines)


@app.command("build-cache")
def build_cache(
    ctx: typer.Context,
    synthetic: SyntheticOpt = "none",
    index: Annotated[IndexKind | None, typer.Option(
        help="flat (exact) or an approximate top-k index. Default: heads.cache_index.")] = None,
    topk: Annotated[int | None, typer.Option(min=1, help="Neighbours (approximate modes).")] = None,
    dataset: DatasetOpt = None,
    seed: SeedOpt = None,
    force: Annotated[bool, typer.Option(help="Rebuild even if up to date.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build Tip-Adapter caches (keys, values, FAISS index; alpha/beta searched on val)."""
    from stages import build_cache as stage

    g: Globals = ctx.obj
    opts = stage.BuildCacheOptions(synthetic=synthetic, index=index.value if index else None,
                                   topk=topk, datasets=tuple(dataset or ()),
                                   seeds=tuple(seed or ()), device=g.device, force=force)
    _run(as_json, lambda: stage.run(g.load(), opts, _progress(g)), _cache_text)


def _cache_text(s: Summary) -> str:
    lines = [f"build-cache ({s['index']}):"]
    for r in s["caches"]:
        agree = r.get("agreement")
        extra = f", top-1 agreement with exact {agree['top1_agreement']:.3f}" if agree else ""
        lines.append(f"  {r['dataset']} seed {r['seed']}: {r['status']}, {r['keys']} keys, "
                     f"alpha {r['alpha']:.2f}, beta {r['beta']:.2f}{extra}; cache {r['cache'][:12]}")
    return "\n".join(lines)


@app.command()
def evaluate(
    ctx: typer.Context,
    dataset: DatasetOpt = None,
    seed: SeedOpt = None,
    report_dir: Annotated[Path | None, typer.Option(
        help="Where the HTML reports go. Default: reports/ beside the manifest.")] = None,
    adapter: Annotated[str | None, typer.Option(help="Evaluate this stored adapter only.")] = None,
    cache: Annotated[str | None, typer.Option(help="Evaluate this stored cache only.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Base / new / H, GZSL and per-class accuracy of every head, mean over seeds."""
    from stages import evaluate as stage

    g: Globals = ctx.obj
    opts = stage.EvaluateOptions(datasets=tuple(dataset or ()), seeds=tuple(seed or ()),
                                 device=g.device, report_dir=report_dir, adapter=adapter,
                                 cache=cache)
    _run(as_json, lambda: stage.run(g.load(), opts, _progress(g)), _evaluate_text)


def _evaluate_text(s: Summary) -> str:
    lines = [f"evaluate (protocol {s['protocol']}):", *(f"  note: {n}" for n in s["notes"])]
    for d in s["datasets"]:
        lines.append(f"  {d['name']}: report {d['report']}")
        lines.append(f"    {'method':22}{'base':>8}{'new':>8}{'H':>8}   "
                     f"{'seen':>8}{'unseen':>8}{'H':>8}")
        for r in d["table"]:
            lines.append(f"    {r['method']:22}{r['base']:8.2f}{r['new']:8.2f}{r['h']:8.2f}   "
                         f"{r['gzsl_seen']:8.2f}{r['gzsl_unseen']:8.2f}{r['gzsl_h']:8.2f}")
    return "\n".join(lines)


@app.command()
def status(ctx: typer.Context, dataset: DatasetOpt = None, as_json: JsonOpt = False) -> None:
    """Show what the store holds for the manifest, and what is stale and why."""
    from stages import status as stage

    g: Globals = ctx.obj
    opts = stage.StatusOptions(datasets=tuple(dataset or ()), device=g.device)
    _run(as_json, lambda: stage.run(g.load(), opts, _progress(g)), _status_text)


def _status_text(s: dict[str, Any]) -> str:
    head = f"store {s['store']}, extractor {s['extractor'][:12]}: "
    if "reason" in s:
        return head + "stale\n  " + s["reason"]
    lines = [head + ("up to date" if s["up_to_date"] else "stale")]
    for d in s["datasets"]:
        state = "up to date" if not d["stale"] else "; ".join(d["stale"])
        lines.append(f"  {d['name']}: {d['records']} records, {d['unusable']} unusable: {state}")
    return "\n".join(lines)


@app.command()
def run(ctx: typer.Context, dataset: DatasetOpt = None, as_json: JsonOpt = False) -> None:
    """Run every stage in order; up-to-date work is skipped."""
    from stages import runner

    g: Globals = ctx.obj
    _run(as_json, lambda: runner.run_all(g.load(), tuple(dataset or ()), g.device, _progress(g)),
         _run_text)


def _run_text(s: dict[str, Any]) -> str:
    return "\n".join(f"[{name}]\n" + _STAGE_TEXT[name](out) for name, out in s["stages"].items())


@store_app.command("info")
def store_info(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Summarise a store: extractors, row counts, datasets."""
    from pipeline.audit import info
    from pipeline.store import FeatureStore

    g: Globals = ctx.obj

    def work() -> dict[str, Any]:
        location, options = g.store_location()
        with FeatureStore.open(location, read_only=True, options=options) as store:
            return info(store)

    _run(as_json, work, _info_text)


def _info_text(s: dict[str, Any]) -> str:
    lines = [f"store {s['store']} (format {s['format']}, created {s['created']})"]
    for e in s["extractors"]:
        lines.append(f"  extractor {e['fp'][:12]}: {e['model']} (weights {e['weights_sha256'][:12]}), "
                     f"D={e['dim']}, {e['images']} images, {e['view_rows']} x {e['views']} views, "
                     f"{e['text_sets']} text sets")
    for d in s["datasets"]:
        splits = ", ".join(f"{k} {v}" for k, v in d["splits"].items())
        lines.append(f"  dataset {d['name']}: {d['records']} records ({splits}), {d['classes']} "
                     f"classes, {d['failures']} failures")
    return "\n".join(lines)


@store_app.command("verify")
def store_verify(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Check integrity: finite unit-norm rows, fingerprints, unique keys. Exit 1 on any problem."""
    from pipeline.audit import verify
    from pipeline.store import FeatureStore

    g: Globals = ctx.obj

    def work() -> dict[str, Any]:
        location, options = g.store_location()
        with FeatureStore.open(location, read_only=True, options=options) as store:
            v = verify(store)
        return {"store": location, "ok": v.ok, "checked": v.checked, "problems": v.problems}

    def text(s: dict[str, Any]) -> str:
        counts = ", ".join(f"{n} {k}" for k, n in s["checked"].items()) or "nothing"
        head = f"verify {s['store']}: {'ok' if s['ok'] else 'FAILED'} (checked {counts})"
        return "\n".join([head, *(f"  problem: {p}" for p in s["problems"])])

    _run(as_json, work, text, ok=lambda s: bool(s["ok"]))


_STAGE_TEXT: dict[str, Callable[[Any], str]] = {
    "extract": _extract_text, "train-generator": _generator_text, "synthesize": _synthesize_text,
    "train-adapter": lambda runs: "\n".join(_adapter_text(r) for r in runs),
    "build-cache": lambda runs: "\n".join(_cache_text(r) for r in runs),
    "evaluate": _evaluate_text}


if __name__ == "__main__":
    app()
