"""The lpclip linear probe: optimality of the L-BFGS fit, a two-class problem solved by Newton's
method on its binary reduction, the effect of C, lpclip's search order and tie rules, and the
default C without a val set."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from shipyard.pipeline.errors import UsageError
from shipyard.pipeline.lpclip import (
    DEFAULT_C,
    LPCLIP_C_LIST,
    LPCLIP_STEPS,
    fit_logistic,
    predict_logits,
    search_c,
    search_logistic,
)

LPCLIP_LIST = [1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6]  # lpclip/linear_probe.py's search_list


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread: None) -> Iterator[None]:
    yield


def objective(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
              c: float) -> torch.Tensor:
    """0.5 ||W||^2 + c * sum_i (logsumexp(z_i) - z_i[y_i]), written out."""
    z = x @ w.T + b
    ce = torch.logsumexp(z, dim=1) - z.gather(1, y[:, None]).squeeze(1)
    return 0.5 * (w * w).sum() + c * ce.sum()


def noisy(n: int, d: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Overlapping classes (not separable): random features, labels from a noisy linear rule."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(k, d, generator=g, dtype=torch.float64)
    z = x @ w.T + 2.0 * torch.randn(n, k, generator=g, dtype=torch.float64)
    return x, z.argmax(dim=1)


# --- 1. optimality -------------------------------------------------------------------------------

@pytest.mark.parametrize("c", [0.05, 1.0, 20.0])
def test_the_fit_is_a_stationary_point_and_a_local_minimum(c: float) -> None:
    x, y = noisy(60, 8, 4, seed=0)
    w, b = fit_logistic(x, y, 4, c)
    assert w.shape == (4, 8) and b.shape == (4,) and w.dtype == torch.float64
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    at = objective(x, y, wg, bg, c)
    at.backward()
    assert wg.grad is not None and bg.grad is not None
    scale = 1.0 + c * len(x)  # the objective is a sum over samples
    assert float(wg.grad.abs().max()) < 1e-7 * scale
    assert float(bg.grad.abs().max()) < 1e-7 * scale
    # The stationarity condition in closed form: W = c X^T (Y - P), so its class sum is zero.
    p = torch.softmax(x @ w.T + b, dim=1)
    torch.testing.assert_close(w, c * (F.one_hot(y, 4).double() - p).T @ x, atol=1e-6 * scale, rtol=0)
    assert float(w.sum(dim=0).abs().max()) < 1e-8 * scale
    assert abs(float(b.sum())) < 1e-12  # the free shift of the bias is fixed to sum zero
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(20):
            dw = 1e-3 * torch.randn(w.shape, generator=g, dtype=torch.float64)
            db = 1e-3 * torch.randn(b.shape, generator=g, dtype=torch.float64)
            assert float(objective(x, y, w + dw, b + db, c)) > float(at)


# --- 2. a known solution, and a class without samples -------------------------------------------

def newton_binary(x: torch.Tensor, s: torch.Tensor, c: float) -> tuple[float, float]:
    """Minimise 0.25 beta^2 + c sum_i softplus(-s_i (beta x_i + alpha)) by damped Newton steps:
    the two-class multinomial problem once W = [-beta/2, beta/2] (the norm-minimising split of
    the logit difference beta) and b = [-alpha/2, alpha/2]."""
    theta = torch.zeros(2, dtype=torch.float64)
    feats = torch.stack([x, torch.ones_like(x)], dim=1)  # (N, 2): [x_i, 1]

    def f(t: torch.Tensor) -> float:
        return float(0.25 * t[0] ** 2 + c * F.softplus(-s * (feats @ t)).sum())

    for _ in range(100):
        m = torch.sigmoid(-s * (feats @ theta))  # (N,)
        grad = torch.tensor([0.5 * theta[0], 0.0], dtype=torch.float64) - c * feats.T @ (s * m)
        hess = c * feats.T @ (feats * (m * (1 - m))[:, None])
        hess[0, 0] += 0.5
        step = torch.linalg.solve(hess, grad)
        t = 1.0
        while f(theta - t * step) > f(theta) and t > 1e-10:
            t *= 0.5
        theta = theta - t * step
        if float(grad.abs().max()) < 1e-13:
            break
    return float(theta[0]), float(theta[1])


@pytest.mark.parametrize("c", [1.0, 10.0])
def test_two_separable_classes_in_one_dimension_match_newton(c: float) -> None:
    x = torch.tensor([-3.0, -1.0, 0.5, 2.0, 2.5], dtype=torch.float64)
    y = torch.tensor([0, 0, 1, 1, 1])
    beta, alpha = newton_binary(x, 2.0 * y.double() - 1.0, c)
    w, b = fit_logistic(x[:, None], y, 2, c)
    want_w = torch.tensor([[-beta / 2], [beta / 2]], dtype=torch.float64)
    want_b = torch.tensor([-alpha / 2, alpha / 2], dtype=torch.float64)
    torch.testing.assert_close(w, want_w, atol=1e-6, rtol=0)
    torch.testing.assert_close(b, want_b, atol=1e-6, rtol=0)
    assert beta > 1.0 and alpha != 0.0  # a real slope, and an off-centre threshold


def test_a_class_without_samples_gets_a_finite_row_that_is_never_predicted() -> None:
    x, y = noisy(50, 6, 3, seed=3)
    y4 = torch.tensor([0, 1, 3])[y]  # labels 0, 1, 3 of four classes: class 2 has no sample
    w, b = fit_logistic(x, y4, 4, 1.0)
    assert bool(torch.isfinite(w).all()) and bool(torch.isfinite(b).all())
    assert bool((w[2] == 0).all())
    w3, b3 = fit_logistic(x, y, 3, 1.0)  # the same data without the empty class
    assert torch.equal(w[[0, 1, 3]], w3) and torch.equal(b[[0, 1, 3]], b3)
    # Any input no longer than the longest training feature: class 2's probability is below
    # eps times every other class's.
    g = torch.Generator().manual_seed(4)
    radius = x.norm(dim=1).max()
    probe = torch.cat([x, radius * F.normalize(torch.randn(500, 6, generator=g, dtype=torch.float64))])
    logits = probe @ w.T + b
    gap = logits[:, 2] - logits[:, [0, 1, 3]].min(dim=1).values
    assert float(gap.max()) <= math.log(torch.finfo(torch.float64).eps) + 1e-9
    assert not bool((logits.argmax(dim=1) == 2).any())
    # A single class present: the constant classifier.
    w1, b1 = fit_logistic(x, torch.full((50,), 1), 3, 1.0)
    assert bool((w1 == 0).all()) and float(b1[1]) == 0.0 and float(b1[0]) == float(b1[2]) < -36.0


# --- 3. the effect of C ---------------------------------------------------------------------------

def test_a_larger_c_gives_a_larger_weight_norm() -> None:
    x, y = noisy(60, 8, 4, seed=5)
    cs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0]
    norms = [float(fit_logistic(x, y, 4, c)[0].norm()) for c in cs]
    assert all(a < b for a, b in itertools.pairwise(norms)), norms
    # ||W|| = c ||X^T (Y - P)|| <= c sqrt(2) sum_i ||x_i||: the weights vanish with c.
    bound = math.sqrt(2.0) * float(x.norm(dim=1).sum())
    assert all(nrm <= c * bound for c, nrm in zip(cs, norms, strict=True))
    # On separable data the norm keeps growing up to lpclip's largest C.
    xs = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]], dtype=torch.float64)
    ys = torch.tensor([0, 0, 1, 1])
    sep = [float(fit_logistic(xs, ys, 2, c)[0].norm()) for c in (1.0, 1e2, 1e4, 1e6)]
    assert all(a < b for a, b in itertools.pairwise(sep)), sep


# --- 4. the search ---------------------------------------------------------------------------------

def test_the_constants_are_lpclips() -> None:
    assert list(LPCLIP_C_LIST) == LPCLIP_LIST and LPCLIP_STEPS == 8 and DEFAULT_C == 1.0


def test_the_search_order_on_a_planted_score() -> None:
    """Score -|log10 C - 2.3|: the peak of the list is 1e2, then each step scores both ends of
    the interval and halves it towards the better end."""
    chosen, tried = search_c(lambda c: -abs(math.log10(c) - 2.3))
    exps = [1, 3, 2, 3, 2, 2.5, 2.25, 2.5, 2.25, 2.375, 2.25, 2.3125, 2.28125, 2.3125, 2.296875,
            2.3125]
    assert [c for c, _ in tried] == LPCLIP_LIST + [10.0 ** e for e in exps]
    assert chosen == 10.0 ** 2.296875  # the winner of the last step, 1/64 decade from 10^2.3
    assert [s for _, s in tried][:7] == [-abs(e - 2.3) for e in (6, 4, 2, 0, -2, -4, -6)]


def test_ties_keep_the_first_peak_and_the_lower_end() -> None:
    # Two best values in the list: the first (1e2, not 1e-2) is the peak.
    chosen, tried = search_c(lambda c: 1.0 if c in (1e2, 1e-2) else 0.0, num_steps=1)
    assert [c for c, _ in tried[7:]] == [10.0, 1000.0] and chosen == 10.0
    # All equal: the peak is 1e6 and every step keeps the lower end.
    chosen, tried = search_c(lambda c: 0.5)
    lows = [10.0 ** (5 + 2.0 ** -j) for j in range(-1, 7)]  # 1e7, 1e6, 10^5.5, ..., 10^5.015625
    assert [c for c, _ in tried[7:]] == [v for hi in lows for v in (1e5, hi)]
    assert chosen == 1e5
    assert search_c(lambda c: 0.5, num_steps=0) == (1e6, [(c, 0.5) for c in LPCLIP_LIST])


def test_search_logistic_picks_the_planted_band() -> None:
    """A 1-D threshold that falls from +inf (small C: the majority class everywhere) to about
    0.25 (large C). Val: a class-1 point at 0.4, right once t < 0.4 (C above ~10^0.3), and a
    class-0 point at 0.255, right while t > 0.255 (C below ~10^2.5). Of lpclip's list only
    1e2 gets both; the refinement then ties inside the band and keeps the lower end, 10."""
    x = torch.tensor([[-1.0]] * 6 + [[-0.5]] * 2 + [[1.0]] * 2, dtype=torch.float64)
    y = torch.tensor([0] * 8 + [1] * 2)
    vx = torch.tensor([[0.4], [0.255]], dtype=torch.float64)
    vy = torch.tensor([1, 0])
    fit = search_logistic(x, y, vx, vy, 2, normalize=False)
    assert [a for _, a in fit.searched[:7]] == [0.5, 0.5, 1.0, 0.5, 0.5, 0.5, 0.5]
    assert [c for c, _ in fit.searched[:7]] == LPCLIP_LIST
    exps = [1, 3] + [e for j in range(7) for e in (1, 1 + 2.0 ** -j)]
    assert [c for c, _ in fit.searched[7:]] == [10.0 ** e for e in exps]
    assert [a for _, a in fit.searched[7:]] == [1.0, 0.5] + [1.0] * 14
    assert fit.c == 10.0 and fit.val_accuracy == 1.0
    w, b = fit_logistic(x, y, 2, 10.0)
    assert torch.equal(fit.weight, w) and torch.equal(fit.bias, b)


def test_search_logistic_ties_everywhere_keep_the_first_best_and_the_lower_end() -> None:
    """One val point every C gets right (the majority class at its centre): every score ties,
    so the peak is 1e6 and every step keeps the lower end, ending at 1e5."""
    g = torch.Generator().manual_seed(6)
    centres = F.normalize(torch.randn(2, 16, generator=g), dim=-1)
    y = torch.tensor([0] * 12 + [1] * 4)
    x = centres[y] + 0.3 * torch.randn(16, 16, generator=g)
    fit = search_logistic(x, y, centres[:1], torch.tensor([0]), 2)
    assert [c for c, _ in fit.searched[:7]] == LPCLIP_LIST
    assert len(fit.searched) == 7 + 2 * LPCLIP_STEPS
    assert all(a == 1.0 for _, a in fit.searched)
    assert fit.c == 1e5 and fit.val_accuracy == 1.0
    assert fit.weight.dtype == torch.float32 and fit.bias.shape == (2,)


def test_features_are_normalised_inside() -> None:
    x, y = noisy(40, 6, 3, seed=7)
    vx, vy = noisy(12, 6, 3, seed=8)
    unit = search_logistic(F.normalize(x, dim=-1), y, F.normalize(vx, dim=-1), vy, 3)
    g = torch.Generator().manual_seed(9)
    scaled = search_logistic(x * torch.rand(40, 1, generator=g, dtype=torch.float64) * 50, y,
                             vx * 3.0, vy, 3)
    assert scaled.c == unit.c and scaled.searched == unit.searched
    torch.testing.assert_close(scaled.weight, unit.weight, atol=1e-6, rtol=0)
    # `unit` normalised its (already unit) input again: the same float64 rows here, bit for bit.
    w, b = fit_logistic(F.normalize(F.normalize(x, dim=-1), dim=-1), y, 3, unit.c)
    torch.testing.assert_close(unit.weight, w, atol=1e-12, rtol=0)
    torch.testing.assert_close(unit.bias, b, atol=1e-12, rtol=0)
    pred = predict_logits(unit.weight, unit.bias, vx).argmax(dim=1)
    assert float((pred == vy).double().mean()) == unit.val_accuracy


# --- 5. no val set -------------------------------------------------------------------------------

def test_an_empty_val_set_uses_the_default_c() -> None:
    x, y = noisy(30, 5, 3, seed=10)
    x32 = x.float()
    fit = search_logistic(x32, y, torch.empty(0, 5), torch.empty(0, dtype=torch.long), 3)
    assert fit.c == DEFAULT_C == 1.0 and math.isnan(fit.val_accuracy) and fit.searched == []
    w, b = fit_logistic(F.normalize(x32.double(), dim=-1), y, 3, 1.0)
    assert fit.weight.dtype == torch.float32
    assert torch.equal(fit.weight, w.float()) and torch.equal(fit.bias, b.float())


def test_bad_inputs_are_refused() -> None:
    x, y = noisy(10, 4, 2, seed=11)
    with pytest.raises(UsageError, match=r"labels must lie in 0\.\.1"):
        fit_logistic(x, y + 1, 2, 1.0)
    with pytest.raises(UsageError, match="C must be positive"):
        fit_logistic(x, y, 2, 0.0)
    with pytest.raises(UsageError, match="dimensions"):
        search_logistic(x, y, torch.zeros(2, 3), torch.tensor([0, 1]), 2)
