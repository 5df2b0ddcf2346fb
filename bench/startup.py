"""Start-up cost of the commands people run most, as whole processes, side by side in one run:
`python -c "import torch"` (the yardstick), `shipyard --help`, a first `shipyard status` (no cached
model identity: it builds the CLIP model once) and a second one (cached: no model, no torch).

    python bench/startup.py                 # the demo manifest, 5 runs each, medians
    python bench/startup.py --runs 9

Targets: `--help` under a quarter of the torch import, a second `status` under twice it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def timed(cmd: list[str], env: dict[str, str], runs: int, fresh_cache: Path | None = None) -> float:
    """Median wall seconds of `cmd` over `runs` runs (a fresh model-identity cache each run when
    `fresh_cache` is given)."""
    times = []
    for _ in range(runs):
        run_env = env
        if fresh_cache is not None:  # the image hashes stay cached: only the model is cold
            shutil.rmtree(fresh_cache, ignore_errors=True)
            fresh_cache.mkdir()
            shutil.copy2(Path(env["SHIPYARD_CACHE_DIR"]) / "stat.sqlite", fresh_cache)
            run_env = {**env, "SHIPYARD_CACHE_DIR": str(fresh_cache)}
        started = time.perf_counter()
        subprocess.run(cmd, env=run_env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per command (median shown)")
    parser.add_argument("--manifest", type=Path, default=ROOT / "data_manifest.yaml",
                        help="manifest whose status is timed (extracted first, into a temp store)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="shipyard-startup-"))
    try:
        data = yaml.safe_load(args.manifest.read_text())
        base = args.manifest.resolve().parent
        data["store"] = str(work / "store.zarr")
        for ds in data["datasets"]:
            ds["root"] = str(base / ds["root"])
            if ds.get("split_file"):
                ds["split_file"] = str(base / ds["split_file"])
        manifest = work / "m.yaml"
        manifest.write_text(yaml.safe_dump(data))
        cache = work / "cache"
        env = {**os.environ, "SHIPYARD_CACHE_DIR": str(cache)}
        shipyard = [sys.executable, "-m", "shipyard", "--manifest", str(manifest)]
        subprocess.run([*shipyard, "extract"], env=env, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        rows = [
            ("python -c 'import torch'", timed([sys.executable, "-c", "import torch"], env,
                                               args.runs)),
            ("shipyard --help", timed([*shipyard, "--help"], env, args.runs)),
            ("shipyard status (first)", timed([*shipyard, "status"], env, args.runs,
                                              fresh_cache=work / "fresh")),
            ("shipyard status (second)", timed([*shipyard, "status"], env, args.runs)),
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    torch_s = rows[0][1]
    print(f"{'command':28}{'median s':>10}{'x import torch':>16}")
    for name, seconds in rows:
        print(f"{name:28}{seconds:10.3f}{seconds / torch_s:16.2f}")
    print(f"\ntargets: --help < 0.25x ({rows[1][1] / torch_s:.2f}x), "
          f"second status < 2x ({rows[3][1] / torch_s:.2f}x)")


if __name__ == "__main__":
    main()
