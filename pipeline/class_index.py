"""The class-candidate Tip-Adapter cache ('classes'): keys grouped by class, a few sub-centroids per
class, and per query the top-T classes by a centroid estimate of their logit, whose cache sums are
then computed exactly over their own keys. The winning logit is exact; the answer differs from
dense only when the true winner is not among the T candidates.

Why centroids bound the sum from below: for the n keys k_i of a sub-cluster with mean mu (not
renormalised), exp is convex, so sum_i exp(-beta (1 - f k_i)) >= n exp(-beta (1 - f mu)) (Jensen).
Every class's estimate is a lower bound of its exact cache sum, and so is the sum over any subset
of its sub-clusters, which is what lets FAISS pick the few nearest centroids when there are many."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch

from .errors import UsageError
from .tip import tip_logits_blocked

SUBCENTROIDS = 4  # sub-clusters per class at most
KEYS_PER_SUBCENTROID = 32  # a class gets one more sub-cluster per this many keys, up to SUBCENTROIDS
KMEANS_ITERS = 8  # Lloyd iterations of each class's spherical k-means
FAISS_MIN_CENTROIDS = 1 << 16  # above this many centroids FAISS picks each query's nearest ones
FAISS_CENTROIDS_PER_CANDIDATE = 4  # centroids FAISS returns per candidate class wanted
DEFAULT_AGREEMENT = 0.999  # top-1 agreement with dense that the automatic T must reach
MIN_TUNING_QUERIES = 256  # fewer val features than this: the cache's keys join them to tune T
MAX_TUNING_QUERIES = 2048
MAX_PAIR_ELEMENTS = 1 << 24  # (queries x keys) similarities per exact-sum product: ~64 MB


def subcentroid_count(n_keys: int, most: int = SUBCENTROIDS) -> int:
    """Sub-clusters of a class with n_keys keys: one per KEYS_PER_SUBCENTROID, 1 to `most`."""
    return max(1, min(most, n_keys // KEYS_PER_SUBCENTROID))


def class_kmeans(keys: torch.Tensor, m: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """m sub-clusters of one class's unit keys (n, D) by spherical k-means (assignment by cosine
    to the normalised means): their raw means (m', D) and sizes (m',), empty clusters dropped.
    Seeded: the first centres are m distinct keys drawn by a generator seeded with `seed`."""
    if m <= 1 or len(keys) <= m:
        return keys.mean(dim=0, keepdim=True), keys.new_tensor([float(len(keys))])
    g = torch.Generator().manual_seed(seed)
    centres = keys[torch.randperm(len(keys), generator=g)[:m].to(keys.device)]  # (m, D)
    for _ in range(KMEANS_ITERS):
        assign = (keys @ torch.nn.functional.normalize(centres, dim=1).T).argmax(dim=1)  # (n,)
        sums = keys.new_zeros(m, keys.shape[1]).index_add_(0, assign, keys)
        sizes = torch.bincount(assign, minlength=m).to(keys.dtype)
        centres = torch.where(sizes[:, None] > 0, sums / sizes.clamp(min=1)[:, None], centres)
    keep = sizes > 0
    return centres[keep], sizes[keep]


@dataclass(frozen=True)
class ClassIndex:
    """Keys grouped by class (class c owns rows offsets[c]:offsets[c + 1]) and their sub-clusters:
    raw means `centroids` (M, D), sizes `counts` (M,), owning class `owner` (M,)."""

    keys: torch.Tensor  # (N, D) unit rows, grouped by class in class order
    offsets: torch.Tensor  # (C + 1,) int64
    centroids: torch.Tensor  # (M, D)
    counts: torch.Tensor  # (M,)
    owner: torch.Tensor  # (M,) int64

    def __post_init__(self) -> None:
        n, c = self.keys.shape[0], len(self.offsets) - 1
        off = self.offsets
        if self.keys.ndim != 2 or c < 1 or int(off[0]) != 0 or int(off[-1]) != n or \
                bool((off[1:] < off[:-1]).any()):
            raise UsageError(f"a classes index needs (N, D) keys and C + 1 rising offsets from 0 "
                             f"to N, got keys {tuple(self.keys.shape)} and offsets {off.tolist()[:8]}")
        m = len(self.centroids)
        if self.centroids.shape != (m, self.keys.shape[1]) or self.counts.shape != (m,) or \
                self.owner.shape != (m,) or (m and not 0 <= int(self.owner.min()) <= int(
                    self.owner.max()) < c):
            raise UsageError(f"a classes index over {c} classes of dimension {self.keys.shape[1]} "
                             f"got centroids {tuple(self.centroids.shape)}, counts "
                             f"{tuple(self.counts.shape)}, owners {tuple(self.owner.shape)}")
        sizes = torch.zeros(c, dtype=torch.float64).index_add_(
            0, self.owner.cpu(), self.counts.cpu().double())
        if not torch.equal(sizes, (off[1:] - off[:-1]).cpu().double()):
            raise UsageError("a classes index's sub-cluster sizes do not add up to its classes' "
                             "key counts")

    @classmethod
    def build(cls, keys: torch.Tensor, labels: torch.Tensor, n_classes: int,
              subcentroids: int = SUBCENTROIDS, seed: int = 0) -> ClassIndex:
        """Group unit keys (N, D) with labels (N,) in [0, n_classes) by class (stable: keys of a
        class keep their order) and cluster each class."""
        labels = labels.long()
        if keys.ndim != 2 or len(keys) == 0 or labels.shape != (len(keys),):
            raise UsageError(f"a classes index needs non-empty (N, D) keys and (N,) labels, got "
                             f"{tuple(keys.shape)} and {tuple(labels.shape)}")
        if not 0 <= int(labels.min()) <= int(labels.max()) < n_classes:
            raise UsageError(f"cache labels must lie in [0, {n_classes}), got "
                             f"[{int(labels.min())}, {int(labels.max())}]")
        order = torch.sort(labels, stable=True).indices
        keys, labels = keys[order], labels[order]
        offsets = torch.zeros(n_classes + 1, dtype=torch.long)
        offsets[1:] = torch.bincount(labels.cpu(), minlength=n_classes).cumsum(0)
        cents, sizes, owners = [], [], []
        for c in range(n_classes):
            lo, hi = int(offsets[c]), int(offsets[c + 1])
            if hi == lo:
                continue
            mu, n = class_kmeans(keys[lo:hi], subcentroid_count(hi - lo, subcentroids), seed + c)
            cents.append(mu)
            sizes.append(n)
            owners.append(torch.full((len(mu),), c, dtype=torch.long))
        return cls(keys, offsets.to(keys.device), torch.cat(cents), torch.cat(sizes),
                   torch.cat(owners).to(keys.device))

    @property
    def n_classes(self) -> int:
        return len(self.offsets) - 1

    def labels(self) -> torch.Tensor:
        """Each grouped key's class, from the offsets: (N,)."""
        sizes = self.offsets[1:] - self.offsets[:-1]
        return torch.repeat_interleave(torch.arange(self.n_classes, device=sizes.device), sizes)

    def to(self, device: torch.device | str) -> ClassIndex:
        return ClassIndex(*(t.to(device) for t in (self.keys, self.offsets, self.centroids,
                                                    self.counts, self.owner)))

    def bounds(self, q: torch.Tensor, beta: float, faiss_min: int = FAISS_MIN_CENTROIDS,
               want: int = 1) -> torch.Tensor:
        """Lower bounds (B, C) of every class's cache sum: sum over its sub-clusters of
        n exp(-beta (1 - f mu)). Past faiss_min centroids only each query's nearest
        `want * FAISS_CENTROIDS_PER_CANDIDATE` centroids (by FAISS) contribute."""
        out = q.new_zeros(len(q), self.n_classes)
        cents = self.centroids.to(q)
        if len(cents) < faiss_min:
            w = torch.exp(beta * (q @ cents.T - 1.0)) * self.counts.to(q)  # (B, D) @ (D, M)
            return out.index_add_(1, self.owner, w)
        k = min(len(cents), want * FAISS_CENTROIDS_PER_CANDIDATE)
        found, at = self._centroid_search.search(q.cpu().numpy(), k)  # (B, k) each
        sims, ids = torch.from_numpy(found).to(q), torch.from_numpy(at).to(q.device)
        w = torch.exp(beta * (sims - 1.0)) * self.counts.to(q)[ids]  # (B, k)
        return out.scatter_add_(1, self.owner[ids], w)

    @cached_property
    def _centroid_search(self) -> Any:
        """A FAISS flat index over the centroids, built on first use and kept for every batch."""
        from .cache_index import CacheIndex

        return CacheIndex.build(self.centroids.cpu().numpy().astype(np.float32), "flat")

    def exact_sums(self, q: torch.Tensor, cand: torch.Tensor, beta: float) -> torch.Tensor:
        """The exact cache sum of each (query, candidate class) pair: (B, T) for cand (B, T).
        Pairs are grouped by class so each candidate class's keys meet all of its queries in one
        product."""
        b, t = cand.shape
        flat = cand.reshape(-1)
        order = torch.sort(flat, stable=True).indices
        rows = torch.div(order, t, rounding_mode="floor")  # query of each sorted pair
        classes, runs = torch.unique_consecutive(flat[order], return_counts=True)
        sums = q.new_zeros(b * t)
        off = self.offsets.tolist()
        keys = self.keys.to(q)
        pos = 0
        for c, run in zip(classes.tolist(), runs.tolist(), strict=True):
            k = keys[off[c]:off[c + 1]]  # (n_c, D)
            step = max(1, MAX_PAIR_ELEMENTS // max(1, len(k)))
            for lo in range(pos, pos + run, step):
                hi = min(pos + run, lo + step)
                sims = q[rows[lo:hi]] @ k.T  # (r, D) @ (D, n_c) -> (r, n_c)
                sums[lo:hi] = sims.sub_(1.0).mul_(beta).exp_().sum(dim=1)
            pos += run
        out = torch.empty_like(sums)
        out[order] = sums
        return out.view(b, t)

    def logits(self, q: torch.Tensor, text: torch.Tensor, alpha: float, beta: float,
               candidates: int, classes: list[int] | None = None, logit_scale: float = 100.0,
               faiss_min: int = FAISS_MIN_CENTROIDS) -> torch.Tensor:
        """Tip-Adapter logits (B, C): exact for each query's top-`candidates` classes (chosen among
        `classes`, all when None) by clip + alpha * bound, the bound elsewhere. Argmax over
        `classes` equals dense whenever the dense winner is a candidate."""
        text = text.to(q)
        clip = logit_scale * q @ text.T  # (B, D) @ (D, C) -> (B, C)
        est = clip + alpha * self.bounds(q, beta, faiss_min, candidates)
        pick = est
        if classes is not None:
            pick = torch.full_like(est, -math.inf)
            cls = torch.as_tensor(classes, device=q.device, dtype=torch.long)
            pick[:, cls] = est[:, cls]
        t = min(candidates, self.n_classes if classes is None else len(classes))
        cand = pick.topk(t, dim=1).indices  # (B, T)
        exact = clip.gather(1, cand) + alpha * self.exact_sums(q, cand, beta)
        return est.scatter(1, cand, exact)


@torch.no_grad()
def tune_candidates(index: ClassIndex, queries: torch.Tensor, text: torch.Tensor, alpha: float,
                    beta: float, scopes: dict[str, list[int] | None],
                    target: float = DEFAULT_AGREEMENT, start: int = 1,
                    logit_scale: float = 100.0) -> dict[str, Any]:
    """The smallest T in start, 2 start, 4 start, ... (capped at the largest scope) whose top-1
    agreement with dense reaches `target` on the queries in every scope (a class list, or None for
    all classes); the agreement per scope at that T."""
    if len(queries) == 0:
        raise UsageError("tuning the candidate count needs at least one query")
    scopes = {name: s for name, s in scopes.items() if s is None or len(s)}  # no empty side
    dense = tip_logits_blocked(queries, index.keys, index.labels(), text, alpha, beta, logit_scale)
    ceiling = max(index.n_classes if s is None else len(s) for s in scopes.values())
    t = max(1, min(start, ceiling))
    while True:
        agree = {name: scoped_agreement(index.logits(queries, text, alpha, beta, t, s, logit_scale),
                                        dense, s) for name, s in scopes.items()}
        if min(agree.values()) >= target or t >= ceiling:
            return {"candidates": t, "agreement": agree, "queries": len(queries), "target": target}
        t = min(2 * t, ceiling)


def tuning_queries(val: torch.Tensor, keys: torch.Tensor, least: int = MIN_TUNING_QUERIES,
                   most: int = MAX_TUNING_QUERIES) -> torch.Tensor:
    """Queries T is tuned on: up to `most` val features, joined by the cache's own keys (evenly
    spaced) when val has fewer than `least`. Few-shot val sets are small; the keys are the
    nearest thing to more images of the same classes."""
    q = val[:most]
    if len(q) >= least or len(keys) == 0:
        return q
    extra = keys[torch.linspace(0, len(keys) - 1, min(len(keys), most - len(q))).long()]
    return torch.cat([q, extra.to(q)])


def scoped_agreement(a: torch.Tensor, b: torch.Tensor, classes: list[int] | None) -> float:
    """Fraction of rows whose argmax over `classes` (every column when None) is the same in a and b."""
    if classes is not None:
        cols = torch.as_tensor(classes, device=a.device, dtype=torch.long)
        a, b = a[:, cols], b.to(a.device)[:, cols]
    return float((a.argmax(dim=1) == b.to(a.device).argmax(dim=1)).double().mean())
