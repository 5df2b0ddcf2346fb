"""SYNC-CLIP's losses and synthetic batch on hand-computed cases (METHODS.md, section SYNC-CLIP)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from shipyard.pipeline.errors import UsageError
from shipyard.pipeline.sync_clip import DomainPool
from shipyard.pipeline.sync_losses import (
    SyncWeights,
    align_loss,
    batch_labels,
    mean_abs_distance,
    pool_rows,
    syn_loss,
    total_loss,
)

REAL = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
SYN = torch.tensor([[2.0, 1.0], [2.0, 2.0]])


def test_distance_is_the_mean_absolute_difference() -> None:
    d = mean_abs_distance(SYN, REAL)
    assert torch.allclose(d, torch.tensor([[1.5, 0.5], [2.0, 0.0]]))


def test_alignment_with_an_other_class_negative() -> None:
    # s0 (class 0): pos 1.5, the class-1 real image is nearer (0.5): relu(1.0) + 1.5 = 2.5.
    # s1 (class 1): pos 0, the class-0 image at 2: relu(-2) + 0 = 0.
    assert align_loss(SYN, REAL, torch.tensor([0, 1])).item() == pytest.approx(1.25)


def test_alignment_without_an_other_class_negative_is_the_mean_positive_distance() -> None:
    # One class only: neg = pos, so each term is pos: (1.5 + 0) / 2.
    assert align_loss(SYN, REAL, torch.tensor([0, 0])).item() == pytest.approx(0.75)


def test_the_negative_is_the_nearest_real_image_of_another_class_only() -> None:
    real = torch.tensor([[0.0, 0.0], [2.0, 2.0], [4.0, 4.0]])
    syn = torch.tensor([[2.0, 1.0], [4.0, 4.0], [4.0, 4.0]])
    # s0: pos 1.5, other-class distances 0.5 and 2.5 -> the nearest, 0.5: 1.0 + 1.5 = 2.5.
    # s1: pos 2; the same-class r2 at 0 does not count, r0 at 4 does: 0 + 2 = 2. s2: 0.
    assert align_loss(syn, real, torch.tensor([0, 1, 1])).item() == pytest.approx(4.5 / 3)


def test_the_alignment_gradient_reaches_both_domains() -> None:
    syn, real = SYN.clone().requires_grad_(), REAL.clone().requires_grad_()
    align_loss(syn, real, torch.tensor([0, 1])).backward()
    assert syn.grad is not None and real.grad is not None
    assert float(syn.grad.abs().sum()) > 0 and float(real.grad.abs().sum()) > 0
    # d/ds0 of (pos - neg + pos) / 2 = (2 sign(s0 - r0) - sign(s0 - r1)) / (2 * D)
    assert torch.allclose(syn.grad[0], torch.tensor([(2 - 0) / 4, (2 + 1) / 4]))


def test_mismatched_rows_are_refused() -> None:
    with pytest.raises(ValueError, match="pair row by row"):
        align_loss(SYN, REAL[:1], torch.tensor([0]))
    labels = torch.zeros(len(SYN) + 1, dtype=torch.long)  # features pair, labels do not
    with pytest.raises(ValueError, match="pair row by row"):
        align_loss(SYN, REAL, labels)
    with pytest.raises(ValueError, match="pair row by row"):
        align_loss(SYN[None], REAL[None], labels[:1])  # not (B, D)


def test_syn_loss_sums_the_two_halves_means() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [10.0, 0.0, 0.0]])
    labels = torch.tensor([1, 2, 0, 0])
    expected = math.log(3) + math.log(1 + 2 * math.exp(-10))
    assert syn_loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    assert syn_loss(logits, labels).item() != pytest.approx(F.cross_entropy(logits, labels).item())
    with pytest.raises(ValueError, match="2B"):
        syn_loss(logits[:3], labels[:3])


def test_total_loss_weights_the_terms() -> None:
    out = total_loss(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3.0), SyncWeights(0.4, 0.1))
    assert out.item() == pytest.approx(1.0 + 0.4 * 2.0 + 0.1 * 3.0)
    assert SyncWeights() == SyncWeights(weight=0.4, kl_weight=0.1)  # SYNC-CLIP's defaults


def _pool(labels: list[int]) -> DomainPool:
    """A pool whose row r holds the unit vector e_r (and norm r + 1): drawn rows can be read back."""
    n = len(labels)
    return DomainPool(torch.eye(n), torch.arange(1.0, n + 1), torch.tensor(labels))


def _draw(pool: DomainPool, real: torch.Tensor, new: torch.Tensor, seed: int) -> torch.Tensor:
    """The pool rows of one step's synthetic batch, as `train_sync` draws it."""
    rng = torch.Generator().manual_seed(seed)
    unit, norms = pool.draw(batch_labels(real, new, rng), rng)
    rows = unit.argmax(dim=1)
    assert torch.equal(norms, rows.float() + 1)  # each row's own norm travels with it
    return rows


def test_the_synthetic_batch_pairs_each_real_label_then_draws_new_classes() -> None:
    pool = _pool([0, 0, 1, 2, 2, 3])
    real = torch.tensor([1, 0, 1])
    new = torch.tensor([2, 3])
    seen_rows, seen_new = set(), set()
    for seed in range(30):
        idx = _draw(pool, real, new, seed)
        assert idx.shape == (6,)
        assert pool.labels[idx[:3]].tolist() == [1, 0, 1]
        assert set(pool.labels[idx[3:]].tolist()) <= {2, 3}
        seen_rows.add(int(idx[1]))
        seen_new.update(pool.labels[idx[3:]].tolist())
    assert seen_rows == {0, 1} and seen_new == {2, 3}  # uniform among rows, and among new classes
    assert torch.equal(_draw(pool, real, new, 7), _draw(pool, real, new, 7))


def test_pool_rows_are_drawn_by_the_generator_given_not_the_global_one() -> None:
    """The same generator seed draws the same rows whatever the global RNG holds (64 classes of
    8 rows, 256 draws: the global RNG's draws for two seeds would differ)."""
    labels = torch.arange(64).repeat_interleave(8)
    wanted = torch.arange(64).repeat(4)
    draws = []
    with torch.random.fork_rng():
        for global_seed in (1, 2):
            torch.manual_seed(global_seed)
            draws.append(pool_rows(wanted, labels, torch.Generator().manual_seed(5)))
    assert torch.equal(draws[0], draws[1])
    assert torch.equal(labels[draws[0]], wanted)


def test_a_class_missing_from_the_synthetic_domain_is_one_clear_error() -> None:
    with pytest.raises(UsageError, match=r"no image of class id\(s\) 1"):
        _draw(_pool([0, 2]), torch.tensor([1]), torch.tensor([2]), 0)
    with pytest.raises(UsageError, match="at least one new class"):
        batch_labels(torch.tensor([0]), torch.tensor([], dtype=torch.long), torch.Generator())


def test_the_missing_classes_are_listed_six_at_most_in_one_sentence() -> None:
    pool = DomainPool(F.normalize(torch.randn(1, 4), dim=-1), torch.ones(1), torch.tensor([0]))
    with pytest.raises(UsageError, match=r"^the synthetic domain has no image of class id\(s\) "
                                         r"1, 2, 3, 4, 5, 6: SYNC-CLIP needs every class \(base "
                                         r"and new\) in it$"):
        pool.draw(torch.arange(8), torch.Generator().manual_seed(0))
    with pytest.raises(UsageError, match=r"^SYNC-CLIP's synthetic batch needs at least one new "
                                         r"class$"):
        batch_labels(torch.tensor([0]), torch.tensor([], dtype=torch.long), torch.Generator())
