"""SYNC-CLIP-FS on planted-structure data with a shifted synthetic domain, against CoOp and against
"synthetic features as extra training data", over three head seeds.

The real features are those of tests/test_heads_planted.py (the frozen text encoder fed a hidden
prompt plus a per-sample bias; the zero-shot classifier uses another template). The synthetic
domain holds 16 samples of EVERY class drawn the same way but with a fixed shift added to the
hidden context (a domain of its own, as generated images are), at another raw norm. Compared:

- coop: Dassl's CoOp on the real base shots (softmax over the base classes);
- coop+syn-join: CoOp over all classes, the synthetic samples joining the training set;
- sync-clip-fs: shipyard's feature-space SYNC-CLIP (the preset's 10 epochs, batch 8, WEIGHT 0.4,
  KLWEIGHT 0.1), and the same at CoOp's 200 epochs.

    python bench/sync_clip_planted.py
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shipyard.pipeline.features import FewShotSet  # noqa: E402
from shipyard.pipeline.head_training import HeadData, train_head  # noqa: E402
from shipyard.pipeline.heads import CoOp, SyncClipFS, ZeroShot  # noqa: E402
from shipyard.pipeline.metrics import base_new  # noqa: E402
from shipyard.pipeline.registry import heads  # noqa: E402
from shipyard.pipeline.sync_clip import DomainPool, train_sync  # noqa: E402
from shipyard.pipeline.sync_losses import SyncWeights  # noqa: E402

from tests.test_heads_planted import BIAS_STD, planted  # noqa: E402
from tests.test_ship_learning import NAMES  # noqa: E402

SYN_PER_CLASS = 16
SHIFT_STD = 0.01  # the synthetic domain's context shift, per token-embedding dimension
REAL_NORM, SYN_NORM = 1.0, 1.4


def shifted_domain(data: dict) -> DomainPool:
    enc = data["enc"]
    g = torch.Generator().manual_seed(99)
    hidden = enc.context_from_text("a photo of a")
    shift = torch.randn(hidden.shape, generator=g) * SHIFT_STD
    prompts = enc.class_prompts(NAMES)
    labels = torch.arange(len(NAMES)).repeat_interleave(SYN_PER_CLASS)
    bias = torch.randn(len(labels), enc.width, generator=g) * BIAS_STD
    with torch.no_grad():
        unit = enc(hidden + shift, labels, prompts, bias=bias)
    return DomainPool(unit, torch.full((len(labels),), SYN_NORM), labels)


def with_norms(train: FewShotSet) -> FewShotSet:
    return replace(train, clean_norms=torch.full((train.size,), REAL_NORM),
                   view_norms=torch.full(train.views.shape[:2], REAL_NORM))


def score(head: torch.nn.Module, data: dict) -> dict[str, float]:
    inputs = data["inputs"]
    head.eval()
    with torch.no_grad():
        return base_new(head(inputs.test.features), inputs.test.labels, inputs.base, inputs.new)


def fit_coop(data: dict, seed: int, pool: DomainPool | None) -> dict[str, float]:
    inputs = data["inputs"]
    cfg = replace(heads()["coop"].config(False), seed=seed)
    torch.manual_seed(seed)
    head = CoOp(data["enc"], inputs.classnames, cfg, None if pool else len(inputs.base))
    syn = (pool.unit, pool.labels) if pool else (torch.zeros(0, inputs.text.shape[1]),
                                                 torch.zeros(0, dtype=torch.long))
    train_head(head, HeadData(inputs.train.views, inputs.train.clean, inputs.train.labels, *syn,
                              mix="join"), cfg)
    return score(head, data)


def fit_sync(data: dict, seed: int, pool: DomainPool, epochs: int | None = None) -> dict[str, float]:
    inputs = data["inputs"]
    cfg = replace(heads()["sync-clip-fs"].config(False), seed=seed)
    if epochs is not None:
        cfg = replace(cfg, epochs=epochs)
    torch.manual_seed(seed)
    head = SyncClipFS(data["enc"], inputs.classnames, cfg)
    out = train_sync(head, with_norms(inputs.train), pool, inputs.new, cfg, SyncWeights())
    result = score(head, data)
    result["epoch_s"] = statistics.mean(e["seconds"] for e in out["log"])
    return result


def main() -> None:
    torch.set_num_threads(1)  # tiny tensors: one thread is as fast and immune to stalls
    data = planted._get_wrapped_function()()  # type: ignore[attr-defined]
    pool = shifted_domain(data)
    inputs = data["inputs"]
    real_c = F.normalize(torch.stack([inputs.test.features[inputs.test.labels == c].mean(0)
                                      for c in range(len(NAMES))]), dim=-1)
    syn_c = F.normalize(torch.stack([pool.unit[pool.labels == c].mean(0)
                                     for c in range(len(NAMES))]), dim=-1)
    print(f"domain shift: real vs synthetic class-centroid cosine "
          f"{float((real_c * syn_c).sum(1).mean()):.4f}; raw norms {REAL_NORM} vs {SYN_NORM}")
    rows = {
        "zero-shot": lambda s: score(ZeroShot(inputs.text), data),
        "coop": lambda s: fit_coop(data, s, None),
        "coop+syn-join": lambda s: fit_coop(data, s, pool),
        "sync-clip-fs (10 ep)": lambda s: fit_sync(data, s, pool),
        "sync-clip-fs (200 ep)": lambda s: fit_sync(data, s, pool, epochs=200),
    }
    print(f"{'method':<22} {'base':>12} {'new':>12} {'H':>12} {'s/seed':>7}")
    for name, fit in rows.items():
        t0 = time.perf_counter()
        runs = [fit(seed) for seed in (1, 2, 3)]
        seconds = (time.perf_counter() - t0) / 3
        cells = [f"{statistics.mean(r[k] for r in runs):5.1f} ± "
                 f"{statistics.pstdev(r[k] for r in runs):4.1f}" for k in ("base", "new", "h")]
        extra = f"  epoch {statistics.mean(r['epoch_s'] for r in runs) * 1000:.1f} ms" \
            if "epoch_s" in runs[0] else ""
        print(f"{name:<22} {cells[0]:>12} {cells[1]:>12} {cells[2]:>12} {seconds:7.1f}{extra}")


if __name__ == "__main__":
    main()
