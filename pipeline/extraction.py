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
from typing import Any, Protocol

import numpy as np
import torch

from .datasets import Failure
from .errors import ImageError
from .locations import first_line
from .manifest import ExtractionSpec
from .models import ClipModel, encode_images
from .preprocess import augmented_views, clean_view, decode
from .progress import Progress
from .remote_paths import RemotePath
from .store import RowTable


@dataclass(frozen=True)
class WorkItem:
    key: bytes  # sha256 of the file's bytes when it was hashed
    path: Path | RemotePath  # any one file with these bytes (local, or on object storage)
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
    except Exception as exc:  # an object store's client error: this image only
        if not isinstance(item.path, RemotePath):
            raise
        raise ImageError(f"{item.name}: cannot read ({first_line(exc)})") from None
    if hashlib.sha256(data).digest() != item.key:
        raise ImageError(f"{item.name}: file changed during extraction")
    return data


def clean_batch(items: Sequence[WorkItem], clip: ClipModel, max_pixels: int) -> Decoded:
    good, tensors, failures = [], [], []
    for item in items:
        try:
            img = decode(_read_checked(item), item.name, max_pixels)
            tensors.append(clean_view(img, clip.preprocess))
            good.append(item)
        except ImageError as exc:
            failures.append(Failure(item.name, str(exc).removeprefix(f"{item.name}: ")))
    return good, (torch.stack(tensors) if tensors else None), failures


def views_batch(items: Sequence[WorkItem], clip: ClipModel, spec: ExtractionSpec) -> Decoded:
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


# One encoded batch as the commit loop reads it: keys (N, 32), unit features (float16) and norms
# (None when nothing in it decoded), the failures, and the seconds the model forward took.
Block = tuple[np.ndarray, np.ndarray | None, np.ndarray | None, list[Failure], float]


class Remote(Protocol):
    """Encodes batches elsewhere (dask workers, `cluster.RemoteEncoder`), in batch order."""

    def blocks(self, mode: str, batches: Sequence[Sequence[WorkItem]]) -> Iterator[Block]: ...


def encode_clean(clip: ClipModel, table: RowTable, items: Sequence[WorkItem], spec: ExtractionSpec,
                 progress: Progress, strict: bool, remote: Remote | None = None) -> EncodeResult:
    """Encode the clean view of each item into `table` (keys, unit features, norms), here or
    on `remote`'s workers: the same batches, committed in the same order."""
    batches = _batches(items, aligned_batch(spec.batch_size, table.chunk_rows))
    blocks = remote.blocks("clean", batches) if remote else _local(batches, clip, spec, "clean")
    return _commit(table, blocks, len(items), "images", progress, strict)


def encode_views(clip: ClipModel, table: RowTable, items: Sequence[WorkItem], spec: ExtractionSpec,
                 progress: Progress, strict: bool, remote: Remote | None = None) -> EncodeResult:
    """Encode V seeded augmented views of each item into `table` (keys, (V, D) unit features,
    (V,) norms)."""
    batches = _batches(items, aligned_batch(max(1, spec.batch_size // spec.views), table.chunk_rows))
    blocks = remote.blocks("views", batches) if remote else _local(batches, clip, spec, "views")
    return _commit(table, blocks, len(items), "views", progress, strict)


def decode_batch(items: Sequence[WorkItem], clip: ClipModel, spec: ExtractionSpec,
                 mode: str) -> Decoded:
    """Read, verify and decode a batch: its clean views (`clean`) or its V seeded views."""
    return clean_batch(items, clip, spec.max_pixels) if mode == "clean" else \
        views_batch(items, clip, spec)


def encode_batch(decoded: Decoded, clip: ClipModel, spec: ExtractionSpec, mode: str) -> Block:
    """A decoded batch through the model: what the commit loop writes. The same function here
    and on a dask worker, so both write the same rows."""
    good, tensor, failures = decoded
    keys = np.frombuffer(b"".join(i.key for i in good), np.uint8).reshape(-1, 32)
    if tensor is None:
        return keys, None, None, failures, 0.0
    t0 = time.perf_counter()
    features = encode_images(clip, tensor)
    if mode != "clean":
        features = features.reshape(-1, spec.views, clip.embed_dim)  # (B, V, D)
    seconds = time.perf_counter() - t0
    unit, norms = split_norms(features)
    return keys, unit.astype(np.float16), norms, failures, seconds


def _local(batches: list[Sequence[WorkItem]], clip: ClipModel, spec: ExtractionSpec,
           mode: str) -> Iterator[Block]:
    """In-process: decode in the manifest's `workers` threads, the model forward here."""
    for decoded in _prefetched(batches, lambda b: decode_batch(b, clip, spec, mode),
                               spec.workers):
        yield encode_batch(decoded, clip, spec, mode)


def _commit(table: RowTable, blocks: Iterator[Block], total: int, what: str, progress: Progress,
            strict: bool) -> EncodeResult:
    """Write the blocks in order; rows are committed chunk by chunk as the writer fills them."""
    result = EncodeResult()
    if not total:
        return result
    started = time.perf_counter()
    task = progress.task(f"encode {what}", total, "img")
    writer = table.writer()
    try:
        for keys, unit, norms, failures, seconds in blocks:
            if failures and strict:
                f = failures[0]
                raise ImageError(f"{f.path}: {f.reason} (--strict)")
            result.failures.extend(failures)
            if unit is not None and norms is not None:
                result.model_seconds += seconds
                writer.add(keys, features=unit, norms=norms)
                result.encoded += len(keys)
            task.advance(len(keys) + len(failures))
    finally:
        writer.flush()  # keep every finished batch, even when stopping on an error
        task.close()
    result.seconds = time.perf_counter() - started
    return result
