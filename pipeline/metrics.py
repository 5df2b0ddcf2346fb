"""Metrics of the base-to-new protocol (METHODS.md): restricted-logit accuracy, H, GZSL, per-class
accuracy and the seed average. Pure functions: tensors or arrays in, floats and dicts out."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch

# An averaged row's H is recomputed from the averaged pair it summarises, never averaged itself.
H_PAIRS = {"h": (("base", "new"), ("seen", "unseen")), "gzsl_h": (("gzsl_seen", "gzsl_unseen"),)}
STD_FIELDS = ("base", "new", "seen", "unseen", "gzsl_seen", "gzsl_unseen")


def _inputs(logits: Any, labels: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) and integer labels (N,) as tensors on the logits' device, shapes checked."""
    logits = torch.as_tensor(logits).detach()
    labels = torch.as_tensor(labels).detach().to(device=logits.device, dtype=torch.long)
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise ValueError(f"expected logits (N, C) and labels (N,), got {tuple(logits.shape)} "
                         f"and {tuple(labels.shape)}")
    return logits, labels


def _class_index(classes: Sequence[int], n_columns: int, device: torch.device) -> torch.Tensor:
    idx = torch.as_tensor(list(classes), dtype=torch.long, device=device)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n_columns):
        raise ValueError(f"class ids must lie in [0, {n_columns}), got {list(classes)}")
    if idx.unique().numel() != idx.numel():
        raise ValueError(f"class ids repeat: {list(classes)}")
    return idx


def _predict(logits: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Predicted class id per sample, the argmax taken over `candidates` only: (N,)."""
    return candidates[logits[:, candidates].argmax(dim=1)]  # (N, |candidates|) -> (N,)


def _accuracy(logits: torch.Tensor, labels: torch.Tensor, samples_of: torch.Tensor,
              candidates: torch.Tensor) -> float:
    """Top-1 accuracy (%) on the samples labelled in `samples_of`, predicting among `candidates`."""
    mask = torch.isin(labels, samples_of)
    if not bool(mask.any()):
        return math.nan
    pred = _predict(logits[mask], candidates)
    return 100.0 * (pred == labels[mask]).double().mean().item()


def restricted_accuracy(logits: Any, labels: Any, classes: Sequence[int]) -> float:
    """Top-1 accuracy (%) over the samples whose label is in `classes`, the argmax taken over
    `classes` only (other logits ignored). NaN when no sample has such a label."""
    logits, labels = _inputs(logits, labels)
    idx = _class_index(classes, logits.shape[1], logits.device)
    return _accuracy(logits, labels, idx, idx)


def harmonic_mean(b: float, n: float) -> float:
    """H = 2bn / (b + n); 0 when both are 0, NaN when either is NaN."""
    b, n = float(b), float(n)
    if math.isnan(b) or math.isnan(n):
        return math.nan
    return 0.0 if b + n == 0 else 2.0 * b * n / (b + n)


def base_new(logits: Any, labels: Any, base: Sequence[int], new: Sequence[int]) -> dict[str, float]:
    """Base and new accuracy, each with logits restricted to its own classes, and their H."""
    _disjoint(base, new)
    b = restricted_accuracy(logits, labels, base)
    n = restricted_accuracy(logits, labels, new)
    return {"base": b, "new": n, "h": harmonic_mean(b, n)}


def gzsl(logits: Any, labels: Any, base: Sequence[int], new: Sequence[int]) -> dict[str, float]:
    """Generalized zero-shot: the argmax over all classes; seen = accuracy on base-label samples,
    unseen = on new-label samples, and their H."""
    _disjoint(base, new)
    logits, labels = _inputs(logits, labels)
    every = torch.arange(logits.shape[1], device=logits.device)
    seen_idx = _class_index(base, logits.shape[1], logits.device)
    unseen_idx = _class_index(new, logits.shape[1], logits.device)
    seen = _accuracy(logits, labels, seen_idx, every)
    unseen = _accuracy(logits, labels, unseen_idx, every)
    return {"seen": seen, "unseen": unseen, "h": harmonic_mean(seen, unseen)}


def per_class_accuracy(logits: Any, labels: Any, classes: Sequence[int],
                       restrict: bool) -> dict[int, float]:
    """Accuracy (%) per class id in `classes`: argmax over `classes` when `restrict`, else over all
    classes. NaN for a class without samples."""
    logits, labels = _inputs(logits, labels)
    idx = _class_index(classes, logits.shape[1], logits.device)
    if idx.numel() == 0:
        return {}
    candidates = idx if restrict else torch.arange(logits.shape[1], device=logits.device)
    pred = _predict(logits, candidates)
    out: dict[int, float] = {}
    for c in idx.tolist():
        mask = labels == c
        out[c] = 100.0 * (pred[mask] == c).double().mean().item() if bool(mask.any()) else math.nan
    return out


def average_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of each numeric field of `rows` (NaN propagates). `h` and `gzsl_h` are the
    harmonic mean of the averaged pair they summarise (base/new or seen/unseen, gzsl_seen/
    gzsl_unseen), not the mean of the per-seed values. Adds `<field>_std` (population std over
    seeds, so a single seed gives 0) for base, new, seen, unseen, gzsl_seen and gzsl_unseen.
    A non-numeric field (a method name) is kept when every row has the same value."""
    if not rows:
        raise ValueError("average_rows needs at least one row")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    out: dict[str, Any] = {}
    for key in keys:
        missing = [i for i, r in enumerate(rows) if key not in r]
        if missing:
            raise ValueError(f"field {key!r} is missing from rows {missing}")
        values = [r[key] for r in rows]
        if all(_is_number(v) for v in values):
            arr = np.asarray(values, dtype=np.float64)
            out[key] = float(arr.mean())
            if key in STD_FIELDS:
                out[f"{key}_std"] = float(arr.std())
        elif all(v == values[0] for v in values[1:]):
            out[key] = values[0]
    for h_key, pairs in H_PAIRS.items():
        for b_key, n_key in pairs:
            if h_key in out and _is_number(out.get(b_key)) and _is_number(out.get(n_key)):
                out[h_key] = harmonic_mean(out[b_key], out[n_key])
                break
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _disjoint(base: Sequence[int], new: Sequence[int]) -> None:
    shared = set(base) & set(new)
    if shared:
        raise ValueError(f"base and new classes overlap: {sorted(shared)}")
