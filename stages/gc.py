"""`store gc`: collect the garbage of the manifest's working store. The plan says what is current
(every job's key and the text sets the datasets read); `pipeline.collect` finds the rest and
removes it under the writer lock. `--dry-run` lists exactly what a gc would remove, reading only.
Upstream stores are read (an input there is not gone), never written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..pipeline.artifacts import FOLDER_KINDS
from ..pipeline.collect import REASONS, Wanted, collect, remove
from ..pipeline.errors import StoreReadOnlyError, UsageError
from ..pipeline.manifest import Manifest
from ..pipeline.progress import Progress
from ..pipeline.store import FeatureStore
from .base import Environment
from .runner import Request, build_plan
from .summaries import Summary


def gc(manifest: Manifest, *, dry_run: bool, grace_seconds: float, device: str = "auto",
       progress: Progress | None = None, cache_dir: Path | None = None) -> Summary:
    env = Environment(manifest, device, progress, cache_dir)
    try:
        store = FeatureStore.open(manifest.store, read_only=dry_run,
                                  options=manifest.store_options, upstreams=manifest.upstreams)
    except StoreReadOnlyError as exc:
        raise StoreReadOnlyError(f"store gc: {exc}") from None
    with store:
        if "published" in store.root.attrs:  # a dry run opens read-only, which a published allows
            raise StoreReadOnlyError(f"store gc: {manifest.store} is a published store, which "
                                     "never changes: there is nothing to collect")
        plan = build_plan(env, store, Request())
        for name, error in plan.broken.items():  # what it plans is what gc keeps: all of it
            raise UsageError(f"store gc: dataset {name} cannot be planned, so what it still needs "
                             f"is unknown ({error}); fix it or remove it from the manifest first")
        wanted = Wanted({j.id: j.key for j in plan.jobs.values() if j.kind in FOLDER_KINDS},
                        frozenset(plan.texts))
        found = collect(store, wanted, grace_seconds, swept=None if dry_run else store.swept)
        if not dry_run:
            remove(store, found)
    by_reason: dict[str, dict[str, Any]] = {}
    for r in found.removals:
        entry = by_reason.setdefault(r.reason, {"items": 0, "bytes": 0})
        entry["items"] += 1
        entry["bytes"] += r.bytes
    return {"stage": "gc", "store": manifest.store, "dry_run": dry_run,
            "grace_seconds": grace_seconds, "removed": [r.to_dict() for r in found.removals],
            "bytes_freed": found.bytes,
            "by_reason": {k: by_reason[k] for k in REASONS if k in by_reason},
            "kept": found.kept, "within_grace": found.within_grace, "skipped": found.skipped}
