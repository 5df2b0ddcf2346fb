"""The Dassl-compatible few-shot sampler, pinned against an independent model of Dassl's draw.

Dassl (used by CoOp and the methods built on it) seeds Python's `random` with the run seed, then
draws the training subset with K shots and the val subset with min(K, 4) shots from the same
stream. For each subset the items are grouped by label in order of first appearance; a label with
at least K items gets `random.sample(items, K)`, a label with fewer keeps all its items, in order,
without drawing.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterable

import numpy as np
import pytest
from shipyard.pipeline.datasets import Split, dassl_few_shot

Rows = list[int]


def _by_first_appearance(rows: Iterable[int], labels: np.ndarray) -> list[Rows]:
    groups: dict[int, Rows] = {}
    for row in rows:
        groups.setdefault(int(labels[row]), []).append(row)
    return list(groups.values())


def _by_sorted_label(rows: Iterable[int], labels: np.ndarray) -> list[Rows]:
    """The wrong grouping: labels visited in ascending order."""
    groups: dict[int, Rows] = defaultdict(list)
    for row in rows:
        groups[int(labels[row])].append(row)
    return [groups[label] for label in sorted(groups)]


def _draw(groups: list[Rows], shots: int, rng: random.Random) -> Rows:
    out: Rows = []
    for items in groups:
        out += rng.sample(items, shots) if len(items) >= shots else items
    return out


def _candidates(splits: np.ndarray, split: Split, keys: np.ndarray | None) -> Rows:
    """Rows of one split in stored order; with keys, only the first row of each image."""
    rows = [int(r) for r in np.flatnonzero(splits == split)]
    if keys is None:
        return rows
    seen: set[bytes] = set()
    kept: Rows = []
    for row in rows:
        key = keys[row].tobytes()
        if key not in seen:
            seen.add(key)
            kept.append(row)
    return kept


Grouping = Callable[[Iterable[int], np.ndarray], list[Rows]]


def reference(labels: np.ndarray, splits: np.ndarray, shots: int, seed: int,
              keys: np.ndarray | None = None,
              grouping: Grouping = _by_first_appearance) -> tuple[Rows, Rows]:
    rng = random.Random(seed)
    train = _draw(grouping(_candidates(splits, Split.TRAIN, keys), labels), shots, rng)
    val = _draw(grouping(_candidates(splits, Split.VAL, keys), labels), min(shots, 4), rng)
    return train, val


def _check(labels: np.ndarray, splits: np.ndarray, shots: int, seed: int,
           keys: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The function's result, asserted equal (order and dtype included) to the reference's."""
    train, val = dassl_few_shot(labels, splits, shots, seed, keys=keys)
    want_train, want_val = reference(labels, splits, shots, seed, keys)
    for got, want in ((train, want_train), (val, want_val)):
        assert isinstance(got, np.ndarray)
        assert got.dtype == np.int64
        assert got.ndim == 1
        assert got.tolist() == want, (shots, seed, got.tolist(), want)
    return train, val


def _layout(gen_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random labels and splits: 3-12 classes, rows shuffled so labels interleave, the first row's
    label is the largest (first appearance is never sorted order), 0-40 train, 0-10 val and 0-5
    test rows per label."""
    gen = np.random.default_rng(gen_seed)
    num_classes = int(gen.integers(3, 13))
    labels: list[int] = []
    splits: list[int] = []
    for label in range(num_classes):
        for split, high in ((Split.TRAIN, 41), (Split.VAL, 11), (Split.TEST, 6)):
            n = int(gen.integers(0, high))
            labels += [label] * n
            splits += [int(split)] * n
    order = gen.permutation(len(labels))
    lab = np.asarray(labels, dtype=np.int64)[order]
    spl = np.asarray(splits, dtype=np.int8)[order]
    top = int(np.flatnonzero(lab == lab.max())[0])
    lab[[0, top]] = lab[[top, 0]]
    spl[[0, top]] = spl[[top, 0]]
    return lab, spl


LAYOUTS = list(range(8))


@pytest.mark.parametrize("gen_seed", LAYOUTS)
@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_layouts_match_dassl(gen_seed: int, shots: int, seed: int) -> None:
    labels, splits = _layout(gen_seed)
    assert labels[0] != labels.min()
    train, val = _check(labels, splits, shots, seed)
    assert (splits[train] == Split.TRAIN).all()
    assert (splits[val] == Split.VAL).all()
    for rows, k, split in ((train, shots, Split.TRAIN), (val, min(shots, 4), Split.VAL)):
        assert len(set(rows.tolist())) == len(rows)  # never a repeat
        for label in np.unique(labels[splits == split]):
            have = int(((labels == label) & (splits == split)).sum())
            assert int((labels[rows] == label).sum()) == min(k, have)


def test_layouts_cover_short_and_empty_labels() -> None:
    """The random layouts include labels with fewer than K train items and labels with none."""
    short = empty = 0
    for gen_seed in LAYOUTS:
        labels, splits = _layout(gen_seed)
        counts = np.bincount(labels[splits == Split.TRAIN], minlength=int(labels.max()) + 1)
        short += int(((counts > 0) & (counts < 16)).sum())
        empty += int((counts == 0).sum())
    assert short > 0
    assert empty > 0


def test_hand_checkable_case() -> None:
    # label 7: 3 train rows (< K=4, kept whole, in order, no draw); label 2: 6 train rows (drawn);
    # label 4: exactly 4 train rows (drawn, so permuted); val: 5 rows of label 2, 2 of label 7.
    labels = np.array([7, 2, 2, 7, 4, 2, 2, 4, 7, 2, 4, 2, 4, 2, 2, 2, 2, 2, 7, 7, 2])
    splits = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 1, 1, 1], np.int8)
    train, val = _check(labels, splits, shots=4, seed=1)
    # Label 7 comes first and keeps rows 0, 3, 8 as stored.
    assert train[:3].tolist() == [0, 3, 8]
    assert set(train[3:7].tolist()) <= {1, 2, 5, 6, 9, 11}
    assert sorted(train[7:].tolist()) == [4, 7, 10, 12]
    assert len(train) == 11
    # Val: min(4, 4) = 4 of label 2's five val rows, then label 7's two val rows as stored.
    assert set(val[:4].tolist()) <= {13, 14, 15, 16, 20}
    assert val[4:].tolist() == [18, 19]
    # With K = 8 every train label is short: all train rows, grouped by first appearance, in order,
    # and val still draws min(8, 4) = 4 of label 2.
    train8, val8 = _check(labels, splits, shots=8, seed=1)
    assert train8.tolist() == [0, 3, 8, 1, 2, 5, 6, 9, 11, 4, 7, 10, 12]
    assert len(val8) == 6
    assert val8[4:].tolist() == [18, 19]
    # With K = 1 val draws one of each label.
    _, val1 = _check(labels, splits, shots=1, seed=1)
    assert len(val1) == 2


def test_val_draw_continues_the_train_stream() -> None:
    """Val is drawn from the same RNG after train, not from a freshly seeded one."""
    labels = np.array([0] * 30 + [1] * 30 + [0] * 10 + [1] * 10)
    splits = np.array([0] * 60 + [1] * 20, np.int8)
    _, val = _check(labels, splits, shots=8, seed=3)
    fresh = _draw(_by_first_appearance(range(60, 80), labels), 4, random.Random(3))
    assert val.tolist() != fresh


def test_labels_visited_in_first_appearance_order() -> None:
    # Label 5's rows come first; visiting labels in sorted order would draw label 0 from the fresh
    # stream instead, changing which rows are drawn, not only their order.
    labels = np.array([5] * 12 + [0] * 12 + [5] * 6 + [0] * 6)
    splits = np.array([0] * 24 + [1] * 12, np.int8)
    for seed in (1, 2, 3):
        train, val = _check(labels, splits, shots=4, seed=seed)
        assert labels[train[:4]].tolist() == [5] * 4
        wrong_train, wrong_val = reference(labels, splits, 4, seed, grouping=_by_sorted_label)
        assert train.tolist() != wrong_train
        assert set(train.tolist()) != set(wrong_train)
        assert val.tolist() != wrong_val


def test_seeds_give_different_subsets() -> None:
    labels = np.tile(np.arange(6), 40)  # 40 train rows per label
    splits = np.zeros(len(labels), np.int8)
    splits[-60:] = Split.VAL  # the last 10 rows of each label are val
    drawn = {seed: _check(labels, splits, shots=16, seed=seed) for seed in (1, 2, 3)}
    for a, b in ((1, 2), (1, 3), (2, 3)):
        assert set(drawn[a][0].tolist()) != set(drawn[b][0].tolist())
        assert set(drawn[a][1].tolist()) != set(drawn[b][1].tolist())
    # The same seed gives the same subset.
    again = dassl_few_shot(labels, splits, 16, 2)
    np.testing.assert_array_equal(again[0], drawn[2][0])
    np.testing.assert_array_equal(again[1], drawn[2][1])


def _distinct_keys(n: int) -> np.ndarray:
    keys = np.zeros((n, 32), np.uint8)
    keys[:, :4] = np.arange(n, dtype=np.uint32).view(np.uint8).reshape(n, 4)
    return keys


@pytest.mark.parametrize("gen_seed", LAYOUTS)
@pytest.mark.parametrize("shots", [1, 4, 16])
def test_duplicate_images_count_once(gen_seed: int, shots: int) -> None:
    """A later row of an image already listed in the same split (same label) is not a candidate;
    the same image in train and in val is a candidate in each."""
    labels, splits = _layout(gen_seed)
    keys = _distinct_keys(len(labels))
    gen = np.random.default_rng(100 + gen_seed)
    dups = 0
    for row in range(1, len(labels)):
        if gen.random() >= 0.3:
            continue
        earlier = np.flatnonzero(labels[:row] == labels[row])
        same = earlier[splits[earlier] == splits[row]]
        other = earlier[splits[earlier] != splits[row]]
        if len(same) and gen.random() < 0.8:
            keys[row] = keys[int(gen.choice(same))]
            dups += int(splits[row] != Split.TEST)
        elif len(other):
            keys[row] = keys[int(gen.choice(other))]
    assert dups > 0
    for seed in (1, 2, 3):
        train, val = _check(labels, splits, shots, seed, keys=keys)
        assert len({keys[r].tobytes() for r in train}) == len(train)
        assert len({keys[r].tobytes() for r in val}) == len(val)
        # Equal to the sampler run on the records with the later duplicates dropped.
        keep = np.asarray(sorted(_candidates(splits, Split.TRAIN, keys)
                                 + _candidates(splits, Split.VAL, keys)), np.int64)
        sub_train, sub_val = dassl_few_shot(labels[keep], splits[keep], shots, seed)
        assert train.tolist() == keep[sub_train].tolist()
        assert val.tolist() == keep[sub_val].tolist()
    # Distinct keys change nothing.
    for seed in (1, 2):
        with_keys = dassl_few_shot(labels, splits, shots, seed, keys=_distinct_keys(len(labels)))
        without = dassl_few_shot(labels, splits, shots, seed)
        np.testing.assert_array_equal(with_keys[0], without[0])
        np.testing.assert_array_equal(with_keys[1], without[1])


def test_duplicate_rows_hand_checked() -> None:
    # Train rows 0..5 of label 0, where rows 3, 4 and 5 repeat the images of rows 0, 1 and 2; with
    # K = 3 the three distinct images are the only candidates and each is drawn once.
    labels = np.zeros(8, np.int64)
    splits = np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int8)
    keys = _distinct_keys(8)
    keys[3:6] = keys[0:3]
    keys[7] = keys[6]  # the two val rows are one image
    for seed in range(1, 6):
        train, val = _check(labels, splits, shots=3, seed=seed, keys=keys)
        assert sorted(train.tolist()) == [0, 1, 2]
        assert val.tolist() == [6]  # one distinct val image: short of min(3, 4), kept whole
    # The same image as a train row and a val row is a candidate in both splits.
    keys2 = _distinct_keys(8)
    keys2[6] = keys2[0]
    _, val2 = _check(labels, splits, shots=3, seed=1, keys=keys2)
    assert val2.tolist() == [6, 7]


def test_duplicate_across_labels_within_a_split() -> None:
    """The contract is per split: a later row repeating an earlier row's image in the same split is
    not a candidate even under another label."""
    labels = np.array([3, 3, 3, 1, 1, 1, 1])
    splits = np.zeros(7, np.int8)
    keys = _distinct_keys(7)
    keys[6] = keys[0]  # row 6 (label 1) is the image of row 0 (label 3)
    for seed in (1, 2, 3):
        # K = 4: label 3 has 3 rows and label 1 is left with 3 candidates, so both are kept whole.
        train, _ = _check(labels, splits, shots=4, seed=seed, keys=keys)
        assert train.tolist() == [0, 1, 2, 3, 4, 5]


def test_no_candidates() -> None:
    labels = np.array([0, 1, 2])
    splits = np.full(3, Split.TEST, np.int8)
    train, val = _check(labels, splits, shots=4, seed=1)
    assert train.shape == (0,)
    assert val.shape == (0,)


# One fixed layout and the rows the Dassl procedure draws for it under CPython's `random`. Train
# labels first appear in the order 4, 0, 1 and val labels in the order 1, 4, 0; label 0 has exactly
# 4 train rows and label 1 has 7, 5 val rows of label 1, 6 of label 4 and 2 of label 0.
PINNED_LABELS = np.array([4, 1, 4, 4, 0, 1, 1, 4, 1, 0, 4, 1, 4, 1, 0, 1, 1, 0, 4, 0, 1, 4, 4, 4,
                          1, 4, 1, 4, 0, 4, 4, 0, 4, 1, 4, 4, 1])
PINNED_SPLITS = np.array([0, 1, 0, 0, 0, 1, 0, 1, 0, 0, 1, 0, 0, 2, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0,
                          0, 0, 0, 1, 0, 1, 0, 2, 0, 1, 2, 1, 0], np.int8)
PINNED: dict[tuple[int, int], tuple[list[int], list[int]]] = {
    (1, 1): ([3, 4, 11], [1, 27, 19]),
    (1, 2): ([0, 4, 6], [15, 10, 19]),
    (4, 1): ([3, 2, 21, 0, 28, 9, 17, 4, 36, 8, 6, 16], [1, 20, 5, 33, 35, 27, 18, 29, 14, 19]),
    (4, 2): ([0, 2, 30, 3, 9, 17, 28, 4, 24, 8, 36, 6], [33, 5, 20, 15, 35, 29, 18, 27, 14, 19]),
    (8, 1): ([3, 2, 21, 0, 12, 22, 25, 32, 4, 9, 17, 28, 6, 8, 11, 16, 24, 26, 36],
             [20, 5, 1, 33, 7, 27, 29, 18, 14, 19]),
    (8, 2): ([0, 2, 30, 3, 25, 23, 21, 12, 4, 9, 17, 28, 6, 8, 11, 16, 24, 26, 36],
             [5, 1, 15, 20, 27, 35, 18, 29, 14, 19]),
}


@pytest.mark.parametrize(("shots", "seed"), sorted(PINNED))
def test_pinned_rows(shots: int, seed: int) -> None:
    want_train, want_val = PINNED[shots, seed]
    assert reference(PINNED_LABELS, PINNED_SPLITS, shots, seed) == (want_train, want_val)
    train, val = dassl_few_shot(PINNED_LABELS, PINNED_SPLITS, shots, seed)
    assert train.tolist() == want_train
    assert val.tolist() == want_val
