"""The FAISS-backed Tip-Adapter cache index: exact ('flat') and approximate ('ivf', 'hnsw') top-k
search over unit-norm keys, serialisable to bytes, on the GPU when faiss-gpu and CUDA are present
(never required); and the cache logits and top-1 agreement computed through it."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import UsageError
from .tip import tip_logits_blocked, tip_logits_sparse

DEFAULT_TOPK = 16  # neighbours of an approximate cache when the caller names none
GPU_MAX_K = 2048  # the largest k a FAISS GPU index selects (GPU_MAX_SELECTION_K)
MAX_ELEMENTS = 1 << 22  # (queries x neighbours) per search batch in cache_logits: ~100 MB
DENSE_MAX_ELEMENTS = 1 << 25  # (queries x keys) per block of the exact path: ~128 MB of sims
TRAIN_POINTS_PER_LIST = 32  # IVF k-means sample per list; FAISS's 256 makes 1.6M keys take minutes
IVF_NITER = 10  # k-means iterations; IVF recall barely moves past 10 on unit-norm features


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
    """HNSW built on one thread: parallel insertion orders differ run to run, and a cache is
    rebuilt from its keys whenever it is loaded, so the graph must come out the same."""
    faiss = _faiss()
    index = faiss.IndexHNSWFlat(keys.shape[1], p.hnsw_m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efSearch = p.ef_search
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.add(keys)
    finally:
        faiss.omp_set_num_threads(threads)
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
        self._keys: torch.Tensor | None = None  # a flat index's keys, read back once
        self._device_keys: torch.Tensor | None = None  # and their copy on a GPU, made once

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
        built = cls(INDEX_BUILDERS[kind](keys, params), kind, use_gpu)
        if built.exact:
            built._keys = torch.from_numpy(keys)  # the keys it was given: nothing to read back
        return built

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

    def keys(self) -> torch.Tensor:
        """A flat index's keys (N, D) float32 on the CPU, read back from FAISS once."""
        if not self.exact:
            raise UsageError(f"a {self.kind} index keeps no exact copy of its keys to read back")
        if self._keys is None:
            self._keys = torch.from_numpy(self._index.reconstruct_n(0, self.ntotal))
        return self._keys

    def keys_on(self, device: torch.device) -> torch.Tensor:
        """`keys()` on `device`; a GPU copy is made once and kept, not per query batch."""
        if device.type == "cpu":
            return self.keys()
        if self._device_keys is None or self._device_keys.device != device:
            self._device_keys = self.keys().to(device)
        return self._device_keys

    def _full_scan(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact search by matmul over the stored keys, for k beyond what the GPU selects."""
        device = torch.device("cuda") if self.on_gpu else torch.device("cpu")
        sims = torch.from_numpy(q).to(device) @ self.keys_on(device).T  # (B, D) @ (D, N) -> (B, N)
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
    if index.exact and k == index.ntotal:
        # Every key: the dense formula over the keys read back, in key blocks (each key read once
        # per call). A k = N search sorts every row's N similarities only to scatter them back.
        keys = index.keys_on(q.device)
        logits = tip_logits_blocked(q, keys, key_labels, text, alpha, beta, logit_scale,
                                    max(max_elements, DENSE_MAX_ELEMENTS))
        return logits.cpu().numpy() if as_numpy else logits
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
