"""The classes cache index against the dense Tip-Adapter formula: exact when T covers every class,
the winning logit always exact, centroid estimates that never exceed the true sums, candidates
picked inside the scored classes, and a tuned T that is the smallest reaching its target."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from shipyard.pipeline import class_index
from shipyard.pipeline.class_index import (
    ClassIndex,
    class_kmeans,
    scoped_agreement,
    subcentroid_count,
    tune_candidates,
    tuning_queries,
)
from shipyard.pipeline.errors import UsageError
from shipyard.pipeline.tip import tip_logits

D, C = 32, 12
ALPHA, BETA = 1.3, 5.5


def mixture(n: int, seed: int, modes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit features of C classes with several modes each (so classes have several sub-clusters),
    labels in a shuffled order: (n, D), (n,)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(C, modes, D, generator=torch.Generator().manual_seed(0)), dim=-1)
    labels = torch.randint(0, C, (n,), generator=g)
    mode = torch.randint(0, modes, (n,), generator=g)
    return F.normalize(centres[labels, mode] + 0.6 * torch.randn(n, D, generator=g), dim=-1), labels


@pytest.fixture(scope="module")
def cache() -> dict[str, torch.Tensor]:
    keys, labels = mixture(1500, seed=1)
    queries, _ = mixture(200, seed=2)
    text = F.normalize(torch.randn(C, D, generator=torch.Generator().manual_seed(3)), dim=-1)
    return {"keys": keys, "labels": labels, "queries": queries, "text": text,
            "dense": tip_logits(queries, keys, labels, text, ALPHA, BETA)}


@pytest.fixture  # per test: a mutation run must see every test build it
def index(cache: dict[str, torch.Tensor]) -> ClassIndex:
    return ClassIndex.build(cache["keys"], cache["labels"], C)


def class_sums(q: torch.Tensor, keys: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The exact per-class sums of exp(-beta (1 - q k)) by a loop over classes: (B, C)."""
    return torch.stack([torch.exp(-BETA * (1 - q @ keys[labels == c].T)).sum(1) for c in range(C)], 1)


def test_keys_are_grouped_by_class_keeping_their_order(cache: dict[str, torch.Tensor],
                                                       index: ClassIndex) -> None:
    for c in range(C):
        mine = index.keys[int(index.offsets[c]):int(index.offsets[c + 1])]
        torch.testing.assert_close(mine, cache["keys"][cache["labels"] == c], rtol=0, atol=0)
    assert torch.equal(index.labels(), torch.sort(cache["labels"]).values)


def test_every_class_is_split_into_subclusters_whose_sizes_add_up(index: ClassIndex,
                                                                   cache: dict[str, torch.Tensor]) -> None:
    sizes = torch.bincount(cache["labels"], minlength=C)
    for c in range(C):
        mine = index.owner == c
        assert int(mine.sum()) == subcentroid_count(int(sizes[c]))
        assert float(index.counts[mine].sum()) == int(sizes[c])


def test_subcentroids_grow_with_the_class_size_up_to_the_cap() -> None:
    per = class_index.KEYS_PER_SUBCENTROID
    assert [subcentroid_count(n) for n in (1, per - 1, per, 2 * per, 3 * per, 100 * per)] == \
        [1, 1, 1, 2, 3, class_index.SUBCENTROIDS]
    assert subcentroid_count(100 * per, most=2) == 2


def test_class_kmeans_means_are_the_raw_means_of_their_members() -> None:
    keys, _ = mixture(300, seed=5)
    means, sizes = class_kmeans(keys, 3, seed=0)
    again, _ = class_kmeans(keys, 3, seed=0)
    torch.testing.assert_close(means, again, rtol=0, atol=0)  # seeded: the same every time
    assign = (keys @ F.normalize(means, dim=1).T).argmax(1)
    # At convergence each key's nearest normalised mean is its own cluster's, and each mean the
    # raw average of its keys (not renormalised: the Jensen bound needs the plain mean).
    for j in range(len(means)):
        torch.testing.assert_close(means[j], keys[assign == j].mean(0), atol=1e-5, rtol=0)
        assert int(sizes[j]) == int((assign == j).sum())
    assert float(means.norm(dim=1).max()) < 0.99


def test_centroid_estimates_never_exceed_the_exact_class_sums(cache: dict[str, torch.Tensor],
                                                               index: ClassIndex) -> None:
    exact = class_sums(cache["queries"], cache["keys"], cache["labels"])
    bounds = index.bounds(cache["queries"], BETA)
    assert bool((bounds <= exact * (1 + 1e-5)).all())
    # Tight where it should be: one sub-cluster per key reproduces the sum exactly.
    one_each = ClassIndex(index.keys, index.offsets, index.keys, torch.ones(len(index.keys)),
                          index.labels())
    torch.testing.assert_close(one_each.bounds(cache["queries"], BETA), exact, rtol=1e-4, atol=1e-4)


def test_faiss_nearest_centroids_keep_the_estimate_a_lower_bound(cache: dict[str, torch.Tensor],
                                                                  index: ClassIndex) -> None:
    full = index.bounds(cache["queries"], BETA)
    near = index.bounds(cache["queries"], BETA, faiss_min=0, want=2)
    assert bool((near <= full * (1 + 1e-5)).all()) and bool((near < full - 1e-6).any())
    # With every centroid returned, the FAISS path is the full estimate.
    everything = index.bounds(cache["queries"], BETA, faiss_min=0, want=len(index.centroids))
    torch.testing.assert_close(everything, full, rtol=1e-5, atol=1e-5)


def test_candidates_covering_every_class_give_the_dense_logits(cache: dict[str, torch.Tensor],
                                                               index: ClassIndex) -> None:
    got = index.logits(cache["queries"], cache["text"], ALPHA, BETA, C)
    torch.testing.assert_close(got, cache["dense"], rtol=1e-5, atol=1e-4)


def test_with_few_candidates_the_winning_logit_is_exact(cache: dict[str, torch.Tensor],
                                                        index: ClassIndex) -> None:
    got = index.logits(cache["queries"], cache["text"], ALPHA, BETA, 2)
    win = got.argmax(1, keepdim=True)
    torch.testing.assert_close(got.gather(1, win), cache["dense"].gather(1, win), rtol=1e-5,
                               atol=1e-4)
    # The non-candidates carry the clip logit plus their lower bound, below the dense value.
    assert bool((got <= cache["dense"] + 1e-4).all())
    assert int((got < cache["dense"] - 1e-3).sum(1).min()) >= C - 2


def test_scoped_candidates_are_picked_inside_the_scored_classes(cache: dict[str, torch.Tensor],
                                                                index: ClassIndex) -> None:
    side = [1, 4, 7, 10]
    got = index.logits(cache["queries"], cache["text"], ALPHA, BETA, len(side), side)
    torch.testing.assert_close(got[:, side], cache["dense"][:, side], rtol=1e-5, atol=1e-4)
    one = index.logits(cache["queries"], cache["text"], ALPHA, BETA, 1, side)
    exact_at = (one - cache["dense"]).abs() < 1e-3  # where the single candidate was scored
    assert bool(exact_at[:, side].any(1).all())
    others = [c for c in range(C) if c not in side]
    assert not bool(exact_at[:, others].all(1).any())  # no candidate outside the side


def test_exact_sums_in_small_products_equal_one_product(cache: dict[str, torch.Tensor],
                                                        index: ClassIndex,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    cand = torch.stack([torch.randperm(C, generator=torch.Generator().manual_seed(i))[:5]
                        for i in range(len(cache["queries"]))])
    whole = index.exact_sums(cache["queries"], cand, BETA)
    monkeypatch.setattr(class_index, "MAX_PAIR_ELEMENTS", 200)  # a few queries per product
    torch.testing.assert_close(index.exact_sums(cache["queries"], cand, BETA), whole)
    want = class_sums(cache["queries"], cache["keys"], cache["labels"]).gather(1, cand)
    torch.testing.assert_close(whole, want, rtol=1e-4, atol=1e-4)


def test_tuned_candidates_are_the_smallest_power_of_two_reaching_the_target(
        cache: dict[str, torch.Tensor], index: ClassIndex) -> None:
    q, text = cache["queries"], cache["text"]
    scopes = {"all": None, "base": list(range(6)), "new": list(range(6, C))}

    def agreement(t: int) -> float:
        return min(scoped_agreement(index.logits(q, text, ALPHA, BETA, t, s), cache["dense"], s)
                   for s in scopes.values())

    curve = {t: agreement(t) for t in (1, 2, 4, 8, C)}
    target = curve[2] + 1e-9 if curve[2] < 1.0 else 1.0
    found = tune_candidates(index, q, text, ALPHA, BETA, scopes, target=target)
    want = next(t for t in (1, 2, 4, 8, C) if curve[t] >= target)
    assert found["candidates"] == want and want > 1
    assert found["queries"] == len(q)
    assert min(found["agreement"].values()) == pytest.approx(curve[want], abs=1e-12)
    # Starting at every class, the dense answer is reproduced everywhere.
    at_all = tune_candidates(index, q, text, ALPHA, BETA, scopes, target=1.0, start=C)
    assert at_all["candidates"] == C
    assert at_all["agreement"] == {"all": 1.0, "base": 1.0, "new": 1.0}


def test_the_stored_agreement_recomputes_from_the_two_argmaxes(cache: dict[str, torch.Tensor],
                                                               index: ClassIndex) -> None:
    side = list(range(6))
    found = tune_candidates(index, cache["queries"], cache["text"], ALPHA, BETA, {"base": side},
                            target=0.0, start=1)
    approx = index.logits(cache["queries"], cache["text"], ALPHA, BETA, 1, side)
    same = sum(int(approx[b, side].argmax()) == int(cache["dense"][b, side].argmax())
               for b in range(len(approx)))
    assert found["agreement"]["base"] == same / len(approx)
    assert found["candidates"] == 1


def test_an_empty_side_is_left_out_of_the_tuning(cache: dict[str, torch.Tensor],
                                                 index: ClassIndex) -> None:
    found = tune_candidates(index, cache["queries"], cache["text"], ALPHA, BETA,
                            {"all": None, "new": []}, target=0.0)
    assert set(found["agreement"]) == {"all"}


def test_small_val_sets_are_joined_by_evenly_spaced_keys() -> None:
    val, keys = torch.zeros(3, 4), torch.arange(40.0)[:, None].repeat(1, 4)
    q = tuning_queries(val, keys, least=10, most=8)
    assert q.shape == (8, 4) and bool((q[:3] == 0).all())
    assert q[3:, 0].tolist() == [0.0, 9.0, 19.0, 29.0, 39.0]  # first to last, evenly
    assert tuning_queries(torch.ones(12, 4), keys, least=10, most=8).shape == (8, 4)  # val only
    assert bool((tuning_queries(torch.ones(12, 4), keys, least=10, most=20) == 1).all())


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: {**p, "offsets": p["offsets"].flip(0)}, "rising offsets"),
    (lambda p: {**p, "owner": p["owner"] + C}, "centroids"),
    (lambda p: {**p, "counts": p["counts"] + 1}, "do not add up"),
    (lambda p: {**p, "centroids": p["centroids"][:, :-1]}, "centroids"),
])
def test_an_inconsistent_index_is_refused(index: ClassIndex, change, message: str) -> None:
    parts = {"keys": index.keys, "offsets": index.offsets, "centroids": index.centroids,
             "counts": index.counts, "owner": index.owner}
    with pytest.raises(UsageError, match=message):
        ClassIndex(**change(parts))


def test_labels_outside_the_classes_are_refused() -> None:
    with pytest.raises(UsageError, match=r"labels must lie in \[0, 3\)"):
        ClassIndex.build(torch.eye(4), torch.tensor([0, 1, 2, 3]), 3)
    with pytest.raises(UsageError, match="non-empty"):
        ClassIndex.build(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), 3)
    assert math.isfinite(float(ClassIndex.build(torch.eye(4), torch.tensor([0, 0, 2, 2]), 3)
                               .bounds(torch.eye(4), BETA).sum()))


# --- the rules the clustering and the checks follow ---------------------------------------------

def test_two_subclusters_are_made_when_two_are_asked_for() -> None:
    keys, _ = mixture(200, seed=7)
    means, sizes = class_kmeans(keys, 2, seed=0)
    assert len(means) == 2 and float(sizes.sum()) == 200


def test_a_class_with_no_more_keys_than_subclusters_gets_its_plain_mean() -> None:
    keys, _ = mixture(3, seed=8)
    for m in (1, 3, 5):
        means, sizes = class_kmeans(keys, m, seed=0)
        torch.testing.assert_close(means, keys.mean(0, keepdim=True))
        assert sizes.tolist() == [3.0]


def _first_centres(n: int, m: int, seed: int) -> list[int]:
    """The keys class_kmeans starts from (its docstring: m distinct keys drawn by a generator
    seeded with `seed`)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].tolist()


def _seed_starting_at(n: int, pattern: list[set[int]]) -> int:
    """The first seed whose first centres are one key of each set of `pattern`, in that order."""
    return next(s for s in range(10_000)
                if all(k in allowed for k, allowed in zip(_first_centres(n, len(pattern), s),
                                                          pattern, strict=True)))


def _angles(*degrees: float) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)


def test_keys_at_one_point_make_one_cluster_and_the_other_clusters_are_dropped() -> None:
    """Every first centre is the same point: ties go to the first cluster, and the others (the
    last included) stay empty and are dropped."""
    keys = F.normalize(torch.ones(12, D), dim=1)
    means, sizes = class_kmeans(keys, 3, seed=0)
    assert sizes.tolist() == [12.0]
    torch.testing.assert_close(means, keys[:1])


def test_a_lone_key_is_a_cluster_of_one_whose_mean_is_that_key() -> None:
    """Keys at two points and one outlier opposite both, the outlier among the first centres."""
    a, b = F.normalize(torch.ones(D), dim=0), F.normalize(torch.arange(D, dtype=torch.float), dim=0)
    outlier = F.normalize(-torch.ones(D), dim=0)
    keys = torch.stack([a] * 20 + [b] * 20 + [outlier])
    seed = _seed_starting_at(41, [set(range(20)), set(range(20, 40)), {40}])
    means, sizes = class_kmeans(keys, 3, seed=seed)
    assert sizes.tolist() == [20.0, 20.0, 1.0]
    torch.testing.assert_close(means, torch.stack([a, b, outlier]))


def test_an_emptied_cluster_keeps_its_centre_and_wins_keys_back() -> None:
    """Two first centres on the same point (keys 0 and 1 are equal): the second loses the tie and
    is empty after the first pass, but keeps its place, so once the first centre has moved to
    the mean of its keys (about 42 degrees) the two keys at 0 degrees come back to it."""
    keys = _angles(0, 0, 60, 70, 80, 180, 180)
    seed = _seed_starting_at(7, [{0, 1}, {5, 6}, {0, 1}])
    means, sizes = class_kmeans(keys, 3, seed=seed)
    assert sizes.tolist() == [3.0, 2.0, 2.0]
    torch.testing.assert_close(means, torch.stack([keys[2:5].mean(0), keys[5], keys[0]]))


def test_subclusters_partition_the_keys_for_any_keys() -> None:
    """Whatever the keys and seed: sizes count every key once, and the sizes times the raw means
    add up to the sum of the keys (each mean is the mean of its own keys, singletons included)."""
    g = torch.Generator().manual_seed(0)
    for case in range(300):
        n, dim, m = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in
                     ((4, 12), (2, 4), (2, 4)))
        keys = F.normalize(torch.randn(n, dim, generator=g, dtype=torch.float64), dim=1)
        means, sizes = class_kmeans(keys, m, seed=case)
        assert float(sizes.sum()) == n and bool((sizes >= 1).all()) and len(means) <= m, case
        torch.testing.assert_close((sizes[:, None] * means).sum(0), keys.sum(0), msg=str(case))


def test_subclusters_are_assigned_by_cosine_not_by_dot_product() -> None:
    """A tight cluster (raw mean near unit length) beside a diffuse one (short raw mean): a key
    between them goes to the nearer normalised mean, where a dot product with the raw means
    would pick the tight one."""
    g = torch.Generator().manual_seed(0)
    tight = F.normalize(torch.randn(D, generator=g), dim=0)
    wide = F.normalize(torch.randn(D, generator=g), dim=0)
    keys = torch.cat([F.normalize(tight + 0.05 * torch.randn(50, D, generator=g), dim=1),
                      F.normalize(wide + 1.5 * torch.randn(50, D, generator=g) / D ** 0.5, dim=1)])
    means, _ = class_kmeans(keys, 2, seed=0)
    unit = F.normalize(means, dim=1)
    assign = (keys @ unit.T).argmax(1)
    for j in range(len(means)):  # the fixed point of the cosine rule
        torch.testing.assert_close(means[j], keys[assign == j].mean(0), atol=1e-5, rtol=0)


def test_a_one_class_index_and_empty_trailing_classes_are_valid() -> None:
    keys, _ = mixture(40, seed=3)
    one = ClassIndex.build(keys, torch.zeros(40, dtype=torch.long), 1)
    assert one.n_classes == 1 and one.offsets.tolist() == [0, 40]
    wide = ClassIndex.build(keys, torch.zeros(40, dtype=torch.long), 4)  # classes 1-3 hold no keys
    assert wide.offsets.tolist() == [0, 40, 40, 40, 40]
    assert bool((wide.bounds(keys, BETA)[:, 1:] == 0).all())


def test_the_default_seed_is_zero(cache: dict[str, torch.Tensor]) -> None:
    a = ClassIndex.build(cache["keys"], cache["labels"], C)
    b = ClassIndex.build(cache["keys"], cache["labels"], C, seed=0)
    torch.testing.assert_close(a.centroids, b.centroids, rtol=0, atol=0)


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: {**p, "offsets": torch.cat([p["offsets"][:1] + 1, p["offsets"][1:]])}, "rising offsets"),
    (lambda p: {**p, "offsets": torch.cat([p["offsets"][:-1], p["offsets"][-1:] - 1])}, "rising offsets"),
    (lambda p: {**p, "offsets": torch.tensor([0])}, "rising offsets"),
    (lambda p: {**p, "keys": p["keys"][None]}, "rising offsets"),
    (lambda p: {**p, "offsets": torch.cat([p["offsets"][:2], p["offsets"][1:2] - 1,
                                           p["offsets"][3:]])}, "rising offsets"),
    (lambda p: {**p, "counts": p["counts"][:-1]}, "counts"),
    (lambda p: {**p, "owner": p["owner"][:-1]}, "owners"),
    (lambda p: {**p, "owner": torch.where(p["owner"] == 0, -1, p["owner"])}, "owners"),
    (lambda p: {**p, "owner": torch.where(p["owner"] == C - 1, C, p["owner"])}, "owners"),
])
def test_each_inconsistency_alone_is_refused(index: ClassIndex, change, message: str) -> None:
    parts = {"keys": index.keys, "offsets": index.offsets, "centroids": index.centroids,
             "counts": index.counts, "owner": index.owner}
    with pytest.raises(UsageError, match=message):
        ClassIndex(**change(parts))


def test_faiss_takes_over_from_the_threshold_on_with_one_candidates_share_by_default(
        cache: dict[str, torch.Tensor], index: ClassIndex) -> None:
    q, m = cache["queries"], len(index.centroids)
    full = index.bounds(q, BETA)
    torch.testing.assert_close(index.bounds(q, BETA, faiss_min=m + 1), full, rtol=0, atol=0)
    at = index.bounds(q, BETA, faiss_min=m)  # as many centroids as the threshold: FAISS
    assert not torch.allclose(at, full)
    torch.testing.assert_close(at, index.bounds(q, BETA, faiss_min=m, want=1))


def test_the_estimate_adds_the_bound_and_asks_faiss_for_the_candidates_share(
        cache: dict[str, torch.Tensor], index: ClassIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    q, text = cache["queries"], cache["text"]
    asked: list[tuple] = []
    real = ClassIndex.bounds

    def spy(self: ClassIndex, q: torch.Tensor, beta: float, faiss_min: int = 1 << 16,
            want: int = 1) -> torch.Tensor:
        asked.append((beta, faiss_min, want))
        return real(self, q, beta, faiss_min, want)

    monkeypatch.setattr(ClassIndex, "bounds", spy)
    got = index.logits(q, text, ALPHA, BETA, 3, faiss_min=77)
    assert asked == [(BETA, 77, 3)]
    clip = 100.0 * q @ text.T
    others = torch.ones_like(got, dtype=torch.bool).scatter(1, got.topk(3, dim=1).indices, False)
    est = clip + ALPHA * real(index, q, BETA)
    torch.testing.assert_close(got[others], est[others])  # non-candidates: clip + alpha * bound


def test_tuning_queries_take_val_alone_from_the_threshold_on() -> None:
    keys = torch.ones(5, 4)
    assert len(tuning_queries(torch.zeros(10, 4), keys, least=10, most=50)) == 10
    assert len(tuning_queries(torch.zeros(9, 4), keys, least=10, most=50)) == 14
    one = tuning_queries(torch.zeros(2, 4), keys[:1], least=10, most=50)
    assert len(one) == 3 and bool((one[-1] == 1).all())  # a single key still joins


def test_classes_without_keys_after_the_last_labelled_one_get_empty_ranges() -> None:
    keys, _ = mixture(30, seed=4)
    index = ClassIndex.build(keys, torch.arange(30) % 2, 4)  # classes 2 and 3 hold no keys
    assert index.offsets.tolist() == [0, 15, 30, 30, 30]


def test_keys_that_are_not_a_matrix_are_refused_even_with_matching_rows(index: ClassIndex) -> None:
    with pytest.raises(UsageError, match=r"\(N, D\) keys"):
        ClassIndex(index.keys[:, :, None], index.offsets, index.centroids, index.counts, index.owner)


def test_the_subcluster_cap_is_the_one_given(cache: dict[str, torch.Tensor]) -> None:
    one = ClassIndex.build(cache["keys"], cache["labels"], C, subcentroids=1)
    assert len(one.centroids) == C and torch.equal(one.owner, torch.arange(C))


def test_the_centroid_search_index_is_built_once_for_every_batch(
        cache: dict[str, torch.Tensor], index: ClassIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    from shipyard.pipeline import cache_index

    built: list[int] = []
    real = cache_index.CacheIndex.build.__func__  # type: ignore[attr-defined]

    def counted(cls: type, keys, kind: str, **kw):
        built.append(len(keys))
        return real(cls, keys, kind, **kw)

    monkeypatch.setattr(cache_index.CacheIndex, "build", classmethod(counted))
    first = index.bounds(cache["queries"][:50], BETA, faiss_min=0)
    again = index.bounds(cache["queries"][50:], BETA, faiss_min=0)
    assert built == [len(index.centroids)]  # one FAISS index over the centroids, kept
    torch.testing.assert_close(torch.cat([first, again]),
                               index.bounds(cache["queries"], BETA, faiss_min=0))


def test_only_a_classes_cache_is_scored_once_per_side(cache: dict[str, torch.Tensor],
                                                      index: ClassIndex) -> None:
    import numpy as np
    from shipyard.pipeline.cache_index import CacheIndex
    from shipyard.pipeline.head_store import CachedTip

    labels = cache["labels"].numpy()
    flat = CachedTip(CacheIndex.build(cache["keys"].numpy(), "flat"), labels, cache["text"],
                     ALPHA, BETA, None)
    classes = CachedTip(index, np.sort(labels), cache["text"], ALPHA, BETA, None, 2)
    assert not flat.sided and classes.sided
