"""Tip-Adapter: the cache logits (dense, and sparse over top-k neighbours), a FAISS-backed cache index
(exact 'flat', approximate 'ivf' / 'hnsw') and the alpha/beta grid search on val. Tensors or arrays
in and out; the device is taken from the inputs and a GPU is used when there is one, never required."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import torch

from .errors import UsageError

DEFAULT_TOPK = 16  # neighbours of an approximate cache when the caller names none
GPU_MAX_K = 2048  # the largest k a FAISS GPU index selects (GPU_MAX_SELECTION_K)
MAX_ELEMENTS = 1 << 22  # (queries x neighbours) per search batch in cache_logits: ~100 MB
TRAIN_POINTS_PER_LIST = 32  # IVF k-means sample per list; FAISS's 256 makes 1.6M keys take minutes
IVF_NITER = 10  # k-means iterations; IVF recall barely moves past 10 on unit-norm features


def affinity(sims: Any, beta: float) -> Any:
    """A = exp(-beta (1 - sims)) for cosine similarities: 1 at sim 1, exp(-2 beta) at sim -1."""
    if isinstance(sims, np.ndarray):
        return np.exp(-beta * (1.0 - sims))
    return torch.exp(-beta * (1.0 - sims))


def _class_sum(weights: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Sum weights per class: (B, N) with shared labels (N,), or (B, k) with per-row labels (B, k)
    where a negative label (FAISS's "no neighbour") adds nothing. Equals weights @ one_hot(labels)
    without building the (N, C) one-hot."""
    out = weights.new_zeros(weights.shape[0], n_classes)  # (B, C)
    if labels.ndim == 1:
        return out.index_add(1, labels, weights)
    keep = labels >= 0
    return out.scatter_add(1, labels.clamp(min=0), torch.where(keep, weights, 0.0))


def tip_logits(queries: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor,
               text_weights: torch.Tensor, alpha: float, beta: float,
               logit_scale: float = 100.0) -> torch.Tensor:
    """Dense Tip-Adapter: logit_scale f W^T + alpha A V over all N keys, V = one-hot(labels).
    Queries, keys and text weights are L2-normalised by the caller. Differentiable in the keys."""
    text = text_weights.to(queries)
    clip = logit_scale * queries @ text.T  # (B, D) @ (D, C) -> (B, C)
    sims = queries @ keys.to(queries).T  # (B, D) @ (D, N) -> (B, N)
    cache = _class_sum(affinity(sims, beta), labels.to(queries.device).long(), text.shape[0])
    return clip + alpha * cache


def tip_logits_sparse(queries: torch.Tensor, neighbour_sims: torch.Tensor,
                      neighbour_labels: torch.Tensor, text_weights: torch.Tensor, alpha: float,
                      beta: float, logit_scale: float = 100.0) -> torch.Tensor:
    """Tip-Adapter over each query's k neighbours only: sims (B, k), labels (B, k), label -1 for a
    missing neighbour. With k = N it equals `tip_logits`; with k < N the far keys are dropped."""
    text = text_weights.to(queries)
    clip = logit_scale * queries @ text.T  # (B, D) @ (D, C) -> (B, C)
    weights = affinity(neighbour_sims.to(queries), beta)  # (B, k)
    cache = _class_sum(weights, neighbour_labels.to(queries.device).long(), text.shape[0])
    return clip + alpha * cache


# --- FAISS cache index -------------------------------------------------------------------------

def _faiss() -> Any:
    """FAISS, imported on first use so the rest of Tip-Adapter works without it."""
    try:
        import faiss
    except ImportError as e:
        raise UsageError("a FAISS cache index needs faiss: pip install 'shipyard[faiss]'") from e
    return faiss


@dataclass(frozen=True)
class IndexParams:
    nlist: int | None = None  # IVF lists; default ~4 sqrt(N)
    nprobe: int | None = None  # IVF lists visited per query; default nlist / 8
    hnsw_m: int = 32  # HNSW graph degree
    ef_search: int = 128  # HNSW search beam (raised to k when k is larger)
    seed: int = 0  # IVF k-means seed


def default_nlist(n: int) -> int:
    """~4 sqrt(N) lists, but at least TRAIN_POINTS_PER_LIST keys per list and never more than N."""
    return max(1, min(round(4 * math.sqrt(n)), n // TRAIN_POINTS_PER_LIST))


def _flat(keys: np.ndarray, p: IndexParams) -> Any:
    index = _faiss().IndexFlatIP(keys.shape[1])
    index.add(keys)
    return index


def _ivf(keys: np.ndarray, p: IndexParams) -> Any:
    faiss = _faiss()
    n, d = keys.shape
    nlist = p.nlist or default_nlist(n)
    if not 1 <= nlist <= n:
        raise UsageError(f"an IVF index over {n} keys needs 1 <= nlist <= {n}, got {nlist}")
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed, index.cp.niter, index.cp.spherical = p.seed, IVF_NITER, True  # unit-norm keys
    index.cp.min_points_per_centroid = 1  # small caches train on what they have, quietly
    index.cp.max_points_per_centroid = TRAIN_POINTS_PER_LIST
    index.train(keys)
    index.add(keys)
    index.nprobe = min(nlist, p.nprobe or max(1, nlist // 8))
    return index


def _hnsw(keys: np.ndarray, p: IndexParams) -> Any:
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(keys.shape[1], p.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = p.ef_search
    index.add(keys)
    return index


INDEX_BUILDERS: dict[str, Callable[[np.ndarray, IndexParams], Any]] = {
    "flat": _flat, "ivf": _ivf, "hnsw": _hnsw}


def _kind_of(index: Any) -> str:
    faiss = _faiss()
    for kind, cls in (("flat", faiss.IndexFlat), ("ivf", faiss.IndexIVF), ("hnsw", faiss.IndexHNSW)):
        if isinstance(index, cls):
            if index.metric_type != faiss.METRIC_INNER_PRODUCT:
                raise UsageError(f"the {kind} index does not use inner product")
            return kind
    raise UsageError(f"unsupported FAISS index type {type(index).__name__}")


def _want_gpu(use_gpu: bool | None, kind: str) -> bool:
    """Auto: GPU when this faiss build has GPU support, a GPU is visible and the kind runs there."""
    faiss = _faiss()
    available = (hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
                 and torch.cuda.is_available())
    if use_gpu is None:
        return available and kind != "hnsw"
    if use_gpu and not available:
        raise UsageError("use_gpu=True, but this faiss build or machine has no GPU")
    if use_gpu and kind == "hnsw":
        raise UsageError("FAISS has no GPU HNSW index; use_gpu must be False or None for hnsw")
    return use_gpu


class CacheIndex:
    """A FAISS inner-product index over float32 cache keys (unit norm: scores are cosines)."""

    def __init__(self, index: Any, kind: str, use_gpu: bool | None = None) -> None:
        self._gpu_res = None
        if _want_gpu(use_gpu, kind):
            faiss = _faiss()
            self._gpu_res = faiss.StandardGpuResources()  # must outlive the GPU index
            index = faiss.index_cpu_to_gpu(self._gpu_res, torch.cuda.current_device(), index)
        self._index, self._kind = index, kind

    @classmethod
    def build(cls, keys: np.ndarray, kind: str, *, nlist: int | None = None, nprobe: int | None = None,
              hnsw_m: int = 32, ef_search: int = 128, use_gpu: bool | None = None,
              seed: int = 0) -> CacheIndex:
        if kind not in INDEX_BUILDERS:
            raise UsageError(f"unknown cache index {kind!r} (known: {', '.join(INDEX_BUILDERS)})")
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        if keys.ndim != 2 or len(keys) == 0:
            raise UsageError(f"cache keys must be a non-empty (N, D) array, got {keys.shape}")
        params = IndexParams(nlist, nprobe, hnsw_m, ef_search, seed)
        return cls(INDEX_BUILDERS[kind](keys, params), kind, use_gpu)

    @classmethod
    def from_bytes(cls, blob: np.ndarray, *, use_gpu: bool | None = None) -> CacheIndex:
        index = _faiss().deserialize_index(np.ascontiguousarray(blob, dtype=np.uint8))
        return cls(index, _kind_of(index), use_gpu)

    def to_bytes(self) -> np.ndarray:
        faiss = _faiss()
        cpu = faiss.index_gpu_to_cpu(self._index) if self.on_gpu else self._index
        return np.asarray(faiss.serialize_index(cpu), dtype=np.uint8)

    @property
    def kind(self) -> str:
        """'flat' | 'ivf' | 'hnsw'."""
        return self._kind

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def exact(self) -> bool:
        """Searches are exhaustive: top-k is the true top-k, k = N gives every key."""
        return self._kind == "flat"

    @property
    def on_gpu(self) -> bool:
        return self._gpu_res is not None

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k best keys per query: sims (B, k) float32, ids (B, k) int64 (-1: none found)."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise UsageError(f"queries must be (B, {self.dim}), got {q.shape}")
        if not 1 <= k <= self.ntotal:
            raise UsageError(f"k must lie in [1, {self.ntotal}], got {k}")
        if self.on_gpu and k > GPU_MAX_K:
            if not self.exact:
                raise UsageError(f"a GPU {self.kind} index returns at most {GPU_MAX_K} neighbours")
            return self._full_scan(q, k)
        if self._kind == "hnsw" and k > self._index.hnsw.efSearch:
            params = _faiss().SearchParametersHNSW(efSearch=k)  # the beam must hold k results
            sims, ids = self._index.search(q, k, params=params)
        else:
            sims, ids = self._index.search(q, k)
        return sims, ids.astype(np.int64, copy=False)

    def _full_scan(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search by matmul over the stored keys, for k beyond what the GPU selects."""
        keys = torch.from_numpy(self._index.reconstruct_n(0, self.ntotal))
        device = torch.device("cuda") if self.on_gpu else torch.device("cpu")
        sims = torch.from_numpy(q).to(device) @ keys.to(device).T  # (B, D) @ (D, N) -> (B, N)
        top, ids = sims.topk(k, dim=1)
        return top.cpu().numpy(), ids.cpu().numpy()


def resolve_topk(index: CacheIndex, topk: int | None) -> int:
    """Neighbours `cache_logits` reads: all keys for an exact index without topk, else topk."""
    if topk is None:
        return index.ntotal if index.exact else min(DEFAULT_TOPK, index.ntotal)
    return min(topk, index.ntotal)


@torch.no_grad()
def cache_logits(index: CacheIndex, queries: Any, labels: Any, text_weights: Any, alpha: float,
                 beta: float, topk: int | None = None, logit_scale: float = 100.0,
                 max_elements: int = MAX_ELEMENTS) -> Any:
    """Tip-Adapter logits (B, C) through the index: exactly dense for 'flat' without topk, else over
    the top-k neighbours. Queries go in batches of max_elements // k. A numpy `queries` gives a
    numpy result; a tensor gives a tensor on its device."""
    as_numpy = isinstance(queries, np.ndarray)
    q = torch.as_tensor(queries, dtype=torch.float32)
    key_labels = torch.as_tensor(labels, device=q.device).long()  # (N,)
    text = torch.as_tensor(text_weights, dtype=torch.float32, device=q.device)  # (C, D)
    k = resolve_topk(index, topk)
    out = []
    for chunk in q.split(max(1, max_elements // k)):
        sims, ids = index.search(chunk.cpu().numpy(), k)  # (b, k) each
        ids_t = torch.from_numpy(ids).to(q.device)
        nb_labels = torch.where(ids_t >= 0, key_labels[ids_t.clamp(min=0)], -1)  # (b, k)
        out.append(tip_logits_sparse(chunk, torch.from_numpy(sims), nb_labels, text, alpha, beta,
                                     logit_scale))
    logits = torch.cat(out) if out else q.new_zeros(0, text.shape[0])
    return logits.cpu().numpy() if as_numpy else logits


def top1_agreement(a_logits: Any, b_logits: Any) -> float:
    """Fraction of rows whose argmax class is the same in both (B, C) logit sets."""
    a, b = torch.as_tensor(a_logits), torch.as_tensor(b_logits)
    if a.shape != b.shape or a.ndim != 2 or len(a) == 0:
        raise ValueError(f"expected two equal non-empty (B, C) logit sets, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    return int((a.argmax(dim=1) == b.argmax(dim=1).to(a.device)).sum()) / len(a)


def agreement_report(index_exact: CacheIndex, index_approx: CacheIndex, queries_sample: Any,
                     labels: Any, text_weights: Any, alpha: float, beta: float,
                     topk: int | None = None, logit_scale: float = 100.0) -> dict[str, Any]:
    """Top-1 agreement of the approximate cache with the exact dense result on a query sample."""
    if not index_exact.exact:
        raise UsageError(f"the reference index must be exact ('flat'), got {index_exact.kind!r}")
    exact = cache_logits(index_exact, queries_sample, labels, text_weights, alpha, beta, None,
                         logit_scale)
    approx = cache_logits(index_approx, queries_sample, labels, text_weights, alpha, beta, topk,
                          logit_scale)
    return {"sample": len(exact), "top1_agreement": top1_agreement(approx, exact),
            "topk": resolve_topk(index_approx, topk), "kind": index_approx.kind}


# --- alpha / beta search -----------------------------------------------------------------------

def tip_scales() -> dict[str, tuple[float, float]]:
    """Tip-Adapter's per-dataset search scales (S_beta, S_alpha), from presets/tip_scales.json."""
    text = resources.files(__package__).joinpath("presets/tip_scales.json").read_text("utf-8")
    return {name: (float(s["s_beta"]), float(s["s_alpha"])) for name, s in json.loads(text).items()}


def search_grid(s_beta: float, s_alpha: float, beta_steps: int = 200,
                alpha_steps: int = 20) -> tuple[list[float], list[float]]:
    """beta_i = 0.1 + i (S_beta - 0.1) / beta_steps, alpha_j likewise, i and j from 0 to steps - 1:
    the public code's `range(steps)`, so S itself is never tried."""
    betas = [0.1 + i * (s_beta - 0.1) / beta_steps for i in range(beta_steps)]
    alphas = [0.1 + j * (s_alpha - 0.1) / alpha_steps for j in range(alpha_steps)]
    return betas, alphas


@torch.no_grad()
def search_alpha_beta(val_feats: torch.Tensor, val_labels: torch.Tensor, keys: torch.Tensor,
                      key_labels: torch.Tensor, text_weights: torch.Tensor, s_beta: float,
                      s_alpha: float, beta_steps: int = 200, alpha_steps: int = 20,
                      logit_scale: float = 100.0,
                      max_elements: int = 1 << 24) -> tuple[float, float, float]:
    """Tip-Adapter's grid search: (best_alpha, best_beta, best val accuracy in [0, 1]). Ties keep
    the first point in beta-major order, as the public code's strict `>` does. Val-to-key sims are
    computed once per row block and reused over the whole grid; all alphas are scored at once."""
    if len(val_feats) == 0:
        raise UsageError("the alpha/beta search needs at least one val feature")
    betas, alphas = search_grid(s_beta, s_alpha, beta_steps, alpha_steps)
    dev, n_classes = val_feats.device, text_weights.shape[0]
    keys, text = keys.to(val_feats), text_weights.to(val_feats)
    key_labels, val_labels = key_labels.to(dev).long(), val_labels.to(dev).long()
    alpha_t = torch.tensor(alphas, dtype=val_feats.dtype, device=dev)[:, None, None]  # (J, 1, 1)
    correct = torch.zeros(len(betas), len(alphas), dtype=torch.long, device=dev)  # (I, J)
    rows = max(1, max_elements // (len(alphas) * n_classes + keys.shape[0]))
    for f, y in zip(val_feats.split(rows), val_labels.split(rows), strict=True):
        clip = logit_scale * f @ text.T  # (b, D) @ (D, C) -> (b, C)
        shifted = f @ keys.T - 1.0  # (b, D) @ (D, N) -> (b, N): sims - 1, once for the grid
        weights = torch.empty_like(shifted)
        for i, beta in enumerate(betas):
            torch.mul(shifted, beta, out=weights).exp_()  # A = exp(-beta (1 - sims))
            cache = _class_sum(weights, key_labels, n_classes)  # (b, C)
            logits = clip + alpha_t * cache  # (J, b, C)
            correct[i] += (logits.argmax(dim=2) == y).sum(dim=1)
    best = int(correct.flatten().argmax())  # first maximum in (beta, alpha) order
    i, j = divmod(best, len(alphas))
    return alphas[j], betas[i], float(correct[i, j]) / len(val_feats)


@torch.no_grad()
def tune_alpha_beta(keys: torch.Tensor, key_labels: torch.Tensor, val_feats: torch.Tensor,
                    val_labels: torch.Tensor, text: torch.Tensor, classes: list[int],
                    scale: tuple[float, float]) -> dict[str, float]:
    """Tip-Adapter's grid search on the val images of `classes` (the classes the cache covers),
    over those classes' logits only; labels are remapped to positions in `classes`."""
    cls = torch.tensor(classes, device=val_labels.device)
    keep = torch.isin(val_labels, cls)
    if not bool(keep.any()):
        return {"alpha": 1.0, "beta": 1.0, "val_accuracy": float("nan")}
    remap = torch.full((text.shape[0],), -1, dtype=torch.long, device=cls.device)
    remap[cls] = torch.arange(len(cls), device=cls.device)
    alpha, beta, acc = search_alpha_beta(val_feats[keep], remap[val_labels[keep]], keys,
                                         remap[key_labels.to(cls.device)], text[cls], scale[0],
                                         scale[1])
    return {"alpha": float(alpha), "beta": float(beta), "val_accuracy": float(acc)}
