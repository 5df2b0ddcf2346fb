"""CoOp's linear-probe baseline ("lpclip", after the CLIP paper's appendix A.3): multinomial
logistic regression with an L2 penalty on the weights, fitted by L-BFGS, with the inverse
regularisation strength C searched on a few-shot val set.

The objective is scikit-learn's `LogisticRegression(solver="lbfgs", penalty="l2", C=c)`:

    0.5 ||W||^2 + c * sum_i CE(W x_i + b, y_i)

summed over samples, the bias unpenalised. It is minimised in float64 with torch's L-BFGS
(strong-Wolfe line search) on the device of the inputs.

The search follows CoOp's `lpclip/linear_probe.py`: every C of `LPCLIP_C_LIST` is scored, the
first best one is the peak, and `LPCLIP_STEPS` bisection steps in log10 space refine it, each
scoring both ends of an interval that starts one decade either side of the peak and keeping the
better half (a tie keeps the lower end). The C used is the winner of the last step.
`search_logistic` L2-normalises train and val features first; lpclip's own script hands the raw
CLIP image features to scikit-learn (`normalize=False` does the same).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import UsageError

LPCLIP_C_LIST: tuple[float, ...] = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)
"""The initial values of C, in the order they are tried (largest first)."""

LPCLIP_STEPS = 8
"""Bisection steps after the initial list (lpclip's `--num_step` default, also its script's)."""

DEFAULT_C = 1.0
"""C when there is no val set to search on: scikit-learn's default for LogisticRegression, which is
what lpclip's estimator would use without its search (lpclip always searches; it has no
no-val case of its own)."""

_GRAD_TOL = 1e-10
"""L-BFGS stops when every gradient entry of the objective divided by c n is below this, or when a
line search finds no lower value in float64 (the usual end: gradients near 1e-9 for losses near 1)."""


@dataclass(frozen=True)
class LogisticFit:
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    c: float  # the inverse regularisation strength used
    val_accuracy: float  # in [0, 1] on the val set at this C (nan when no val)
    searched: list[tuple[float, float]]  # every (C, val accuracy) tried, in order


def _check(x: torch.Tensor, y: torch.Tensor, num_classes: int, what: str) -> torch.Tensor:
    if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
        raise UsageError(f"{what}: features must be (N, D) and labels (N,), got "
                         f"{tuple(x.shape)} and {tuple(y.shape)}")
    y = y.to(x.device).long()
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise UsageError(f"{what}: labels must lie in 0..{num_classes - 1}, got "
                         f"{int(y.min())}..{int(y.max())}")
    return y


def _lbfgs(x: torch.Tensor, y: torch.Tensor, k: int, c: float,
           max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean CE + ||W||^2 / (2 c n) over (W, b) from zero: the minimiser of the summed
    objective, with gradients on the scale of one sample's loss for every c. The weight is
    optimised as W = s V with s^2 = c n / (1 + c n), which gives V a curvature near 1 where the
    penalty dominates (small c n) and leaves W as it is for large c n."""
    n, d = x.shape
    cn = c * n
    s = math.sqrt(cn / (1.0 + cn))
    reg = 0.5 * s * s / cn
    params = torch.zeros(k, d + 1, dtype=x.dtype, device=x.device, requires_grad=True)  # [V | b]
    opt = torch.optim.LBFGS([params], lr=1.0, max_iter=max_iter, tolerance_grad=_GRAD_TOL,
                            tolerance_change=0.0, history_size=10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        v, b = params[:, :d], params[:, d]
        loss = F.cross_entropy(torch.addmm(b, x, v.T, alpha=s), y) + reg * v.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    v, b = params.detach()[:, :d], params.detach()[:, d]
    return s * v, b - b.mean()


def fit_logistic(x: torch.Tensor, y: torch.Tensor, num_classes: int, c: float,
                 max_iter: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """weight (num_classes, D), bias (num_classes,) minimising 0.5||W||^2 + c * sum CE.

    The features are used as given (no normalisation here; `search_logistic` normalises). The
    fit runs in float64 on x's device, from zero, for at most `max_iter` L-BFGS iterations, and
    the result comes back in x's dtype. The bias is unpenalised, so the objective is unchanged
    by adding one constant to every class's bias; the bias returned sums to zero over the classes
    that have training samples.

    A class without training samples has no minimiser (its bias would go to minus infinity);
    its row is the finite stand-in: zero weight, and a bias that keeps its probability below
    float64 eps times every other class's for every input no longer than the longest training
    feature. The other classes' rows are then the fit on them alone. With a single class present
    the classifier is constant (W = 0, b = 0 for it).
    """
    y = _check(x, y, num_classes, "fit_logistic")
    if len(x) == 0:
        raise UsageError("fit_logistic needs at least one training sample")
    if not c > 0 or not math.isfinite(c):
        raise UsageError(f"fit_logistic: C must be positive and finite, got {c}")
    xd = x.to(torch.float64)
    present = torch.bincount(y, minlength=num_classes) > 0
    classes = present.nonzero().squeeze(1)
    weight = xd.new_zeros(num_classes, x.shape[1])
    bias = xd.new_zeros(num_classes)
    if len(classes) >= 2:
        remap = torch.full((num_classes,), -1, dtype=torch.long, device=x.device)
        remap[classes] = torch.arange(len(classes), device=x.device)
        w, b = _lbfgs(xd, remap[y], len(classes), float(c), max_iter)
        weight[classes], bias[classes] = w, b
    if len(classes) < num_classes:
        radius = xd.norm(dim=1).max()
        lowest = (bias[classes] - radius * weight[classes].norm(dim=1)).min()
        bias[~present] = lowest + math.log(torch.finfo(torch.float64).eps)
    out = x.dtype if x.is_floating_point() else torch.float32
    return weight.to(out), bias.to(out)


def predict_logits(weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor,
                   normalize: bool = True) -> torch.Tensor:
    """(N, C) logits x W^T + b, x L2-normalised first unless `normalize` is False (the setting
    `search_logistic` fitted with)."""
    if normalize:
        x = F.normalize(x.to(weight.dtype), dim=-1)
    return torch.addmm(bias, x.to(weight.dtype), weight.T)  # (N, D) @ (D, C) -> (N, C)


def search_c(score: Callable[[float], float], c_list: Sequence[float] = LPCLIP_C_LIST,
             num_steps: int = LPCLIP_STEPS) -> tuple[float, list[tuple[float, float]]]:
    """lpclip's search of C for a score to maximise: (the chosen C, every (C, score) tried).

    Every C of `c_list` is scored in order; the first best is the peak. The interval is then
    [peak / 10, peak * 10]; each of `num_steps` steps scores both of its ends, takes the upper
    end if it scores strictly higher and the lower one otherwise, and keeps the half (in log10)
    on the side of the end taken. The end taken in the last step is the chosen C (the peak when
    `num_steps` is 0). An end kept from the step before is scored again and listed again, as in
    lpclip (2 scores per step)."""
    if not c_list:
        raise UsageError("the C search needs at least one value of C")
    tried: list[tuple[float, float]] = []

    def evaluate(c: float) -> float:
        s = float(score(c))
        tried.append((c, s))
        return s

    scores = [evaluate(float(c)) for c in c_list]
    best = max(range(len(scores)), key=scores.__getitem__)  # max keeps the first of equal keys
    chosen = float(c_list[best])
    lo, hi = math.log10(chosen) - 1.0, math.log10(chosen) + 1.0
    for _ in range(num_steps):
        c_lo, c_hi = 10.0 ** lo, 10.0 ** hi
        s_lo, s_hi = evaluate(c_lo), evaluate(c_hi)
        mid = 0.5 * (lo + hi)
        if s_lo < s_hi:
            chosen, lo = c_hi, mid
        else:
            chosen, hi = c_lo, mid
    return chosen, tried


def search_logistic(x: torch.Tensor, y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                    num_classes: int, *, c_list: Sequence[float] = LPCLIP_C_LIST,
                    num_steps: int = LPCLIP_STEPS, default_c: float = DEFAULT_C,
                    max_iter: int = 1000, normalize: bool = True) -> LogisticFit:
    """lpclip's search of C on the val set, then the fit at the chosen C.

    Train and val features are L2-normalised here (row by row, in float64) unless `normalize`
    is False; the returned weights apply to normalised features (`predict_logits`). lpclip's own
    script gives scikit-learn the raw CLIP image features; `normalize=False` does the same.

    The score of a C is the val accuracy of the fit at that C, predictions being the arg max of
    the logits (first class on ties). See `search_c` for the order and the tie rules; each
    distinct C is fitted once and reused when the search scores it again. `val_accuracy` is the
    accuracy at the chosen C, which the search may not have seen as the highest. With an empty
    val set there is no search: C is `default_c` (DEFAULT_C, 1.0), `val_accuracy` is nan and
    `searched` is empty."""
    y = _check(x, y, num_classes, "search_logistic (train)")
    empty_val = val_x.numel() == 0 and val_y.numel() == 0
    if not empty_val:
        val_y = _check(val_x, val_y, num_classes, "search_logistic (val)")
    if not empty_val and val_x.shape[1] != x.shape[1]:
        raise UsageError(f"search_logistic: val features have {val_x.shape[1]} dimensions, "
                         f"train features {x.shape[1]}")
    xd = x.to(torch.float64)
    if normalize:
        xd = F.normalize(xd, dim=-1)
    out = x.dtype if x.is_floating_point() else torch.float32
    if empty_val:
        w, b = fit_logistic(xd, y, num_classes, default_c, max_iter)
        return LogisticFit(w.to(out), b.to(out), float(default_c), math.nan, [])
    vd = val_x.to(device=x.device, dtype=torch.float64)
    fits: dict[float, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def fit_at(c: float) -> tuple[torch.Tensor, torch.Tensor, float]:
        if c not in fits:
            w, b = fit_logistic(xd, y, num_classes, c, max_iter)
            pred = predict_logits(w, b, vd, normalize=normalize).argmax(dim=1)
            fits[c] = w, b, float((pred == val_y).sum()) / len(val_y)
        return fits[c]

    chosen, searched = search_c(lambda c: fit_at(c)[2], c_list, num_steps)
    w, b, acc = fit_at(chosen)
    return LogisticFit(w.to(out), b.to(out), chosen, acc, searched)
