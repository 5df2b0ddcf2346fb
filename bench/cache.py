"""Queries/s of Tip-Adapter's cache logits: dense torch, FAISS exact (flat, every key), FAISS
approximate (top-k over flat / ivf / hnsw) and the classes index (per-class centroids pick T
candidate classes, scored exactly; T raised on separate val queries until their agreement reaches
0.999), with build seconds, index memory and the top-1 agreement with dense on every timed query;
each time is the fastest of three passes.

Two key distributions: `easy` (class centres + isotropic noise) and `hard` (classes in
fine-grained groups of 10 near one group centre, three modes per class, anisotropic noise).

    python bench/cache.py                                  # 16k, 160k, 1.6M keys, D 512, C 1000
    python bench/cache.py --sizes 16000,160000 --queries 2048 --kinds ivf,classes --dists hard
"""

from __future__ import annotations

import argparse
import gc
import math
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
from shipyard.pipeline.class_index import ClassIndex, tune_candidates  # noqa: E402
from shipyard.pipeline.tip import tip_logits_blocked  # noqa: E402

VAL_QUERIES = 512  # queries the classes index tunes T on, drawn apart from the timed ones


class Classes:
    """One distribution's class structure: where the features of each class lie."""

    def __init__(self, dist: str, c: int, d: int, args: argparse.Namespace) -> None:
        g = torch.Generator().manual_seed(args.seed)
        unit = partial(torch.nn.functional.normalize, dim=-1)
        self.shared = args.shared * unit(torch.randn(d, generator=g))
        if dist == "easy":
            self.centres = unit(torch.randn(c, d, generator=g))
            self.modes = self.centres[:, None]  # (C, 1, D)
            self.scale = torch.ones(d)
        else:  # fine-grained groups of 10, three modes per class, anisotropic noise
            groups = unit(torch.randn(-(-c // 10), d, generator=g))
            own = 0.6 * unit(torch.randn(c, d, generator=g))  # a class's offset from its group
            self.centres = unit(groups.repeat_interleave(10, 0)[:c] + own)
            self.modes = unit(self.centres[:, None] + 0.5 * unit(torch.randn(c, 3, d, generator=g)))
            spectrum = 1.0 / torch.sqrt(1.0 + torch.arange(d) / 16.0)  # a few dimensions dominate
            self.scale = spectrum[torch.randperm(d, generator=g)] * (d / spectrum.square().sum()).sqrt()
        self.noise = args.noise

    def rows(self, labels: np.ndarray, seed: int, noise: float | None = None,
             text: bool = False) -> np.ndarray:
        """normalize(shared + mode + noise * scale * g / sqrt(D)), mode drawn from the label's
        modes, g ~ N(0, I), in chunks: (N, D) float32; text rows use the class centre and no
        shared part. With unit shared and centre vectors and noise 1, two easy features of a class
        have cosine ~0.67, of different classes ~0.33."""
        n, d = len(labels), self.centres.shape[1]
        noise = self.noise if noise is None else noise
        out = np.empty((n, d), dtype=np.float32)
        g = torch.Generator().manual_seed(seed)
        for start in range(0, n, 1 << 16):
            lab = torch.from_numpy(labels[start:start + (1 << 16)])
            mode = torch.randint(0, self.modes.shape[1], (len(lab),), generator=g)
            base = self.centres[lab] if text else self.modes[lab, mode] + self.shared
            x = base + noise * self.scale * torch.randn(len(lab), d, generator=g) / d ** 0.5
            out[start:start + len(lab)] = torch.nn.functional.normalize(x, dim=1).numpy()
        return out


REPS = 3  # timed passes per method; the fastest counts (this machine's noise is one-sided)


def timed(fn: Callable[[np.ndarray], np.ndarray], queries: np.ndarray,
          batch: int) -> tuple[float, np.ndarray]:
    """Seconds of the fastest of REPS passes of fn over the queries in batches, and the (Q, C)
    logits."""
    fn(queries[:min(8, len(queries))])  # warm-up: thread pools, allocator
    best = math.inf
    for _ in range(REPS):
        start = time.perf_counter()
        out = np.concatenate([fn(queries[i:i + batch]) for i in range(0, len(queries), batch)])
        best = min(best, time.perf_counter() - start)
    return best, out


def bench_size(dist: str, n: int, n_queries: int, args: argparse.Namespace, rows: list[dict]) -> None:
    c = args.classes
    space = Classes(dist, c, args.dim, args)
    # text weights: the class centres seen through more noise (zero-shot right ~60% on easy)
    text = space.rows(np.arange(c), args.seed + 1, args.text_noise, text=True)
    labels = (np.arange(n) % c).astype(np.int64)
    keys = space.rows(labels, args.seed + 2)
    rng = np.random.default_rng(args.seed)
    q_labels = rng.integers(0, c, n_queries)
    queries = space.rows(q_labels, args.seed + 3)
    val = space.rows(rng.integers(0, c, VAL_QUERIES), args.seed + 4)
    zero_shot = float(np.mean((queries @ text.T).argmax(1) == q_labels))  # (Q, D) @ (D, C)
    a, b = args.alpha, args.beta

    def add(method: str, build: float | None, mem: int, secs: float, logits: np.ndarray,
            note: str) -> None:
        rows.append({"dist": dist, "keys": n, "method": method, "build": build, "mem": mem,
                     "queries": n_queries, "qps": n_queries / secs,
                     "acc": float(np.mean(logits.argmax(1) == q_labels)),
                     "agree": top1_agreement(logits, dense), "note": note})

    dev = torch.device(args.device)
    keys_t, labels_t, text_t = (torch.from_numpy(x).to(dev) for x in (keys, labels, text))

    def on(q: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(q).to(dev)

    secs, dense = timed(lambda q: tip_logits_blocked(on(q), keys_t, labels_t, text_t, a, b)
                        .cpu().numpy(), queries, args.batch)
    add("dense torch", None, keys.nbytes, secs, dense, f"all keys; zero-shot accuracy {zero_shot:.3f}")
    print(f"  {dist} {n}: dense done", file=sys.stderr, flush=True)
    for kind in ("flat", *args.kinds):
        if kind == "classes":
            bench_classes(keys_t, labels_t, text_t, queries, val, args, add)
        elif kind == "hnsw" and n > args.hnsw_max:
            rows.append({"dist": dist, "keys": n, "method": "faiss hnsw top-k",
                         "note": f"skipped: N > --hnsw-max {args.hnsw_max}{hnsw_estimate(rows, n)}"})
        else:
            start = time.perf_counter()
            index = CacheIndex.build(keys, kind, seed=args.seed)
            build, mem = time.perf_counter() - start, len(index.to_bytes())
            for topk, method, note in modes(index, args.topk):
                secs, logits = timed(lambda q, i=index, k=topk: cache_logits(  # type: ignore[misc]
                    i, on(q), labels_t, text_t, a, b, topk=k).cpu().numpy(), queries, args.batch)
                add(method, build, mem, secs, logits, note)
            del index
        print(f"  {dist} {n}: {kind} done", file=sys.stderr, flush=True)
        gc.collect()


def bench_classes(keys: torch.Tensor, labels: torch.Tensor, text: torch.Tensor, queries: np.ndarray,
                  val: np.ndarray, args: argparse.Namespace, add: Callable[..., None]) -> None:
    """The classes index: built, T tuned on the val queries (counted in the build), then timed."""
    start = time.perf_counter()
    index = ClassIndex.build(keys, labels, args.classes, seed=args.seed)
    grouping = time.perf_counter() - start
    tuned = tune_candidates(index, torch.from_numpy(val).to(keys.device), text, args.alpha,
                            args.beta, {"all": None})
    build = time.perf_counter() - start
    t = tuned["candidates"]
    mem = sum(x.numel() * x.element_size() for x in (index.keys, index.offsets, index.centroids,
                                                    index.counts, index.owner))
    secs, logits = timed(lambda q: index.logits(torch.from_numpy(q).to(keys.device), text,
                                                args.alpha, args.beta, t).cpu().numpy(),
                         queries, args.batch)
    add("classes", build, mem, secs, logits,
        f"T={t} (val agreement {tuned['agreement']['all']:.4f}), {len(index.centroids)} centroids, "
        f"grouping {grouping:.1f} s")


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
    return [(None, "faiss flat exact", "all keys: the dense formula"), top] if index.exact else [top]


def print_table(rows: list[dict]) -> None:
    dense = {(r["dist"], r["keys"]): r["qps"] for r in rows if r["method"] == "dense torch"}
    head = (f"{'dist':<4} {'keys':>9}  {'method':<18} {'build s':>8} {'MB':>7} {'queries':>7} "
            f"{'q/s':>9} {'vs dense':>8} {'accuracy':>8} {'top-1 agree':>11}  notes")
    print(head)
    print("-" * len(head))
    for r in rows:
        lead = f"{r['dist']:<4} {r['keys']:>9}  {r['method']:<18}"
        if "qps" not in r:
            print(f"{lead} {'-':>8} {'-':>7} {'-':>7} {'-':>9} {'-':>8} {'-':>8} {'-':>11}  {r['note']}")
            continue
        build = "-" if r["build"] is None else f"{r['build']:.2f}"
        ratio = r["qps"] / dense[r["dist"], r["keys"]]
        print(f"{lead} {build:>8} {r['mem'] / 1e6:>7.1f} {r['queries']:>7} {r['qps']:>9.1f} "
              f"{ratio:>7.2f}x {r['acc']:>8.3f} {r['agree']:>11.4f}  {r['note']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="16000,160000,1600000", help="cache sizes N, comma-separated")
    p.add_argument("--queries", default="2048,1024,256",
                   help="queries per size (one number for all sizes, or one per size)")
    p.add_argument("--kinds", default="ivf,hnsw,classes",
                   help="index kinds besides dense and flat, comma-separated")
    p.add_argument("--dists", default="easy,hard", help="key distributions, comma-separated")
    p.add_argument("--topk", type=int, default=16, help="neighbours of the top-k modes")
    p.add_argument("--batch", type=int, default=1024, help="queries per call (evaluate's batch)")
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
    p.add_argument("--device", default="cpu", help="cpu or cuda (FAISS on the GPU with faiss-gpu)")
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    queries = [int(q) for q in args.queries.split(",")]
    queries = queries * len(sizes) if len(queries) == 1 else queries
    if len(queries) != len(sizes):
        p.error("--queries takes one number or one per size")
    args.kinds = [k for k in args.kinds.split(",") if k and k != "flat"]
    print(f"device {args.device}, D={args.dim} C={args.classes} alpha={args.alpha} beta={args.beta} "
          f"batch={args.batch} "
          f"torch threads={torch.get_num_threads()}; agreement = top-1 vs dense on the timed queries")
    rows: list[dict] = []
    started = time.perf_counter()
    for dist in args.dists.split(","):
        if dist not in ("easy", "hard"):
            p.error(f"unknown distribution {dist!r} (known: easy, hard)")
        for n, q in zip(sizes, queries, strict=True):
            bench_size(dist, n, q, args, rows)
            gc.collect()
    print_table(rows)
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
