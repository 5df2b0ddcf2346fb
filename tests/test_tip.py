"""Tip-Adapter math and the FAISS cache, against obvious references: a hand loop, the dense torch
formula, and the top-1 agreement recomputed from the two logit sets."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from shipyard.pipeline.cache_index import (
    CacheIndex,
    agreement_report,
    cache_logits,
    default_nlist,
    top1_agreement,
)
from shipyard.pipeline.errors import UsageError
from shipyard.pipeline.tip import (
    search_alpha_beta,
    search_grid,
    tip_logits,
    tip_logits_blocked,
    tip_logits_sparse,
)

D, C = 64, 20


def unit(*shape: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture(scope="module")
def random_cache() -> dict[str, torch.Tensor]:
    """Random unit keys (N = 2000), labels over C classes, text weights and queries."""
    labels = torch.randint(0, C, (2000,), generator=torch.Generator().manual_seed(1))
    return {"keys": unit(2000, D, seed=2), "labels": labels, "text": unit(C, D, seed=3),
            "queries": unit(300, D, seed=4)}


def clustered(n_classes: int, per_class: int, noise: float, seed: int) -> tuple[torch.Tensor, ...]:
    """Unit vectors around random class centres: (features, labels, centres)."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_classes, D, generator=g), dim=-1)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    feats = F.normalize(centres[labels] + noise * torch.randn(len(labels), D, generator=g), dim=-1)
    return feats, labels, centres


def test_tip_logits_equal_a_hand_loop_on_a_tiny_cache() -> None:
    keys, queries, text = unit(4, 5, seed=10), unit(3, 5, seed=11), unit(3, 5, seed=12)
    labels = torch.tensor([2, 0, 2, 1])
    alpha, beta = 1.7, 3.2
    got = tip_logits(queries, keys, labels, text, alpha, beta)
    want = torch.zeros(3, 3, dtype=torch.float64)
    for b in range(3):
        for c in range(3):
            clip = 100.0 * sum(float(queries[b, d] * text[c, d]) for d in range(5))
            cache = sum(math.exp(-beta * (1 - sum(float(queries[b, d] * keys[n, d]) for d in range(5))))
                        for n in range(4) if int(labels[n]) == c)
            want[b, c] = clip + alpha * cache
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("alpha", "beta"), [(1.0, 1.0), (3.0, 5.5), (10.0, 0.3), (0.5, 20.0)])
def test_flat_faiss_cache_equals_dense_reference(random_cache: dict, alpha: float, beta: float) -> None:
    r, q = random_cache, random_cache["queries"][:128]
    dense = tip_logits(q, r["keys"], r["labels"], r["text"], alpha, beta)
    index = CacheIndex.build(r["keys"].numpy(), "flat")
    # max_elements forces several search batches of k = N neighbours each
    via_numpy = cache_logits(index, q.numpy(), r["labels"].numpy(), r["text"].numpy(), alpha, beta,
                             max_elements=50 * index.ntotal)
    via_torch = cache_logits(index, q, r["labels"], r["text"], alpha, beta)
    assert isinstance(via_numpy, np.ndarray) and isinstance(via_torch, torch.Tensor)
    # 1e-4, relative once |logit| > 1: at alpha 10, beta 0.3 logits reach ~800, where one float32
    # ulp is 6e-5 and two summation orders differ by a few ulps
    bound = 1e-4 * dense.abs().clamp(min=1.0)
    assert (torch.from_numpy(via_numpy) - dense).abs().le(bound).all()
    assert (via_torch - dense).abs().le(bound).all()


def test_sparse_with_every_key_as_neighbour_equals_dense(random_cache: dict) -> None:
    r = random_cache
    sims = r["queries"] @ r["keys"].T  # (B, N)
    order = sims.argsort(dim=1, descending=True)
    nb_sims, nb_labels = sims.gather(1, order), r["labels"][order]
    dense = tip_logits(r["queries"], r["keys"], r["labels"], r["text"], 2.0, 4.0)
    sparse = tip_logits_sparse(r["queries"], nb_sims, nb_labels, r["text"], 2.0, 4.0)
    torch.testing.assert_close(sparse, dense, atol=1e-4, rtol=0)
    # FAISS's padding for "no neighbour found" (label -1, sim -FLT_MAX) adds nothing
    pad_sims = torch.cat([nb_sims, torch.full((len(sims), 3), -3.4e38)], dim=1)
    pad_labels = torch.cat([nb_labels, torch.full((len(sims), 3), -1)], dim=1)
    padded = tip_logits_sparse(r["queries"], pad_sims, pad_labels, r["text"], 2.0, 4.0)
    torch.testing.assert_close(padded, sparse, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_agreement_report_equals_agreement_recomputed_from_logits(random_cache: dict, kind: str) -> None:
    r = random_cache
    alpha, beta, topk = 5.0, 6.0, 8
    exact = CacheIndex.build(r["keys"].numpy(), "flat")
    approx = CacheIndex.build(r["keys"].numpy(), kind, nprobe=2)
    report = agreement_report(exact, approx, r["queries"].numpy(), r["labels"].numpy(),
                              r["text"].numpy(), alpha, beta, topk=topk)
    dense = tip_logits(r["queries"], r["keys"], r["labels"], r["text"], alpha, beta).numpy()
    sims, ids = approx.search(r["queries"].numpy(), topk)
    nb_labels = torch.where(torch.from_numpy(ids) >= 0, r["labels"][torch.from_numpy(ids).clamp(min=0)], -1)
    sparse = tip_logits_sparse(r["queries"], torch.from_numpy(sims), nb_labels, r["text"], alpha,
                               beta).numpy()
    independent = float(np.mean(dense.argmax(axis=1) == sparse.argmax(axis=1)))
    assert report == {"sample": 300, "top1_agreement": pytest.approx(independent), "topk": topk,
                      "kind": kind}
    assert top1_agreement(sparse, dense) == pytest.approx(independent)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_agreement_is_one_on_well_separated_clusters(kind: str) -> None:
    keys, labels, centres = clustered(10, 100, noise=0.02, seed=20)
    queries = F.normalize(centres.repeat(20, 1) + 0.02 * unit(200, D, seed=21), dim=-1)
    text = unit(1, D, seed=22).expand(10, D)  # identical text rows: the cache alone decides
    exact = CacheIndex.build(keys.numpy(), "flat")
    approx = CacheIndex.build(keys.numpy(), kind)
    report = agreement_report(exact, approx, queries, labels, text, 1.0, 5.0, topk=16)
    assert report["top1_agreement"] == 1.0 and report["sample"] == 200


def test_agreement_falls_well_below_one_with_one_probe_of_many_lists(random_cache: dict) -> None:
    r = random_cache
    text = r["text"][:1].expand(C, D)  # identical text rows: the cache alone decides
    exact = CacheIndex.build(r["keys"].numpy(), "flat")
    approx = CacheIndex.build(r["keys"].numpy(), "ivf", nlist=200, nprobe=1)
    report = agreement_report(exact, approx, r["queries"], r["labels"], text, 1.0, 5.0, topk=16)
    dense = tip_logits(r["queries"], r["keys"], r["labels"], text, 1.0, 5.0)
    approx_logits = cache_logits(approx, r["queries"], r["labels"], text, 1.0, 5.0, topk=16)
    assert report["top1_agreement"] < 0.8
    assert report["top1_agreement"] == pytest.approx(top1_agreement(approx_logits, dense))
    # same data, exact neighbours, every key: agreement is back to 1
    full = agreement_report(exact, exact, r["queries"], r["labels"], text, 1.0, 5.0, topk=2000)
    assert full["top1_agreement"] == 1.0


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_serialised_index_searches_identically(random_cache: dict, kind: str) -> None:
    keys, queries = random_cache["keys"].numpy(), random_cache["queries"].numpy()
    index = CacheIndex.build(keys, kind, nprobe=3, ef_search=40)
    blob = index.to_bytes()
    again = CacheIndex.from_bytes(blob)
    assert blob.dtype == np.uint8 and again.kind == kind and again.ntotal == len(keys)
    assert again.exact == (kind == "flat")
    for k in (1, 10, 100):
        s1, i1 = index.search(queries, k)
        s2, i2 = again.search(queries, k)
        assert s1.dtype == np.float32 and i1.dtype == np.int64 and s1.shape == (300, k)
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(s1, s2)


def test_full_scan_path_equals_faiss_flat_search(random_cache: dict) -> None:
    """The matmul path a GPU flat index takes for k beyond FAISS's GPU limit, checked on CPU."""
    index = CacheIndex.build(random_cache["keys"].numpy(), "flat")
    q = random_cache["queries"].numpy()
    s1, i1 = index.search(q, 50)
    s2, i2 = index._full_scan(q, 50)
    np.testing.assert_allclose(s1, s2, atol=1e-5)
    assert (i1 == i2).mean() > 0.99  # equal up to ties


def test_bad_requests_raise_usage_errors(random_cache: dict) -> None:
    keys = random_cache["keys"].numpy()
    with pytest.raises(UsageError, match="unknown cache index"):
        CacheIndex.build(keys, "lsh")
    with pytest.raises(UsageError, match="nlist"):
        CacheIndex.build(keys, "ivf", nlist=5000)
    index = CacheIndex.build(keys, "flat")
    with pytest.raises(UsageError, match="k must lie"):
        index.search(keys[:2], 0)
    with pytest.raises(UsageError, match="exact"):
        agreement_report(CacheIndex.build(keys, "hnsw"), index, keys[:2], random_cache["labels"],
                         random_cache["text"], 1.0, 1.0)


def test_search_grid_follows_the_tip_adapter_formula() -> None:
    betas, alphas = search_grid(7.0, 3.0)
    assert len(betas) == 200 and len(alphas) == 20  # i, j in range(steps): S itself is excluded
    for i in (0, 1, 117, 199):
        assert betas[i] == pytest.approx(0.1 + i * (7.0 - 0.1) / 200)
    for j in (0, 1, 11, 19):
        assert alphas[j] == pytest.approx(0.1 + j * (3.0 - 0.1) / 20)
    assert betas[0] == alphas[0] == 0.1 and betas[-1] < 7.0 and alphas[-1] < 3.0


def planted_case(alpha: float, beta: float, eps: float = 2e-3) -> tuple[torch.Tensor, ...]:
    """Two classes, key e0 for class 0 and e1 for class 1, text e2 and e3. A query at sim s to e0
    and 0 to e1 has cache margin G(beta) = exp(-beta (1 - s)) - exp(-beta); its text margin is set
    so it is right only if alpha G(beta) lies above (label 0) or below (label 1) the planted value
    by eps. Pairs at s = 0.9 and s = 0.3 pin alpha G on two curves that cross only at the plant."""
    feats, labels = [], []
    for s in (0.9, 0.3):
        target = alpha * (math.exp(-beta * (1 - s)) - math.exp(-beta))
        for label, bound in ((0, target * (1 - eps)), (1, target * (1 + eps))):
            margin = -bound / 100.0  # text logit 0 minus logit 1: right iff alpha G >< bound
            q = torch.zeros(5, dtype=torch.float64)
            q[0], q[2], q[3] = s, margin / 2, -margin / 2
            q[4] = math.sqrt(1 - float(q[:4].square().sum()))
            feats.append(q)
            labels.append(label)
    eye = torch.eye(5, dtype=torch.float64)
    return torch.stack(feats), torch.tensor(labels), eye[:2], torch.tensor([0, 1]), eye[2:4]


def test_alpha_beta_search_finds_the_planted_point() -> None:
    betas, alphas = search_grid(7.0, 3.0)
    want_alpha, want_beta = alphas[11], betas[117]
    val, val_labels, keys, key_labels, text = planted_case(want_alpha, want_beta)
    assert tip_logits(val, keys, key_labels, text, want_alpha, want_beta).argmax(1).tolist() == [0, 1, 0, 1]
    alpha, beta, acc = search_alpha_beta(val, val_labels, keys, key_labels, text, 7.0, 3.0)
    assert (alpha, beta, acc) == (want_alpha, want_beta, 1.0)
    # one grid step away on either axis the plant is no longer fully right
    for a, b in ((alphas[10], want_beta), (alphas[12], want_beta), (want_alpha, betas[116]),
                 (want_alpha, betas[118])):
        assert (tip_logits(val, keys, key_labels, text, a, b).argmax(1) == val_labels).float().mean() < 1


def test_alpha_beta_search_equals_brute_force_with_first_best_on_ties(random_cache: dict) -> None:
    r = random_cache
    val = r["queries"][:120]
    val_labels = torch.randint(0, C, (120,), generator=torch.Generator().manual_seed(5))
    betas, alphas = search_grid(12.0, 5.0, beta_steps=8, alpha_steps=5)
    best, best_acc = (0.0, 0.0), -1.0
    for b in betas:  # the public code's loop order and strict '>'
        for a in alphas:
            logits = tip_logits(val, r["keys"], r["labels"], r["text"], a, b)
            acc = float((logits.argmax(1) == val_labels).float().mean())
            if acc > best_acc:
                best, best_acc = (a, b), acc
    # a small max_elements splits val into several row blocks
    got = search_alpha_beta(val, val_labels, r["keys"], r["labels"], r["text"], 12.0, 5.0,
                            beta_steps=8, alpha_steps=5, max_elements=50_000)
    assert got[:2] == best and got[2] == pytest.approx(best_acc)




def test_an_exact_cache_over_every_key_is_the_dense_formula_without_a_search(
        random_cache: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch) -> None:
    """flat without topk reads its keys back and applies the dense formula (a k = N search only
    sorts every similarity to scatter it back); the result is the dense one, numpy or tensor."""
    r = random_cache
    index = CacheIndex.build(r["keys"].numpy(), "flat")

    def no_search(*_: object) -> None:
        raise AssertionError("the exact path searched the index")

    monkeypatch.setattr(index, "search", no_search)
    q = unit(37, D, seed=11)
    dense = tip_logits(q, r["keys"], r["labels"], r["text"], 1.7, 3.0)
    got = cache_logits(index, q, r["labels"], r["text"], 1.7, 3.0, max_elements=1000)
    torch.testing.assert_close(got, dense, atol=1e-4, rtol=1e-5)
    as_numpy = cache_logits(index, q.numpy(), r["labels"].numpy(), r["text"].numpy(), 1.7, 3.0)
    assert isinstance(as_numpy, np.ndarray)
    np.testing.assert_allclose(as_numpy, dense.numpy(), atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(index.keys(), r["keys"])
    with pytest.raises(UsageError, match="keeps no exact copy"):
        CacheIndex.build(r["keys"].numpy(), "hnsw").keys()


@pytest.mark.parametrize("max_elements", [1, 37 * 7, 37 * 2000, 1 << 25])
def test_key_blocks_sum_to_the_dense_logits(random_cache: dict[str, torch.Tensor],
                                            max_elements: int) -> None:
    """Blocks of one key, of a few, of every key: the per-class sums add up to the dense ones."""
    r = random_cache
    q = unit(37, D, seed=12)
    dense = tip_logits(q, r["keys"], r["labels"], r["text"], 0.9, 4.0)
    got = tip_logits_blocked(q, r["keys"], r["labels"], r["text"], 0.9, 4.0,
                             max_elements=max_elements)
    torch.testing.assert_close(got, dense, atol=1e-4, rtol=1e-5)


# --- index settings: what build is given is what the index uses ---------------------------------

def test_an_ivf_index_uses_the_nlist_and_nprobe_it_was_given(random_cache: dict) -> None:
    import faiss

    keys = random_cache["keys"].numpy()
    index = CacheIndex.build(keys, "ivf", nlist=40, nprobe=7)
    raw = faiss.extract_index_ivf(index._index)
    assert (raw.nlist, raw.nprobe) == (40, 7)
    assert CacheIndex.build(keys, "ivf", nlist=40, nprobe=400)._index.nprobe == 40  # capped at nlist
    default = CacheIndex.build(keys, "ivf")._index  # N = 2000: min(4 sqrt(N), N / 32) lists
    assert default.nlist == default_nlist(2000) == min(round(4 * 2000 ** 0.5), 2000 // 32) == 62
    assert default.nprobe == 62 // 8
    # The probes matter: more of them, more of the true neighbours found.
    q = random_cache["queries"].numpy()
    _, truth = CacheIndex.build(keys, "flat").search(q, 10)
    recall = {p: np.mean([len(set(a) & set(b)) / 10 for a, b in zip(
        CacheIndex.build(keys, "ivf", nlist=40, nprobe=p).search(q, 10)[1], truth, strict=True)])
        for p in (1, 40)}
    assert recall[40] == 1.0 > recall[1]


def test_default_list_count_is_four_root_n_with_enough_keys_per_list() -> None:
    assert default_nlist(1_000_000) == 4000  # 4 sqrt(N)
    assert default_nlist(6400) == 200  # N / 32 caps 4 sqrt(N) = 320
    assert default_nlist(10) == 1  # never below one list
    assert [default_nlist(n) for n in (32, 64, 31)] == [1, 2, 1]


def test_an_hnsw_index_uses_its_degree_and_widens_its_beam_to_k(random_cache: dict) -> None:
    keys, q = random_cache["keys"].numpy(), random_cache["queries"].numpy()
    index = CacheIndex.build(keys, "hnsw", hnsw_m=8, ef_search=20)
    assert index._index.hnsw.efSearch == 20
    assert index._index.hnsw.nb_neighbors(1) == 8  # level-1 links: M
    _, truth = CacheIndex.build(keys, "flat").search(q, 200)
    _, got = index.search(q, 200)  # k = 200 > efSearch: the beam must hold k results
    recall = np.mean([len(set(a) & set(b)) / 200 for a, b in zip(got, truth, strict=True)])
    assert recall > 0.95 and bool((got >= 0).all())
    assert index._index.hnsw.efSearch == 20  # widened for that search only


def test_empty_keys_and_queries_of_the_wrong_width_are_refused(random_cache: dict) -> None:
    keys = random_cache["keys"].numpy()
    with pytest.raises(UsageError, match=r"non-empty \(N, D\)"):
        CacheIndex.build(keys[:0], "flat")
    with pytest.raises(UsageError, match=r"non-empty \(N, D\)"):
        CacheIndex.build(keys[0], "flat")
    index = CacheIndex.build(keys, "flat")
    with pytest.raises(UsageError, match=rf"queries must be \(B, {D}\)"):
        index.search(keys[:3, :-1], 5)
    with pytest.raises(UsageError, match="k must lie in"):
        index.search(keys[:3], len(keys) + 1)


def test_affinity_is_the_same_formula_for_numpy_and_torch() -> None:
    from shipyard.pipeline.tip import affinity

    sims = np.array([1.0, 0.5, 0.0, -1.0], dtype=np.float32)
    want = np.exp(-3.0 * (1.0 - sims))
    got = affinity(sims, 3.0)
    assert isinstance(got, np.ndarray)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(affinity(torch.from_numpy(sims), 3.0).numpy(), want, rtol=1e-6)
    assert affinity(np.float32(1.0) * np.ones(1), 9.0)[0] == 1.0  # sim 1 gives 1 at any beta


def test_the_logits_come_in_the_queries_dtype_whatever_the_cache_holds(random_cache: dict) -> None:
    """Keys, text weights and neighbour similarities in float64 meet float32 queries: each formula
    converts them to the queries' dtype (and device) instead of failing or widening the result."""
    r = random_cache
    q, keys, text = r["queries"], r["keys"].double(), r["text"].double()
    want = tip_logits(q, r["keys"], r["labels"], r["text"], 1.5, 4.0)
    for got in (tip_logits(q, keys, r["labels"], text, 1.5, 4.0),
                tip_logits_blocked(q, keys, r["labels"], text, 1.5, 4.0, max_elements=3000)):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    sims = q @ r["keys"].T  # (B, N): every key as a neighbour
    ids = torch.arange(len(keys)).expand(len(q), -1)
    sparse = tip_logits_sparse(q, sims.double(), r["labels"][ids], text, 1.5, 4.0)
    assert sparse.dtype == torch.float32
    torch.testing.assert_close(sparse, want, rtol=1e-5, atol=1e-4)


def test_ivf_list_counts_from_one_to_every_key_are_accepted(random_cache: dict) -> None:
    import faiss

    keys = random_cache["keys"].numpy()[:64]
    for nlist in (1, 64):
        assert faiss.extract_index_ivf(CacheIndex.build(keys, "ivf", nlist=nlist)._index).nlist == nlist
    with pytest.raises(UsageError, match="an IVF index over 64 keys needs 1 <= nlist <= 64, got 65"):
        CacheIndex.build(keys, "ivf", nlist=65)
    # Fewer than 8 lists: one probe by default, never zero.
    assert CacheIndex.build(keys, "ivf", nlist=4)._index.nprobe == 1


def test_ivf_trains_spherical_centroids_quietly_on_small_caches(random_cache: dict,
                                                                 capfd: pytest.CaptureFixture) -> None:
    import faiss

    keys = random_cache["keys"].numpy()[:100]
    index = CacheIndex.build(keys, "ivf", nlist=60)  # under 2 keys per list: FAISS would warn
    assert "WARNING" not in capfd.readouterr().err
    raw = faiss.extract_index_ivf(index._index)
    centroids = raw.quantizer.reconstruct_n(0, raw.nlist)
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)  # unit-norm


def test_ivf_clustering_is_seeded_by_the_seed_it_was_given(random_cache: dict) -> None:
    import faiss

    keys = random_cache["keys"].numpy()

    def centroids(**kw: int) -> np.ndarray:
        index = CacheIndex.build(keys, "ivf", nlist=20, **kw)  # kept alive while read
        raw = faiss.extract_index_ivf(index._index)
        return raw.quantizer.reconstruct_n(0, raw.nlist)

    np.testing.assert_array_equal(centroids(), centroids(seed=0))  # the default seed is 0
    assert not np.array_equal(centroids(seed=0), centroids(seed=5))


def test_hnsw_defaults_and_a_single_threaded_build(random_cache: dict,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import faiss

    keys = random_cache["keys"].numpy()[:300]
    index = CacheIndex.build(keys, "hnsw")
    assert index._index.hnsw.efSearch == 128 and index._index.hnsw.nb_neighbors(1) == 32
    calls: list[int] = []
    real = faiss.omp_set_num_threads
    monkeypatch.setattr(faiss, "omp_set_num_threads", lambda n: (calls.append(n), real(n)))
    before = faiss.omp_get_max_threads()
    CacheIndex.build(keys, "hnsw")
    assert calls == [1, before]  # one thread while inserting, then the previous count back


def test_inputs_of_any_float_precision_are_taken(random_cache: dict) -> None:
    keys, q = random_cache["keys"].double().numpy(), random_cache["queries"].double().numpy()
    index = CacheIndex.build(keys, "flat")
    sims, ids = index.search(q, len(keys))  # k may be every key
    assert sims.dtype == np.float32 and ids.shape == (300, 2000)
    np.testing.assert_allclose(sims[:, 0], (q @ keys.T).max(1), atol=1e-5)


def test_an_approximate_index_returns_more_neighbours_than_a_gpu_could_on_the_cpu() -> None:
    keys = F.normalize(torch.randn(3000, 16, generator=torch.Generator().manual_seed(3)), dim=1)
    index = CacheIndex.build(keys.numpy(), "ivf", nlist=10, nprobe=10)
    _, ids = index.search(keys[:4].numpy(), 2100)  # beyond GPU_MAX_K: fine off the GPU
    assert ids.shape == (4, 2100) and bool((ids >= 0).all())


def test_a_flat_index_read_back_from_bytes_scores_as_dense(random_cache: dict) -> None:
    r = random_cache
    again = CacheIndex.from_bytes(CacheIndex.build(r["keys"].numpy(), "flat").to_bytes())
    torch.testing.assert_close(again.keys(), r["keys"], rtol=0, atol=0)
    got = cache_logits(again, r["queries"], r["labels"], r["text"], 1.2, 3.0)
    torch.testing.assert_close(got, tip_logits(r["queries"], r["keys"], r["labels"], r["text"],
                                               1.2, 3.0), rtol=1e-5, atol=1e-4)


def test_an_approximate_cache_reads_the_default_neighbours_unless_told(random_cache: dict) -> None:
    from shipyard.pipeline.cache_index import DEFAULT_TOPK, resolve_topk

    keys = random_cache["keys"].numpy()
    ivf = CacheIndex.build(keys, "ivf")
    assert resolve_topk(ivf, None) == DEFAULT_TOPK == 16
    assert resolve_topk(CacheIndex.build(keys[:10], "hnsw"), None) == 10  # fewer keys than 16
    assert resolve_topk(ivf, 5000) == 2000 and resolve_topk(ivf, 3) == 3
    assert resolve_topk(CacheIndex.build(keys, "flat"), None) == 2000


def test_top1_agreement_refuses_unequal_or_empty_logit_sets() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 0.0]])
    assert top1_agreement(a[:1], a[:1]) == 1.0  # one row is enough
    assert top1_agreement(a, a.flip(1)) == 0.0
    for x, y in ((a, a[:1]), (a[0], a[0]), (a[:0], a[:0])):
        with pytest.raises(ValueError, match="expected two equal non-empty"):
            top1_agreement(x, y)


def test_agreement_report_scores_both_sides_at_the_logit_scale_given(random_cache: dict) -> None:
    r = random_cache
    exact = CacheIndex.build(r["keys"].numpy(), "flat")
    approx = CacheIndex.build(r["keys"].numpy(), "ivf", nlist=100, nprobe=2)
    report = agreement_report(exact, approx, r["queries"], r["labels"], r["text"], 4.0, 6.0,
                              topk=8, logit_scale=1.0)
    dense = tip_logits(r["queries"], r["keys"], r["labels"], r["text"], 4.0, 6.0, logit_scale=1.0)
    sparse = cache_logits(approx, r["queries"], r["labels"], r["text"], 4.0, 6.0, topk=8,
                          logit_scale=1.0)
    assert report["top1_agreement"] == top1_agreement(sparse, dense) < 1.0
    default = agreement_report(exact, approx, r["queries"], r["labels"], r["text"], 4.0, 6.0, topk=8)
    at_100 = top1_agreement(cache_logits(approx, r["queries"], r["labels"], r["text"], 4.0, 6.0,
                                         topk=8, logit_scale=100.0),
                            tip_logits(r["queries"], r["keys"], r["labels"], r["text"], 4.0, 6.0))
    assert default["top1_agreement"] == at_100 != report["top1_agreement"]


def test_agreement_is_measured_at_clips_logit_scale_by_default() -> None:
    """Without a logit scale, both sides are scored at CLIP's 100. On this query the exact cache
    and its nearest key alone agree at 100 and disagree at 101: the zero-shot term, which the
    scale multiplies, leans to class 1 just less than the exact cache term leans to class 0."""
    keys = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    labels = np.array([0, 1])
    query = np.array([[math.cos(0.15), math.sin(0.15)]], dtype=np.float32)
    text = np.array([[1.0, 0.0], [math.cos(0.02), math.sin(0.02)]], dtype=np.float32)
    exact = CacheIndex.build(keys, "flat")

    def agreement(**scale: float) -> float:
        report = agreement_report(exact, exact, query, labels, text, 0.5, 1.0, topk=1, **scale)
        return float(report["top1_agreement"])

    assert (agreement(logit_scale=100.0), agreement(logit_scale=101.0)) == (1.0, 0.0)
    assert agreement() == 1.0


def test_refusing_a_gpu_that_is_not_there_and_hnsw_on_the_gpu(random_cache: dict) -> None:
    keys = random_cache["keys"].numpy()[:50]
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="has no GPU"):
            CacheIndex.build(keys, "flat", use_gpu=True)
    for kind in ("flat", "hnsw"):
        assert not CacheIndex.build(keys, kind, use_gpu=False).on_gpu


@settings(max_examples=25)
@given(n=st.integers(1, 60), c=st.integers(1, 6), d=st.sampled_from([2, 8, 32]),
       b=st.integers(1, 9), alpha=st.floats(0.0, 10.0), beta=st.floats(0.1, 12.0),
       seed=st.integers(0, 2**31 - 1), budget=st.integers(1, 4))
def test_flat_faiss_cache_logits_equal_the_dense_formula_for_any_cache(
        n: int, c: int, d: int, b: int, alpha: float, beta: float, seed: int, budget: int) -> None:
    """Property: any keys, labels (classes possibly without keys), queries, alpha and beta, and
    search batches of any size: the exact FAISS cache gives the dense formula's logits."""
    g = torch.Generator().manual_seed(seed)
    keys = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    labels = torch.randint(0, c, (n,), generator=g)
    text = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    queries = F.normalize(torch.randn(b, d, generator=g), dim=-1)
    dense = tip_logits(queries, keys, labels, text, alpha, beta)
    index = CacheIndex.build(keys.numpy(), "flat")
    got = cache_logits(index, queries, labels, text, alpha, beta, max_elements=budget * n)
    assert got.shape == (b, c)
    assert (got - dense).abs().le(1e-4 * dense.abs().clamp(min=1.0)).all()
