"""shipyard's command line: the only module that imports typer or prints for people.

Every command builds its options, calls one stage, and reports: a short text on stdout, or with
--json exactly one JSON object. Progress and logs go to stderr. Exit codes: 0 done, 1 failure,
2 bad usage or bad manifest (nothing written).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeAlias

import typer

from . import cli_text
from .pipeline import registry
from .pipeline.errors import ShipyardError, UsageError
from .pipeline.locations import is_url
from .pipeline.manifest import Device, Manifest
from .pipeline.manifest_files import load_manifest
from .pipeline.progress import LogProgress, Progress, Silent, Task

HELP = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  context_settings=HELP,
                  help="Feature-cache pipeline for SHIP: CLIP features in Zarr, synthesized "
                       "features, adapters and Tip-Adapter caches.")
store_app = typer.Typer(no_args_is_help=True, context_settings=HELP,
                        help="Inspect and check a feature store.")
manifest_app = typer.Typer(no_args_is_help=True, context_settings=HELP,
                           help="Work with manifests.")
app.add_typer(store_app, name="store")
app.add_typer(manifest_app, name="manifest")


@dataclass(frozen=True)
class Globals:
    manifest: Path
    store: str | None  # overrides the manifest's store location
    device: Device
    verbosity: int  # -1 quiet, 0 normal, 1+ verbose

    def __post_init__(self) -> None:
        # A command-line path is relative to the current folder, for every command alike (the
        # manifest's own `store:` is relative to the manifest's folder).
        if self.store:
            object.__setattr__(self, "store", _absolute(self.store))

    def load(self) -> Manifest:
        return load_manifest(self.manifest, store_override=self.store)

    def store_location(self) -> tuple[str, dict[str, Any]]:
        """--store if given (no manifest needed), else the manifest's store."""
        if self.store:
            return self.store, {}
        m = self.load()
        return m.store, m.store_options


def _absolute(location: str) -> str:
    """A path relative to the current folder made absolute; a URL as it is."""
    return location if is_url(location) else str(Path(location).resolve())


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time of each record (in-process test runners
    swap it), not to the stream that was current when logging was configured."""

    @property
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


PROGRESS_SECONDS = "SHIPYARD_PROGRESS_SECONDS"  # seconds between progress records in logs


def _progress(g: Globals) -> Progress:
    """A live bar on a terminal; one-line records every few seconds when stderr is a file or a
    pipe (a CI log, `nohup`), so a long run never looks dead; nothing with --quiet."""
    if g.verbosity < 0:
        return Silent()
    if sys.stderr.isatty():
        return BarProgress(enabled=True)
    raw = os.environ.get(PROGRESS_SECONDS, "5")
    try:
        interval = float(raw)
    except ValueError:
        raise UsageError(f"{PROGRESS_SECONDS}={raw!r}: expected a number of seconds") from None
    if not interval > 0:
        raise UsageError(f"{PROGRESS_SECONDS}={raw!r}: expected a number of seconds > 0")
    return LogProgress(sys.stderr, interval)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"shipyard {version('shipyard')}")
        raise typer.Exit()


@app.callback()
def configure(
    ctx: typer.Context,
    manifest: Annotated[Path, typer.Option(help="Manifest file.")] = Path("data_manifest.yaml"),
    store: Annotated[str | None, typer.Option(
        help="Store location: a path or an fsspec URL (s3://bucket/team.zarr). "
             "Overrides the manifest.")] = None,
    device: Annotated[Device, typer.Option(help="Where models run.")] = Device.AUTO,
    verbose: Annotated[int, typer.Option("--verbose", "-v", count=True, help="More logs.")] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress, warnings only.")] = False,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_print_version,
                                          help="Print shipyard's version and exit.")] = False,
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


def _run(g: Globals, as_json: bool, work: Callable[[], Summary], human: Callable[[Summary], str],
         ok: Callable[[Summary], bool] = lambda _: True) -> None:
    """Run a command body and report its summary. Every failure is one line on stderr (and, with
    --json, one object on stdout) with its exit code: 2 bad usage, 1 anything else; -v adds the
    traceback."""
    try:
        summary = work()
    except KeyboardInterrupt:
        _fail(g, as_json, "interrupted: committed work is kept; run the command again to resume",
              130)
    except ShipyardError as exc:
        partial = getattr(exc, "summary", None)  # results kept before a refused write
        if partial is not None and not as_json:
            with suppress(Exception):  # best effort: the error line below is what matters
                typer.echo(human(partial))
        _fail(g, as_json, f"error: {exc}", exc.exit_code, partial)
    except Exception as exc:  # disk full, permissions, a damaged store: still one line
        text = str(exc).strip().splitlines()
        _fail(g, as_json, f"error: {type(exc).__name__}: {text[0] if text else 'no message'}", 1)
    typer.echo(json.dumps(summary) if as_json else human(summary))
    if not ok(summary):
        raise typer.Exit(1)


def _fail(g: Globals, as_json: bool, line: str, code: int,
          partial: Summary | None = None) -> NoReturn:
    if g.verbosity > 0:
        traceback.print_exc(file=sys.stderr)
    typer.echo(line, err=True)
    if as_json:
        typer.echo(json.dumps({**(partial or {}), "error": line.removeprefix("error: "),
                               "exit_code": code}))
    raise typer.Exit(code)


def _stage(g: Globals, stage: str, as_json: bool, request: Any,
           ok: Callable[[Summary], bool] = lambda _: True, **kwargs: Any) -> None:
    """The body of every stage command: plan, run the stage's stale jobs, report."""
    from .stages.commands import stage_command

    _run(g, as_json, lambda: stage_command(g.load(), stage, request, device=g.device,
                                        progress=_progress(g), **kwargs),
         cli_text.STAGE_TEXT[stage], ok)


def _reports_written(s: Summary) -> bool:
    """Exit 1 (after printing the results) when a report could not be written."""
    evaluation = s["stages"].get("evaluate", {}) if "stages" in s else s
    return not any("report_error" in d for d in evaluation.get("datasets", []))


def _request(dataset: list[str] | None, seed: list[int] | None = None,
             methods: tuple[str, ...] | None = None, **options: Any) -> Any:
    from .stages.runner import Request

    return Request(tuple(dataset or ()), tuple(seed or ()), methods,
                   {k: v for k, v in options.items() if v is not None})


def _choices(name: str, values: list[str]) -> type[StrEnum]:
    return StrEnum(name, {v: v for v in values})  # type: ignore[return-value]


# Choices come from the registries (presets/*.json), never from a list kept here. Type checkers
# see plain strings; typer sees enums and lists the choices in --help and in its errors.
if TYPE_CHECKING:
    HeadMethod: TypeAlias = str
    IndexKind: TypeAlias = str
    StageName: TypeAlias = str
else:
    HeadMethod = _choices("HeadMethod", [h.name for h in registry.heads().values()
                                         if h.stage == "train-adapter"])
    IndexKind = _choices("IndexKind", list(registry.cache_indexes()))
    StageName = _choices("StageName", ["extract", "train-generator", "synthesize",
                                       "train-adapter", "build-cache", "evaluate", "report"])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")]
WorkersOpt = Annotated[int | None, typer.Option(min=1, help=(
    "Encode images on N local dask worker processes (one torch thread each); the driver "
    "commits. Needs the `distributed` extra."))]
SchedulerOpt = Annotated[str | None, typer.Option(help=(
    "Encode images on an existing dask cluster (its scheduler address; default: "
    "$DASK_SCHEDULER_ADDRESS when set)."))]
DatasetOpt = Annotated[list[str] | None, typer.Option(
    "--dataset", "-d", help="Only this manifest dataset (repeatable). Default: all.")]
SeedOpt = Annotated[list[int] | None, typer.Option(
    "--seed", help="Only this few-shot seed (repeatable). Default: the dataset's seeds.")]
ForceOpt = Annotated[bool, typer.Option(help="Recompute even if up to date.")]
SyntheticOpt = Annotated[str, typer.Option(
    help="Synthesized features to add: none, auto (this manifest's synthetic set) or a key.")]


@app.command()
def extract(
    ctx: typer.Context,
    dataset: DatasetOpt = None,
    strict: Annotated[bool, typer.Option(help="Stop at the first unusable image.")] = False,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Encode the manifest's images and class names; only what the store lacks."""
    g: Globals = ctx.obj
    _run(g, as_json, lambda: _extract_on(g, workers, scheduler, strict, dataset),
         cli_text.STAGE_TEXT["extract"])


def _cluster(workers: int | None, scheduler: str | None) -> Any:
    from .pipeline.cluster import ClusterSpec

    return ClusterSpec.resolve(workers, scheduler)


def _extract_on(g: Globals, workers: int | None, scheduler: str | None, strict: bool,
                dataset: list[str] | None) -> Summary:
    from .stages.commands import stage_command

    return stage_command(g.load(), "extract", _request(dataset, methods=()), device=g.device,
                         progress=_progress(g), strict=strict, cluster=_cluster(workers, scheduler))


@app.command("train-generator")
def train_generator(
    ctx: typer.Context,
    dataset: DatasetOpt = None,
    seed: SeedOpt = None,
    epochs: Annotated[int | None, typer.Option(min=1, help="Override ship.epochs.")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the SHIP generator on each dataset's base-class K-shot features."""
    _stage(ctx.obj, "train-generator", as_json, _request(dataset, seed, (), epochs=epochs),
           force=force)


@app.command()
def synthesize(
    ctx: typer.Context,
    dataset: DatasetOpt = None,
    seed: SeedOpt = None,
    classes: Annotated[str | None, typer.Option(
        help="new, base, all, or comma-separated class names. Default: ship.synthesize.classes.")
    ] = None,
    per_class: Annotated[int | None, typer.Option(min=1, help="Samples per class.")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Sample synthetic features per class from the trained generators into the store."""
    chosen = tuple(c.strip() for c in classes.split(",")) if classes else None
    _stage(ctx.obj, "synthesize", as_json,
           _request(dataset, seed, (), classes=chosen, per_class=per_class), force=force)


def _with_synthetic(method: str, synthetic: str) -> tuple[tuple[str, ...], str | None]:
    """--synthetic none | auto | KEY -> the head to plan and an explicit synthetic set."""
    if synthetic == "none":
        return (method,), None
    return (method + registry.SHIP_SUFFIX,), None if synthetic == "auto" else synthetic


@app.command("train-adapter")
def train_adapter(
    ctx: typer.Context,
    method: Annotated[HeadMethod, typer.Option(help="The head to train.")],
    synthetic: SyntheticOpt = "none",
    dataset: DatasetOpt = None,
    seed: SeedOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train a head on cached real (+ synthesized) features."""
    methods, explicit = _with_synthetic(str(method), synthetic)
    _stage(ctx.obj, "train-adapter", as_json,
           _request(dataset, seed, methods, synthetic=explicit), force=force)


@app.command("build-cache")
def build_cache(
    ctx: typer.Context,
    synthetic: SyntheticOpt = "none",
    index: Annotated[IndexKind | None, typer.Option(help=(
        "flat (exact), an approximate top-k index, or classes (exact sums over candidate "
        "classes). Default: heads.cache_index."))] = None,
    topk: Annotated[int | None, typer.Option(min=1, help="Neighbours (ivf, hnsw).")] = None,
    candidates: Annotated[int | None, typer.Option(min=1, help=(
        "Candidate classes of the classes index. Default: heads.cache_candidates, else raised "
        "until val agreement reaches heads.cache_agreement."))] = None,
    dataset: DatasetOpt = None,
    seed: SeedOpt = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Build Tip-Adapter caches (keys, values, FAISS index; alpha/beta searched on val)."""
    methods, explicit = _with_synthetic("tip-adapter", synthetic)
    _stage(ctx.obj, "build-cache", as_json,
           _request(dataset, seed, methods, synthetic=explicit, index=str(index) if index else None,
                    topk=topk, candidates=candidates),
           force=force)


@app.command()
def evaluate(
    ctx: typer.Context,
    dataset: DatasetOpt = None,
    seed: SeedOpt = None,
    report_dir: Annotated[Path | None, typer.Option(
        help="Where the HTML reports go. Default: reports/ beside the manifest.")] = None,
    adapter: Annotated[str | None, typer.Option(help="Evaluate this stored adapter only.")] = None,
    cache: Annotated[str | None, typer.Option(help="Evaluate this stored cache only.")] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Base / new / H, GZSL and per-class accuracy of every head, mean over seeds; the report."""
    explicit = ("adapter", adapter) if adapter else ("cache", cache) if cache else None
    _stage(ctx.obj, "evaluate", as_json, _request(dataset, seed, explicit=explicit), force=force,
           report_dir=report_dir, ok=_reports_written)


@app.command()
def status(
    ctx: typer.Context,
    dataset: DatasetOpt = None,
    check: Annotated[bool, typer.Option(help="Exit 1 when anything is stale (for CI).")] = False,
    as_json: JsonOpt = False,
) -> None:
    """What the store holds for the manifest, and what is stale and why. Writes nothing."""
    from .stages.status import status as body

    g: Globals = ctx.obj
    _run(g, as_json, lambda: body(g.load(), _request(dataset), device=g.device,
                               progress=_progress(g)),
         cli_text.status_text, ok=lambda s: bool(s["up_to_date"]) or not check)


@app.command()
def run(
    ctx: typer.Context,
    dataset: DatasetOpt = None,
    dry_run: Annotated[bool, typer.Option(help="Print the plan; run nothing.")] = False,
    force: Annotated[StageName | None, typer.Option(help=(
        "Recompute this stage's jobs even if up to date."))] = None,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run every stage in order; up-to-date work is skipped."""
    from .stages import commands

    g: Globals = ctx.obj
    if dry_run:
        _run(g, as_json, lambda: commands.dry_run(g.load(), _request(dataset), device=g.device,
                                               progress=_progress(g)), cli_text.plan_text)
        return
    _run(g, as_json, lambda: commands.run_all(g.load(), _request(dataset), device=g.device,
                                           progress=_progress(g),
                                           force=str(force) if force else None,
                                           cluster=_cluster(workers, scheduler)),
         cli_text.run_text, ok=_reports_written)


@store_app.command("info")
def store_info(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Summarise a store: extractors, row counts, datasets, artefacts (and, with a manifest, the
    reports written for it)."""
    from .pipeline.audit import info, report_entries
    from .pipeline.report import report_folder
    from .pipeline.store import FeatureStore

    g: Globals = ctx.obj

    def work() -> dict[str, Any]:
        location, options = g.store_location()
        manifest = None if g.store else g.load()  # --store names one store alone
        upstreams = manifest.upstreams if manifest else []
        with FeatureStore.open(location, read_only=True, options=options, upstreams=upstreams,
                               empty_if_missing=True) as store:
            reports = report_entries(report_folder(manifest.path), store) if manifest else []
            return {**info(store.own()), "upstream": [info(u) for u in store.upstreams],
                    "reports": reports}

    _run(g, as_json, work, cli_text.info_text)


@store_app.command("verify")
def store_verify(
    ctx: typer.Context,
    upstreams: Annotated[bool, typer.Option(
        "--upstreams", help="Also verify every upstream store the manifest names (read-only).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check integrity: finite unit-norm rows, fingerprints, unique keys. Exit 1 on any problem."""
    from .pipeline.audit import verify
    from .pipeline.store import FeatureStore

    g: Globals = ctx.obj

    def work() -> dict[str, Any]:
        location, options = g.store_location()
        layers = [(location, options)]
        if upstreams:
            if g.store:
                raise UsageError("--upstreams reads the manifest's upstream stores; without "
                                 "--store, name the manifest (--manifest)")
            layers += g.load().upstreams
        checked: dict[str, int] = {}
        problems: list[str] = []
        for i, (where, opts) in enumerate(layers):
            with FeatureStore.open(where, read_only=True, options=opts) as store:
                v = verify(store)
            for what, n in v.checked.items():
                checked[what] = checked.get(what, 0) + n
            problems += [p if i == 0 else f"upstream {where}: {p}" for p in v.problems]
        return {"store": location, "ok": not problems, "checked": checked, "problems": problems,
                "layers": [where for where, _ in layers]}

    _run(g, as_json, work, cli_text.verify_text, ok=lambda s: bool(s["ok"]))


@store_app.command("publish")
def store_publish(
    ctx: typer.Context,
    source: Annotated[str, typer.Argument(help="the store to publish: a path or fsspec URL")],
    destination: Annotated[str, typer.Argument(
        help="where the copy goes (must not exist): a path or s3:// URL")],
    source_options: Annotated[str | None, typer.Option(
        help="fsspec options of the source, as JSON (default: the environment's credentials)")
    ] = None,
    destination_options: Annotated[str | None, typer.Option(
        help='fsspec options of the destination, as JSON, e.g. \'{"profile": "team-a"}\'')
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """An immutable copy for sharing: committed rows and complete artefacts only, sharded,
    dimension names on every array (xarray opens any group), consolidated metadata, verified."""
    from .pipeline.publish import publish

    g: Globals = ctx.obj

    def work() -> Summary:
        src_opts = _json_options("--source-options", source_options)
        dst_opts = _json_options("--destination-options", destination_options)
        return publish(_absolute(source), _absolute(destination), src_options=src_opts,
                       dst_options=dst_opts, progress=_progress(g))

    _run(g, as_json, work, cli_text.publish_text)


def _json_options(flag: str, text: str | None) -> dict[str, Any] | None:
    """fsspec storage options given on the command line as a JSON object."""
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{flag}: not JSON ({exc.msg} at character {exc.pos})") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag}: expected a JSON object of fsspec options, got "
                         f"{type(value).__name__}")
    return value


@store_app.command("gc")
def store_gc(
    ctx: typer.Context,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would be removed; change "
                                          "nothing.")] = False,
    grace: Annotated[str, typer.Option(help="Keep incomplete artefacts touched within this long "
                                       "(90s, 30m, 24h, 7d): an interrupted run may resume them."
                                       )] = "24h",
    as_json: JsonOpt = False,
) -> None:
    """Remove what the working store holds that nothing current needs: artefacts superseded by
    the manifest's (or a newer one), old records versions, orphans, stale incomplete artefacts,
    finished generators' checkpoints, rows past the committed count, killed writes' temporary
    files. Under the writer lock; refused on published stores; upstreams are never written."""
    from .pipeline.collect import parse_duration
    from .stages.gc import gc

    g: Globals = ctx.obj

    def work() -> Summary:
        try:
            seconds = parse_duration(grace)
        except ValueError as exc:
            raise UsageError(f"--grace {exc}") from None
        return gc(g.load(), dry_run=dry_run, grace_seconds=seconds, device=g.device,
                  progress=_progress(g))

    _run(g, as_json, work, cli_text.gc_text)


@store_app.command("unlock")
def store_unlock(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Remove the writer lock a killed writer left beside a store on S3 (only when that writer is
    gone: a live one cannot be told from a dead one there). Local locks die with their writer."""
    from .pipeline.locations import break_lock, lock_location

    g: Globals = ctx.obj

    def work() -> dict[str, Any]:
        location, options = g.store_location()
        holder = break_lock(location, options)
        return {"store": location, "lock": lock_location(location),
                "removed": holder is not None, "holder": holder}

    _run(g, as_json, work, cli_text.unlock_text)


@manifest_app.command("schema")
def manifest_schema() -> None:
    """Print the manifest's JSON Schema (for editors: yaml-language-server, VS Code, ...)."""
    from .pipeline.manifest_files import manifest_schema as schema

    typer.echo(json.dumps(schema(), indent=2))


@manifest_app.command("check")
def manifest_check(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Validate the manifest (and its datasets' split files) without touching the store."""
    from .pipeline.datasets import read_dataset

    g: Globals = ctx.obj

    def work() -> Summary:
        m = g.load()
        counts = {d.name: len(read_dataset(d).records) for d in m.datasets}
        return {"manifest": str(m.path), "ok": True, "datasets": counts}

    _run(g, as_json, work, lambda s: f"{s['manifest']}: ok ("
         + ", ".join(f"{k}: {v} records" for k, v in s["datasets"].items()) + ")")


def main() -> None:
    """Entry point of the `shipyard` script and `python -m shipyard`."""
    app()
