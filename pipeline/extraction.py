"""Encoding images into an extractor's row tables: decode in worker threads while the model runs.

Work is always 'the keys the table lacks', in a fixed order, batched so that batch boundaries fall
on chunk boundaries: a resumed run encodes exactly the batches a clean run would have encoded.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .datasets import Failure
from .errors import ImageError
from .manifest import ExtractionSpec
from .models import ClipModel, encode_images
from .preprocess import augmented_views, clean_view, decode
from .progress import Progress
from .store import RowTable


@dataclass(frozen=True)
class WorkItem:
    key: bytes  # sha256 of the file's bytes when it was hashed
    path: Path  # any one file with these bytes
    name: str  # how to name it in a report (dataset-relative path)


# One decoded batch: the items that decoded, their stacked input tensor, and the failures.
Decoded = tuple[list[WorkItem], torch.Tensor | None, list[Failure]]


@dataclass
class EncodeResult:
    encoded: int = 0
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    model_seconds: float = 0.0  # time inside the model forward alone


def _read_checked(item: WorkItem) -> bytes:
    """The file's bytes, refusing a file that changed since it was hashed."""
    try:
        data = item.path.read_bytes()
    except OSError as exc:
        raise ImageError(f"{item.name}: cannot read ({exc.strerror or exc})") from None
    if hashlib.sha256(data).digest() != item.key:
        raise ImageError(f"{item.name}: file changed during extraction")
    return data


def _clean_batch(items: Sequence[WorkItem], clip: ClipModel, max_pixels: int) -> Decoded:
    good, tensors, failures = [], [], []
    for item in items:
        try:
            img = decode(_read_checked(item), item.name, max_pixels)
            tensors.append(clean_view(img, clip.preprocess))
            good.append(item)
        except ImageError as exc:
            failures.append(Failure(item.name, str(exc).removeprefix(f"{item.name}: ")))
    return good, (torch.stack(tensors) if tensors else None), failures


def _views_batch(items: Sequence[WorkItem], clip: ClipModel, spec: ExtractionSpec) -> Decoded:
    good, tensors, failures = [], [], []
    for item in items:
        try:
            img = decode(_read_checked(item), item.name, spec.max_pixels)
            tensors.append(augmented_views(img, item.key, spec.views, spec.seed, spec.augment,
                                           clip.preprocess))
            good.append(item)
        except ImageError as exc:
            failures.append(Failure(item.name, str(exc).removeprefix(f"{item.name}: ")))
    return good, (torch.cat(tensors) if tensors else None), failures


def _prefetched(batches: list[Sequence[WorkItem]], make: Callable[[Sequence[WorkItem]], Any],
                workers: int) -> Iterator[Any]:
    """Yield make(batch) in order while up to `workers + 1` later batches decode in threads."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[Any]] = deque()
        it = iter(batches)
        for batch in it:
            pending.append(pool.submit(make, batch))
            if len(pending) > workers:
                break
        while pending:
            yield pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(make, nxt))


def split_norms(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Raw features (..., D) -> unit vectors (..., D) and their norms (...,) float32; the raw
    feature is unit * norm. A zero vector keeps norm 0 and a zero unit vector."""
    norms = np.linalg.norm(raw.astype(np.float32), axis=-1)
    unit = raw / np.maximum(norms, np.finfo(np.float32).tiny)[..., None]
    return unit.astype(np.float32), norms.astype(np.float32)


def _batches(items: Sequence[WorkItem], batch: int) -> list[Sequence[WorkItem]]:
    return [items[i : i + batch] for i in range(0, len(items), batch)]


def aligned_batch(batch_size: int, chunk_rows: int) -> int:
    """The largest batch <= batch_size that divides the chunk, so batches never straddle chunks."""
    batch = max(1, min(batch_size, chunk_rows))
    while chunk_rows % batch:
        batch -= 1
    return batch


def encode_clean(clip: ClipModel, table: RowTable, items: Sequence[WorkItem], spec: ExtractionSpec,
                 progress: Progress, strict: bool) -> EncodeResult:
    """Encode the clean view of each item into `table` (keys, unit features, norms)."""
    batch = aligned_batch(spec.batch_size, table.chunk_rows)
    return _encode(table, _batches(items, batch), lambda b: _clean_batch(b, clip, spec.max_pixels),
                   lambda x: encode_images(clip, x), len(items), "images", progress, strict,
                   spec.workers)


def encode_views(clip: ClipModel, table: RowTable, items: Sequence[WorkItem], spec: ExtractionSpec,
                 progress: Progress, strict: bool) -> EncodeResult:
    """Encode V seeded augmented views of each item into `table` (keys, (V, D) unit features,
    (V,) norms)."""
    batch = aligned_batch(max(1, spec.batch_size // spec.views), table.chunk_rows)

    def forward(x: torch.Tensor) -> np.ndarray:
        return encode_images(clip, x).reshape(-1, spec.views, clip.embed_dim)  # (B, V, D)

    return _encode(table, _batches(items, batch), lambda b: _views_batch(b, clip, spec), forward,
                   len(items), "views", progress, strict, spec.workers)


def _encode(table: RowTable, batches: list[Sequence[WorkItem]],
            make: Callable[[Sequence[WorkItem]], Decoded],
            forward: Callable[[torch.Tensor], np.ndarray], total: int, what: str,
            progress: Progress, strict: bool, workers: int) -> EncodeResult:
    result = EncodeResult()
    if not batches:
        return result
    started = time.perf_counter()
    task = progress.task(f"encode {what}", total, "img")
    writer = table.writer()
    try:
        for good, tensor, failures in _prefetched(batches, make, workers):
            if failures and strict:
                f = failures[0]
                raise ImageError(f"{f.path}: {f.reason} (--strict)")
            result.failures.extend(failures)
            if tensor is not None:
                t0 = time.perf_counter()
                features = forward(tensor)
                result.model_seconds += time.perf_counter() - t0
                keys = np.frombuffer(b"".join(i.key for i in good), np.uint8).reshape(-1, 32)
                unit, norms = split_norms(features)
                writer.add(keys, features=unit.astype(np.float16), norms=norms)
                result.encoded += len(good)
            task.advance(len(good) + len(failures))
    finally:
        writer.flush()  # keep every finished batch, even when stopping on an error
        task.close()
    result.seconds = time.perf_counter() - started
    return result
