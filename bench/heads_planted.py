"""The heads on planted-structure data (the data of tests/test_heads_planted.py: features made by
the frozen text encoder from a hidden prompt plus a per-sample bias, an imperfect zero-shot
template), with and without SHIP, each on its own full recipe, over three head seeds:

- CoOp: Dassl's (softmax over the base classes, SGD momentum 0.9, batch 32, 200 epochs);
- CoOp+SHIP: SHIP's run_coop (all classes, 256 fresh synthetic per step, plain SGD, 200 epochs);
- Tip-Adapter-F with and without synthesized new-class features in the cache.

    python bench/heads_planted.py
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_heads_planted import _fit, planted  # noqa: E402

ROWS = [("zero-shot", False), ("coop", False), ("coop", True), ("tip-adapter-f", False),
        ("tip-adapter-f", True)]


def main() -> None:
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast and immune to stalls
    data = planted._get_wrapped_function()()  # type: ignore[attr-defined]
    print(f"{'method':<20} {'base':>12} {'new':>12} {'H':>12} {'s/seed':>7}")
    for method, ship in ROWS:
        runs, t0 = [], time.perf_counter()
        for seed in (1, 2, 3):
            runs.append(_fit(data, method, ship, seed=seed))
        seconds = (time.perf_counter() - t0) / 3
        cells = []
        for k in ("base", "new", "h"):
            values = [r[k] for r in runs]
            cells.append(f"{statistics.mean(values):5.1f} ± {statistics.pstdev(values):4.1f}")
        name = method + ("+ship" if ship else "")
        print(f"{name:<20} {cells[0]:>12} {cells[1]:>12} {cells[2]:>12} {seconds:7.1f}")


if __name__ == "__main__":
    main()
