"""Extraction on dask workers: the workers read, verify, decode and encode blocks of images; the
driver alone writes, committing the blocks in order, so the committed row count stays the only
commit point and the store is the one a sequential run writes.

A block is one encode batch (it divides the table's chunk, so blocks never straddle chunks). A
task loads the model once per worker process (torch at one thread), and returns the block's
keys, unit features (float16), norms, failures and the worker's extractor fingerprint, computed
there from its own weights, preprocessing and library versions: a block from a worker whose
fingerprint differs from the driver's is refused. A task lost with its worker is run again by
the scheduler (dask's `allowed-failures`) and `retries` more times on an error."""

from __future__ import annotations

import importlib.util
import logging
import os
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .errors import ExtractorMismatchError, UsageError
from .locations import first_line

SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"
RETRIES = 2


@dataclass(frozen=True)
class ClusterSpec:
    """Where extraction runs: `workers` local processes (a LocalCluster started for the run), or
    an existing cluster's scheduler address."""

    workers: int = 0
    scheduler: str | None = None

    @classmethod
    def resolve(cls, workers: int | None, scheduler: str | None) -> ClusterSpec | None:
        """The CLI's choice: --scheduler, else --workers, else $DASK_SCHEDULER_ADDRESS; None
        runs in-process."""
        if workers is not None and workers < 1:
            raise UsageError(f"--workers must be >= 1, got {workers}")
        if scheduler and workers:
            raise UsageError("--workers starts a local cluster and --scheduler names one: "
                             "give one of them")
        if scheduler:
            return cls(scheduler=scheduler)
        if workers:
            return cls(workers=workers)
        address = os.environ.get(SCHEDULER_ENV)
        return cls(scheduler=address) if address else None


@contextmanager
def session(spec: ClusterSpec, device: str = "cpu") -> Iterator[Any]:
    """A client of the cluster, closed (and a local cluster shut down) on exit. Starting local
    workers sets thread variables (OMP_NUM_THREADS, ...) in this process's environment for
    them to inherit; they are put back as they were."""
    before = dict(os.environ)
    client, cluster = connect(spec, device)
    try:
        yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
        for name in set(os.environ) - set(before):
            del os.environ[name]
        os.environ.update(before)


def connect(spec: ClusterSpec, device: str = "cpu") -> tuple[Any, Any]:
    """(client, cluster to close or None). A local cluster on a CUDA device is dask-cuda's
    LocalCUDACluster (one GPU per worker) when it is installed. A missing `distributed`
    package or an unreachable scheduler is one line."""
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        raise UsageError("extraction on dask workers needs the `distributed` package: pip "
                         "install 'shipyard[distributed]'") from None
    # The scheduler and nannies of a local cluster live in this process: their INFO chatter
    # would bury the command's own lines. Warnings and errors still show.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    if spec.scheduler:
        try:
            return Client(spec.scheduler, timeout="5s"), None
        except (OSError, TimeoutError) as exc:
            raise UsageError(f"cannot reach the dask scheduler at {spec.scheduler}: "
                             f"{first_line(exc)}") from None
    if device != "cpu" and _cuda() and importlib.util.find_spec("dask_cuda") is not None:
        from dask_cuda import LocalCUDACluster

        cuda = LocalCUDACluster(n_workers=spec.workers, threads_per_worker=1,
                                dashboard_address=None, silence_logs=40)
        return Client(cuda), cuda
    cluster = LocalCluster(n_workers=spec.workers, threads_per_worker=1, processes=True,
                           dashboard_address=None, silence_logs=40)
    return Client(cluster), cluster


def _cuda() -> bool:
    import torch

    return bool(torch.cuda.is_available())


# One model per worker process, keyed by what determines it.
_MODELS: dict[str, Any] = {}


def model_key(model: dict[str, Any], device: str) -> str:
    """What names a worker's loaded model: the manifest's model section and the device."""
    import json

    return json.dumps([model, device], sort_keys=True)


def _worker_clip(model: dict[str, Any], device: str) -> Any:
    import torch

    from .manifest import ModelSpec
    from .models import load_clip, resolve_device

    key = model_key(model, device)
    if key not in _MODELS:
        torch.set_num_threads(1)  # one thread per worker process
        _MODELS[key] = load_clip(ModelSpec(**model), resolve_device(device))
    return _MODELS[key]


def encode_block(model: dict[str, Any], extraction: dict[str, Any], device: str, mode: str,
                 items: list[tuple[bytes, Any, str]]) -> dict[str, Any]:
    """Runs on a worker: one block through the in-process path's own functions, with the
    worker's extractor fingerprint and pid."""
    from .extraction import WorkItem, decode_batch, encode_batch
    from .fingerprint import fingerprint
    from .identity import extractor_description
    from .manifest import ExtractionSpec

    clip = _worker_clip(model, device)
    spec = ExtractionSpec(**extraction)
    work = [WorkItem(k, p, n) for k, p, n in items]  # p: a Path or a RemotePath
    return {"fp": fingerprint(extractor_description(clip.identity(), spec)), "pid": os.getpid(),
            "block": encode_batch(decode_batch(work, clip, spec, mode), clip, spec, mode)}


HASH_BLOCK = 64  # files per hashing task


def hash_block(paths: list[Any]) -> list[bytes | str]:
    """Runs on a worker: the sha256 of each file (a RemotePath), or why it could not be read,
    as the driver's own hashing says it."""
    from .hashing import digest_or_reason

    return [digest_or_reason(p) for p in paths]


@dataclass
class RemoteHasher:
    """Hashes files on the cluster's workers, in blocks, and returns the results in order: the
    driver never reads an image on object storage to plan an extraction."""

    client: Any

    def __call__(self, paths: list[Any]) -> list[bytes | str]:
        futures = [self.client.submit(hash_block, paths[i : i + HASH_BLOCK], pure=False,
                                      retries=RETRIES)
                   for i in range(0, len(paths), HASH_BLOCK)]
        out: list[bytes | str] = []
        for future in futures:
            out += future.result()
        return out


@dataclass
class RemoteEncoder:
    """Submits blocks to a cluster and yields their results in block order, a window of tasks
    ahead; refuses a block whose worker fingerprint differs from `expected`."""

    client: Any
    model: dict[str, Any]
    extraction: dict[str, Any]
    device: str
    expected: str

    def blocks(self, mode: str, batches: Sequence[Sequence[Any]]) -> Iterator[Any]:
        window = 2 * max(1, len(self.client.scheduler_info().get("workers", {})))
        pending: deque[Any] = deque()
        it = iter(batches)

        def submit(batch: Sequence[Any]) -> None:
            items = [(i.key, i.path, i.name) for i in batch]
            pending.append(self.client.submit(encode_block, self.model, self.extraction,
                                              self.device, mode, items, pure=False,
                                              retries=RETRIES))

        for batch in it:
            submit(batch)
            if len(pending) >= window:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                submit(nxt)
            if result["fp"] != self.expected:
                for f in pending:
                    f.cancel()
                raise ExtractorMismatchError(
                    f"a dask worker (pid {result['pid']}) encodes with extractor "
                    f"{result['fp'][:12]}, not the driver's {self.expected[:12]} (other weights, "
                    "preprocessing or library versions): its block is refused")
            yield _decoded(result)


def _decoded(result: dict[str, Any]) -> Any:
    """A worker's result as the commit loop reads it: (keys (N, 32), unit, norms, failures,
    model seconds), `extraction.Block`."""
    return result["block"]
