"""Base-to-new metrics on small logit matrices whose answers are worked out by hand below."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from shipyard.pipeline.metrics import (
    average_rows,
    base_new,
    gzsl,
    harmonic_mean,
    per_class_accuracy,
    restricted_accuracy,
)

BASE, NEW = [0, 1], [2, 3]
# Four classes, six samples. Per row: label, argmax over base {0, 1}, over new {2, 3}, over all.
LOGITS = torch.tensor([
    [5.0, 1.0, 9.0, 0.0],  # label 0: base-restricted -> 0 (right); global -> 2 (wrong)
    [1.0, 3.0, 0.0, 0.0],  # label 0: -> 1 (wrong) either way
    [0.0, 4.0, 2.0, 1.0],  # label 1: -> 1 (right) either way
    [0.0, 0.0, 3.0, 1.0],  # label 2: -> 2 (right) either way
    [8.0, 0.0, 1.0, 2.0],  # label 3: new-restricted -> 3 (right); global -> 0 (wrong)
    [0.0, 0.0, 4.0, 5.0],  # label 3: -> 3 (right) either way
])
LABELS = torch.tensor([0, 0, 1, 2, 3, 3])


def test_restricted_logits_ignore_other_classes() -> None:
    # Sample 0's global argmax is class 2, yet within the base classes it is right.
    assert restricted_accuracy(LOGITS[:1], LABELS[:1], BASE) == 100.0
    # Base samples 0, 1, 2: right, wrong, right -> 2/3.
    assert restricted_accuracy(LOGITS, LABELS, BASE) == pytest.approx(200 / 3)
    # New samples 3, 4, 5: all right within {2, 3} (sample 4's 8.0 on class 0 is ignored).
    assert restricted_accuracy(LOGITS, LABELS, NEW) == 100.0


def test_numpy_and_list_inputs_give_the_same_numbers() -> None:
    got = restricted_accuracy(LOGITS.numpy(), LABELS.tolist(), BASE)
    assert got == pytest.approx(200 / 3)


def test_harmonic_mean() -> None:
    assert harmonic_mean(80.0, 40.0) == pytest.approx(2 * 80 * 40 / 120)  # 53.33
    assert harmonic_mean(50.0, 50.0) == 50.0
    assert harmonic_mean(100.0, 0.0) == 0.0
    assert harmonic_mean(0.0, 0.0) == 0.0
    assert math.isnan(harmonic_mean(math.nan, 50.0))


def test_base_new_row() -> None:
    # B = 200/3, N = 100, H = 2 * (200/3) * 100 / (500/3) = 80.
    row = base_new(LOGITS, LABELS, BASE, NEW)
    assert row == pytest.approx({"base": 200 / 3, "new": 100.0, "h": 80.0})


def test_gzsl_takes_the_argmax_over_all_classes() -> None:
    # Seen: samples 0 (-> 2), 1 (-> 1), 2 (-> 1): only sample 2 right -> 1/3.
    # Unseen: samples 3 (-> 2), 4 (-> 0), 5 (-> 3): 3 and 5 right -> 2/3.
    # H = 2 * (100/3) * (200/3) / 100 = 400/9.
    got = gzsl(LOGITS, LABELS, BASE, NEW)
    assert got == pytest.approx({"seen": 100 / 3, "unseen": 200 / 3, "h": 400 / 9})


def test_per_class_accuracy_restricted_and_global() -> None:
    # Restricted to base: class 0 has samples 0 (right) and 1 (wrong); class 1 has sample 2 (right).
    assert per_class_accuracy(LOGITS, LABELS, BASE, restrict=True) == {0: 50.0, 1: 100.0}
    assert per_class_accuracy(LOGITS, LABELS, NEW, restrict=True) == {2: 100.0, 3: 100.0}
    # Over all classes: sample 0 now goes to class 2, sample 4 to class 0.
    assert per_class_accuracy(LOGITS, LABELS, BASE, restrict=False) == {0: 0.0, 1: 100.0}
    assert per_class_accuracy(LOGITS, LABELS, NEW, restrict=False) == {2: 100.0, 3: 50.0}


def test_averaged_h_is_h_of_averaged_base_and_new() -> None:
    rows = [{"method": "m", "base": 80.0, "new": 40.0, "h": harmonic_mean(80.0, 40.0)},  # 53.33
            {"method": "m", "base": 60.0, "new": 60.0, "h": 60.0}]
    avg = average_rows(rows)
    # Mean B = 70, mean N = 50 -> H = 2 * 70 * 50 / 120 = 58.33; the mean of the Hs is 56.67.
    assert avg["h"] == pytest.approx(7000 / 120)
    assert avg["h"] != pytest.approx((rows[0]["h"] + 60.0) / 2)
    assert avg["base"] == 70.0 and avg["new"] == 50.0
    # Population std over seeds: |80 - 70| = |60 - 70| = 10, likewise for new.
    assert avg["base_std"] == pytest.approx(10.0) and avg["new_std"] == pytest.approx(10.0)
    assert avg["method"] == "m"


def test_averaged_gzsl_h_from_averaged_seen_and_unseen() -> None:
    rows = [{"base": 50.0, "new": 50.0, "h": 50.0, "gzsl_seen": 90.0, "gzsl_unseen": 10.0,
             "gzsl_h": 18.0},
            {"base": 50.0, "new": 50.0, "h": 50.0, "gzsl_seen": 70.0, "gzsl_unseen": 30.0,
             "gzsl_h": 42.0}]
    avg = average_rows(rows)
    # Seen 80, unseen 20 -> H = 2 * 80 * 20 / 100 = 32 (the mean of the Hs would be 30).
    assert avg["gzsl_h"] == pytest.approx(32.0)
    assert avg["h"] == 50.0
    # A gzsl() dict averages the same way.
    plain = average_rows([{"seen": 90.0, "unseen": 10.0, "h": 18.0},
                          {"seen": 70.0, "unseen": 30.0, "h": 42.0}])
    assert plain["h"] == pytest.approx(32.0)


def test_single_seed_average_is_the_row_with_zero_std() -> None:
    avg = average_rows([{"base": 70.0, "new": 50.0, "h": harmonic_mean(70.0, 50.0)}])
    assert avg["base_std"] == 0.0 and avg["h"] == pytest.approx(7000 / 120)


def test_empty_selection_is_nan() -> None:
    # No sample carries label 2 or 3: new accuracy, H and the classes' accuracies are NaN.
    logits, labels = LOGITS[:3], LABELS[:3]
    assert math.isnan(restricted_accuracy(logits, labels, NEW))
    assert math.isnan(restricted_accuracy(logits, labels, []))
    row = base_new(logits, labels, BASE, NEW)
    assert row["base"] == pytest.approx(200 / 3) and math.isnan(row["new"]) and math.isnan(row["h"])
    assert math.isnan(gzsl(logits, labels, BASE, NEW)["unseen"])
    per = per_class_accuracy(logits, labels, NEW, restrict=True)
    assert set(per) == {2, 3} and all(math.isnan(v) for v in per.values())
    assert per_class_accuracy(logits, labels, [], restrict=True) == {}
    empty = np.zeros((0, 4), dtype=np.float32)
    assert math.isnan(restricted_accuracy(empty, np.zeros(0, dtype=np.int64), BASE))


def test_nan_propagates_through_the_average() -> None:
    avg = average_rows([{"base": 70.0, "new": math.nan, "h": math.nan},
                        {"base": 50.0, "new": math.nan, "h": math.nan}])
    assert avg["base"] == 60.0 and math.isnan(avg["new"]) and math.isnan(avg["h"])


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="overlap"):
        base_new(LOGITS, LABELS, [0, 1], [1, 2])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        restricted_accuracy(LOGITS, LABELS, [0, 4])
    with pytest.raises(ValueError, match="repeat"):
        restricted_accuracy(LOGITS, LABELS, [0, 0])
    with pytest.raises(ValueError, match="logits"):
        restricted_accuracy(LOGITS, LABELS[:3], BASE)
    with pytest.raises(ValueError, match="at least one"):
        average_rows([])
    with pytest.raises(ValueError, match="'new' is missing"):
        average_rows([{"base": 1.0, "new": 2.0}, {"base": 1.0}])


def test_text_fields_survive_the_average_only_when_every_seed_agrees() -> None:
    same = average_rows([{"method": "coop", "base": 1.0}, {"method": "coop", "base": 3.0}])
    assert same == {"method": "coop", "base": 2.0, "base_std": 1.0}
    mixed = average_rows([{"method": "coop", "base": 1.0}, {"method": "tip", "base": 3.0}])
    assert "method" not in mixed and mixed["base"] == 2.0
    # A field numeric in one row and text in another is not averaged either.
    assert "note" not in average_rows([{"note": 1.0}, {"note": "one"}])
    assert average_rows([{"flag": True}, {"flag": True}]) == {"flag": True}  # bools are not numbers


def test_rows_without_h_get_none_and_seen_unseen_rows_take_h_from_that_pair() -> None:
    avg = average_rows([{"base": 80.0, "new": 40.0}, {"base": 60.0, "new": 20.0}])
    assert "h" not in avg and avg == {"base": 70.0, "new": 30.0, "base_std": 10.0, "new_std": 10.0}
    # GZSL rows that name seen/unseen rather than base/new take H from those.
    seen = average_rows([{"seen": 90.0, "unseen": 10.0, "h": 18.0},
                         {"seen": 70.0, "unseen": 30.0, "h": 42.0}])
    assert seen["h"] == pytest.approx(harmonic_mean(80.0, 20.0)) == pytest.approx(32.0)
    assert (seen["seen_std"], seen["unseen_std"]) == (10.0, 10.0)


def test_std_is_the_population_std_over_seeds() -> None:
    avg = average_rows([{"gzsl_seen": v, "gzsl_unseen": 0.0} for v in (1.0, 2.0, 6.0)])
    assert avg["gzsl_seen_std"] == pytest.approx(float(np.std([1.0, 2.0, 6.0])))
    assert avg["gzsl_seen_std"] != pytest.approx(float(np.std([1.0, 2.0, 6.0], ddof=1)))
    assert avg["gzsl_unseen_std"] == 0.0 and "other_std" not in average_rows([{"other": 1.0}])


@pytest.mark.parametrize("logits", [LOGITS[0], LOGITS[None], LOGITS.reshape(-1)])
def test_logits_that_are_not_two_dimensional_are_refused(logits: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"expected logits \(N, C\) and labels \(N,\)"):
        restricted_accuracy(logits, LABELS, BASE)
    with pytest.raises(ValueError, match="expected logits"):
        gzsl(logits, LABELS, BASE, NEW)
    with pytest.raises(ValueError, match="expected logits"):
        per_class_accuracy(logits, LABELS, BASE, restrict=True)


def test_labels_that_are_not_one_dimensional_are_refused() -> None:
    with pytest.raises(ValueError, match="expected logits"):
        restricted_accuracy(LOGITS, LABELS[:, None], BASE)


def test_harmonic_mean_of_a_zero_side_is_zero_and_not_nan() -> None:
    assert harmonic_mean(0.0, 50.0) == 0.0 and harmonic_mean(0.0, 0.0) == 0.0
    assert harmonic_mean(30.0, 60.0) == pytest.approx(40.0)


def test_averages_are_taken_in_float64_whatever_the_input_precision() -> None:
    # float32 would round 2^24 + 1 back to 2^24 while summing; float64 keeps every unit.
    rows = [{"base": np.float32(2 ** 24)}, {"base": np.float32(1.0)}, {"base": np.float32(1.0)}]
    assert average_rows(rows)["base"] == (2 ** 24 + 2) / 3


def test_a_single_seed_keeps_its_text_fields() -> None:
    assert average_rows([{"method": "coop", "base": 5.0}]) == {"method": "coop", "base": 5.0,
                                                               "base_std": 0.0}


@st.composite
def _restricted_case(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Tie-free logits (each row a permutation of 0..C-1), labels, a class subset and a
    relabelling permutation of the class ids."""
    c = draw(st.integers(2, 8))
    n = draw(st.integers(1, 20))
    rows = [draw(st.permutations(range(c))) for _ in range(n)]
    labels = draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n))
    classes = draw(st.lists(st.integers(0, c - 1), min_size=1, max_size=c, unique=True))
    perm = draw(st.permutations(range(c)))
    return torch.tensor(rows, dtype=torch.float32), torch.tensor(labels), classes, list(perm)


@settings(max_examples=60)
@given(case=_restricted_case())
def test_restricted_accuracy_is_invariant_to_relabelling_the_classes(
        case: tuple[torch.Tensor, torch.Tensor, list[int], list[int]]) -> None:
    """Property: renaming class ids consistently (logit columns, labels and the class list) or
    listing the classes in another order leaves the accuracy unchanged; and it equals a loop."""
    logits, labels, classes, perm = case
    acc = restricted_accuracy(logits, labels, classes)
    p = torch.tensor(perm)
    moved = torch.empty_like(logits)
    moved[:, p] = logits  # class j's column becomes column perm[j]
    relabelled = restricted_accuracy(moved, p[labels], [perm[c] for c in classes])
    shuffled = restricted_accuracy(logits, labels, list(reversed(classes)))
    hits = [max(classes, key=lambda k: float(row[k])) == int(y)
            for row, y in zip(logits, labels, strict=True) if int(y) in classes]
    if not hits:
        assert math.isnan(acc) and math.isnan(relabelled) and math.isnan(shuffled)
    else:
        assert acc == relabelled == shuffled == pytest.approx(100.0 * sum(hits) / len(hits))
