"""`store gc` on the demo after ten template changes: the bytes the changes superseded, the bytes
gc frees (target: at least 90% of the superseded bytes), whether `--dry-run` listed exactly what
gc removed, and the jobs the next `run` recomputes (target: none). Sizes are the stored files'
bytes, summed before and after, side by side in one run.

    python bench/gc.py                 # about 2.5 minutes on a 2-core CPU
    python bench/gc.py --changes 3     # fewer template changes
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shipyard.cli import app  # noqa: E402
from typer.testing import CliRunner  # noqa: E402


def demo_manifest(work: Path) -> Path:
    """The demo manifest with its paths made absolute and its store under `work`."""
    data = yaml.safe_load((ROOT / "data_manifest.yaml").read_text())
    data["store"] = str(work / "store.zarr")
    pretrained = data["model"].get("pretrained")
    if pretrained and (ROOT / pretrained).exists():
        data["model"]["pretrained"] = str(ROOT / pretrained)
    for d in data["datasets"]:
        for key in ("root", "split_file"):
            if d.get(key):
                d[key] = str(ROOT / d[key])
    path = work / "demo.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def cli(manifest: Path, *args: str) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["--manifest", str(manifest), "--device", "cpu", "--quiet",
                                      *args, "--json"])
    seconds = time.perf_counter() - start
    if result.exit_code:
        sys.exit(f"{' '.join(args)}: exit {result.exit_code}: {result.stderr.strip()}")
    out: dict[str, Any] = json.loads(result.stdout)
    return out, seconds


def stored_bytes(store: Path) -> int:
    return sum(p.stat().st_size for p in store.rglob("*") if p.is_file())


def recomputed(run: dict[str, Any]) -> list[str]:
    return [j["id"] for j in run["jobs"] if j["status"] != "up to date"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--changes", type=int, default=10, help="template changes before gc")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shipyard-gc-"))
    manifest = demo_manifest(work)
    store = work / "store.zarr"
    print("running the demo ...", file=sys.stderr, flush=True)
    _, first = cli(manifest, "run")
    start_bytes = stored_bytes(store)
    change_seconds = []
    for i in range(1, args.changes + 1):
        data = yaml.safe_load(manifest.read_text())
        data["datasets"][0]["templates"] = [f"a photo of a {{}}, clothing variant {i}."]
        manifest.write_text(yaml.safe_dump(data, sort_keys=False))
        out, seconds = cli(manifest, "run")
        if not recomputed(out):
            sys.exit(f"template change {i} recomputed nothing")
        change_seconds.append(seconds)
    grown = stored_bytes(store)
    superseded = grown - start_bytes
    dry, dry_s = cli(manifest, "store", "gc", "--dry-run")
    if stored_bytes(store) != grown:
        sys.exit("the dry run changed the store")
    real, gc_s = cli(manifest, "store", "gc")
    after = stored_bytes(store)
    rerun, rerun_s = cli(manifest, "run")
    kinds = Counter(r["kind"] for r in real["removed"])
    print(f"demo run {first:.1f} s; {args.changes} template changes, {min(change_seconds):.1f}-"
          f"{max(change_seconds):.1f} s each")
    print(f"{'store bytes':<34}{'bytes':>12}")
    print(f"{'after the first run':<34}{start_bytes:>12,}")
    print(f"{f'after {args.changes} template changes':<34}{grown:>12,}")
    print(f"{'after gc':<34}{after:>12,}")
    print(f"superseded by the changes: {superseded:,} bytes ({superseded / args.changes:,.0f} per "
          "change)")
    print(f"gc freed (reported):       {real['bytes_freed']:,} bytes in {len(real['removed'])} "
          f"items ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})")
    print(f"gc freed (measured):       {grown - after:,} bytes")
    print(f"freed / superseded = {real['bytes_freed'] / superseded:.3f} (target >= 0.90)")
    print(f"dry run ({dry_s:.2f} s) listed exactly what gc ({gc_s:.2f} s) removed: "
          f"{dry['removed'] == real['removed']}")
    print(f"next run ({rerun_s:.1f} s) recomputed {len(recomputed(rerun))} jobs (target 0)")


if __name__ == "__main__":
    main()
