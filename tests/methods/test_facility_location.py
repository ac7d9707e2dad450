"""Greedy facility location and the similarities against slow, obviously-right references."""

import itertools
import math

import pytest
import torch

from coreset_optim.methods.facility_location import cluster_weights, facility_location_value, greedy_facility_location
from coreset_optim.methods.similarity import pairwise_similarity


def objective(sim, chosen):
    """F(S) = sum_i max_{j in S} sim[i][j], with Python loops."""
    if not chosen:
        return 0.0
    return sum(max(float(sim[i, j]) for j in chosen) for i in range(sim.shape[0]))


def brute_greedy(sim, k):
    """Greedy by recomputing F(S + j) - F(S) for every candidate; ties to the lowest index."""
    chosen = []
    for _ in range(k):
        base = objective(sim, chosen)
        best, best_gain = None, -math.inf
        for j in range(sim.shape[0]):
            if j in chosen:
                continue
            gain = objective(sim, chosen + [j]) - base
            if gain > best_gain + 1e-12:
                best, best_gain = j, gain
        chosen.append(best)
    return chosen


def brute_optimum(sim, k):
    return max(objective(sim, list(s)) for s in itertools.combinations(range(sim.shape[0]), k))


@pytest.mark.parametrize("seed", range(6))
def test_greedy_equals_brute_force_greedy_and_bound(seed):
    g = torch.Generator().manual_seed(seed)
    n = 8
    sim = torch.rand(n, n, generator=g, dtype=torch.float64)
    if seed % 2:
        sim = (sim + sim.T) / 2  # symmetric, like the real similarities
    for k in range(0, n + 1):
        chosen = greedy_facility_location(sim, k)
        ref = brute_greedy(sim, k)
        assert chosen.tolist() == ref
        value = facility_location_value(sim, chosen).item()
        assert value == pytest.approx(objective(sim, ref), rel=1e-12)
        if 0 < k < n:
            assert value >= (1 - 1 / math.e) * brute_optimum(sim, k) - 1e-9


def test_greedy_on_sketch_similarities():
    x = torch.randn(8, 4, dtype=torch.float64)
    for kind in ("l1", "l2", "cosine"):
        sim = pairwise_similarity(x, kind)
        for k in (1, 3, 5):
            chosen = greedy_facility_location(sim, k)
            assert chosen.tolist() == brute_greedy(sim, k)
            value = facility_location_value(sim, chosen).item()
            assert value >= (1 - 1 / math.e) * brute_optimum(sim, k) - 1e-9


def test_ties_go_to_lowest_index():
    sim = torch.ones(5, 5)
    assert greedy_facility_location(sim, 3).tolist() == [0, 1, 2]


def test_greedy_rejects_bad_k():
    with pytest.raises(ValueError, match="k"):
        greedy_facility_location(torch.rand(3, 3), 4)


def _ref_weights(sim, chosen):
    counts = [0] * len(chosen)
    for i in range(sim.shape[0]):
        vals = [float(sim[i, j]) for j in chosen]
        counts[vals.index(max(vals))] += 1
    return counts


@pytest.mark.parametrize("seed", range(4))
def test_cluster_weights_match_loop_and_sum_to_n(seed):
    g = torch.Generator().manual_seed(seed)
    n = 9
    x = torch.randn(n, 3, generator=g, dtype=torch.float64)
    sim = pairwise_similarity(x, "l1")
    chosen = greedy_facility_location(sim, 4)
    w = cluster_weights(sim, chosen)
    assert w.tolist() == _ref_weights(sim, chosen)
    assert w.sum().item() == n
    assert bool((w >= 1).all())  # distinct points: each chosen one is its own nearest
    raw = torch.rand(n, n, generator=g)
    w = cluster_weights(raw, torch.tensor([2, 5, 7]))
    assert w.tolist() == _ref_weights(raw, [2, 5, 7]) and w.sum().item() == n


def _ref_similarity(x, kind):
    n = x.shape[0]
    out = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            a, b = x[i].tolist(), x[j].tolist()
            if kind == "l1":
                out[i, j] = sum(abs(u - v) for u, v in zip(a, b))
            elif kind == "l2":
                out[i, j] = math.sqrt(sum((u - v) ** 2 for u, v in zip(a, b)))
            else:
                na, nb = math.sqrt(sum(u * u for u in a)), math.sqrt(sum(v * v for v in b))
                cos = 0.0 if na == 0 or nb == 0 else sum(u * v for u, v in zip(a, b)) / (na * nb)
                out[i, j] = 1.0 + cos
    if kind in ("l1", "l2"):
        out = out.max() - out
    return out


@pytest.mark.parametrize("kind", ["l1", "l2", "cosine"])
@pytest.mark.parametrize("n", [6, 30])  # 30 > 25 rows: cdist's matrix-multiply path for l2
def test_similarity_matches_loop(kind, n):
    x = torch.randn(n, 5)
    x[1] = 0.0  # a zero row (cosine must stay finite)
    sim = pairwise_similarity(x, kind)
    ref = _ref_similarity(x.double(), kind).float()
    # For more than 25 rows torch.cdist computes L2 through ||a||^2 + ||b||^2 - 2ab (matrix
    # multiply), whose cancellation error is about sqrt(eps) * ||x|| (~2e-3 here, e.g. on the
    # diagonal); L1 and cosine are exact to float32 rounding.
    tol = 5e-3 if (kind == "l2" and n > 25) else 1e-4
    torch.testing.assert_close(sim, ref, atol=tol, rtol=1e-4)
    assert bool((sim >= 0).all()) and bool(torch.isfinite(sim).all())
    torch.testing.assert_close(sim, sim.T, atol=1e-5, rtol=0)


def test_unknown_similarity():
    with pytest.raises(ValueError, match="similarity"):
        pairwise_similarity(torch.randn(3, 2), "dot")
