"""Queries/s of Tip-Adapter's cache logits: dense torch, FAISS exact (flat, every key) and FAISS
approximate (top-k over flat / ivf / hnsw), with index build times and each top-k mode's top-1
agreement with the exact result, on clustered synthetic unit features (class centres + noise).

    python bench/cache.py                                  # 16k, 160k, 1.6M keys, D 512, C 1000
    python bench/cache.py --sizes 16000,160000 --queries 2048 --kinds ivf,hnsw --topk 32
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from shipyard.pipeline.cache_index import (  # noqa: E402
    CacheIndex,
    cache_logits,
    default_nlist,
    top1_agreement,
)
from shipyard.pipeline.tip import tip_logits  # noqa: E402


def unit_rows(centres: torch.Tensor, shared: torch.Tensor, labels: np.ndarray, noise: float,
              seed: int) -> np.ndarray:
    """normalize(shared + centre[label] + noise g / sqrt(D)), g ~ N(0, I), in chunks: (N, D) float32.
    Like CLIP image features, all rows share a direction: with a unit shared vector and noise 1, two
    features of a class have cosine ~0.67, of different classes ~0.33."""
    n, d = len(labels), centres.shape[1]
    out = np.empty((n, d), dtype=np.float32)
    g = torch.Generator().manual_seed(seed)
    for start in range(0, n, 1 << 16):
        lab = torch.from_numpy(labels[start:start + (1 << 16)])
        x = shared + centres[lab] + noise * torch.randn(len(lab), d, generator=g) / d ** 0.5
        out[start:start + len(lab)] = torch.nn.functional.normalize(x, dim=1).numpy()
    return out


def timed(fn: Callable[[np.ndarray], np.ndarray], queries: np.ndarray,
          batch: int) -> tuple[float, np.ndarray]:
    """Seconds to run fn over the queries in batches, and the (Q, C) logits."""
    fn(queries[:min(8, len(queries))])  # warm-up: thread pools, allocator
    start = time.perf_counter()
    out = np.concatenate([fn(queries[i:i + batch]) for i in range(0, len(queries), batch)])
    return time.perf_counter() - start, out


def bench_size(n: int, n_queries: int, args: argparse.Namespace, rows: list[dict]) -> None:
    d, c = args.dim, args.classes
    g = torch.Generator().manual_seed(args.seed)
    centres = torch.nn.functional.normalize(torch.randn(c, d, generator=g), dim=1)
    shared = args.shared * torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    # text weights: the class centres seen through more noise, so zero-shot is right ~60% of the time
    text = unit_rows(centres, 0 * shared, np.arange(c), args.text_noise, args.seed + 1)
    labels = (np.arange(n) % c).astype(np.int64)
    keys = unit_rows(centres, shared, labels, args.noise, args.seed + 2)
    q_labels = np.random.default_rng(args.seed).integers(0, c, n_queries)
    queries = unit_rows(centres, shared, q_labels, args.noise, args.seed + 3)
    zero_shot = float(np.mean((queries @ text.T).argmax(1) == q_labels))  # (Q, D) @ (D, C)
    a, b = args.alpha, args.beta

    def add(method: str, build: float | None, secs: float, logits: np.ndarray, note: str) -> None:
        rows.append({"keys": n, "method": method, "build": build, "queries": n_queries,
                     "qps": n_queries / secs, "acc": float(np.mean(logits.argmax(1) == q_labels)),
                     "agree": top1_agreement(logits, dense), "note": note})

    keys_t, labels_t, text_t = torch.from_numpy(keys), torch.from_numpy(labels), torch.from_numpy(text)
    secs, dense = timed(lambda q: tip_logits(torch.from_numpy(q), keys_t, labels_t, text_t, a, b).numpy(),
                        queries, args.batch)
    add("dense torch", None, secs, dense, f"all keys; zero-shot accuracy {zero_shot:.3f}")
    print(f"  {n}: dense done", file=sys.stderr, flush=True)
    for kind in ("flat", *args.kinds):
        if kind == "hnsw" and n > args.hnsw_max:
            rows.append({"keys": n, "method": "faiss hnsw top-k",
                         "note": f"skipped: N > --hnsw-max {args.hnsw_max}{hnsw_estimate(rows, n)}"})
            continue
        start = time.perf_counter()
        index = CacheIndex.build(keys, kind, seed=args.seed)
        build = time.perf_counter() - start
        for topk, method, note in modes(index, args.topk):
            secs, logits = timed(partial(cache_logits, index, labels=labels, text_weights=text, alpha=a,
                                         beta=b, topk=topk), queries, args.batch)
            add(method, build, secs, logits, note)
        print(f"  {n}: {kind} done", file=sys.stderr, flush=True)
        del index
        gc.collect()


def hnsw_estimate(rows: list[dict], n: int) -> str:
    """The build time of a skipped HNSW, from the largest one built in this run (N log N)."""
    built = [r for r in rows if r["method"] == "faiss hnsw top-k" and "build" in r]
    if not built:
        return ""
    r = max(built, key=lambda r: r["keys"])
    secs = r["build"] * n * np.log(n) / (r["keys"] * np.log(r["keys"]))
    took = f"{secs:.0f} s" if secs < 120 else f"{secs / 60:.0f} min"
    return f"; its build would take ~{took} here (from {r['keys']} keys in {r['build']:.1f} s)"


def modes(index: CacheIndex, topk: int) -> list[tuple[int | None, str, str]]:
    """(topk, method, note) to time on an index: flat runs exact (every key) and top-k."""
    note = f"k={topk}"
    if index.kind == "ivf":
        nlist = default_nlist(index.ntotal)
        note += f", nlist={nlist}, nprobe={max(1, nlist // 8)}"
    elif index.kind == "hnsw":
        note += ", M=32, efSearch=128"
    top = (topk, f"faiss {index.kind} top-k", note)
    return [(None, "faiss flat exact", "all keys, read back: dense formula"), top] if index.exact else [top]


def print_table(rows: list[dict]) -> None:
    dense = {r["keys"]: r["qps"] for r in rows if r["method"] == "dense torch"}
    head = (f"{'keys':>9}  {'method':<18} {'build s':>8} {'queries':>7} {'q/s':>9} {'vs dense':>8} "
            f"{'accuracy':>8} {'top-1 agree':>11}  notes")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "qps" not in r:
            print(f"{r['keys']:>9}  {r['method']:<18} {'-':>8} {'-':>7} {'-':>9} {'-':>8} {'-':>8} "
                  f"{'-':>11}  {r['note']}")
            continue
        build = "-" if r["build"] is None else f"{r['build']:.2f}"
        print(f"{r['keys']:>9}  {r['method']:<18} {build:>8} {r['queries']:>7} {r['qps']:>9.1f} "
              f"{r['qps'] / dense[r['keys']]:>7.2f}x {r['acc']:>8.3f} {r['agree']:>11.4f}  {r['note']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="16000,160000,1600000", help="cache sizes N, comma-separated")
    p.add_argument("--queries", default="2048,1024,256",
                   help="queries per size (one number for all sizes, or one per size)")
    p.add_argument("--kinds", default="ivf,hnsw", help="approximate index kinds, comma-separated")
    p.add_argument("--topk", type=int, default=16, help="neighbours of the top-k modes")
    p.add_argument("--batch", type=int, default=256, help="queries per call")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--noise", type=float, default=1.0, help="feature noise around the class centre")
    p.add_argument("--shared", type=float, default=1.0, help="weight of the direction all features share")
    p.add_argument("--text-noise", type=float, default=3.5, help="text-weight noise around the centre")
    p.add_argument("--alpha", type=float, default=1.0)
    p.add_argument("--beta", type=float, default=5.5)
    p.add_argument("--hnsw-max", type=int, default=200_000,
                   help="skip HNSW above this many keys (its build is slow on few cores)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    queries = [int(q) for q in args.queries.split(",")]
    queries = queries * len(sizes) if len(queries) == 1 else queries
    if len(queries) != len(sizes):
        p.error("--queries takes one number or one per size")
    args.kinds = [k for k in args.kinds.split(",") if k and k != "flat"]
    print(f"D={args.dim} C={args.classes} alpha={args.alpha} beta={args.beta} batch={args.batch} "
          f"torch threads={torch.get_num_threads()}; agreement = top-1 vs dense on the timed queries")
    rows: list[dict] = []
    started = time.perf_counter()
    for n, q in zip(sizes, queries, strict=True):
        bench_size(n, q, args, rows)
        gc.collect()
    print_table(rows)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
