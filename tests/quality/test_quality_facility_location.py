"""The fast greedy paths choose exactly what the plain greedy chooses."""

import itertools

import pytest
import torch

from coreset_optim.methods.facility_location import (
    facility_location_value,
    greedy_facility_location,
    greedy_facility_location_dense,
    greedy_facility_location_incremental,
)
from coreset_optim.methods.similarity import pairwise_similarity


def brute_force_greedy(sim: torch.Tensor, k: int) -> list[int]:
    """Obviously correct: try every candidate with F(S + j) - F(S) in exact Python floats."""
    rows = sim.double().tolist()
    chosen: list[int] = []
    cover = [0.0] * len(rows)
    for _ in range(k):
        best, best_gain = None, None
        for j in range(len(rows)):
            if j in chosen:
                continue
            gain = sum(max(row[j] - c, 0.0) for row, c in zip(rows, cover))
            if best_gain is None or gain > best_gain:
                best, best_gain = j, gain
        chosen.append(best)
        cover = [max(c, row[best]) for row, c in zip(rows, cover)]
    return chosen


@pytest.mark.parametrize("kind", ["l1", "l2", "cosine"])
@pytest.mark.parametrize("n,d,k", [(7, 3, 3), (40, 16, 10), (64, 300, 16)])
def test_incremental_and_dense_match_brute_force(kind, n, d, k):
    g = torch.Generator().manual_seed(n * 31 + d)
    sim = pairwise_similarity(torch.randn(n, d, generator=g), kind)
    expected = brute_force_greedy(sim, k)
    assert greedy_facility_location_incremental(sim, k).tolist() == expected
    assert greedy_facility_location_dense(sim, k).tolist() == expected
    assert greedy_facility_location(sim, k).tolist() == expected


@pytest.mark.parametrize("seed", range(5))
def test_incremental_matches_dense_on_large_random_inputs(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(300, 64, generator=g) * torch.rand(300, 1, generator=g)
    sim = pairwise_similarity(x, "l1")
    k = 300 // 4
    fast, plain = greedy_facility_location_incremental(sim, k), greedy_facility_location_dense(sim, k)
    assert torch.equal(fast, plain)
    torch.testing.assert_close(
        facility_location_value(sim.double(), fast), facility_location_value(sim.double(), plain)
    )


def test_ties_go_to_the_lowest_index():
    # Integer similarities with many exact ties (duplicated points): every sum is exact.
    g = torch.Generator().manual_seed(0)
    pts = torch.randint(0, 4, (12, 2), generator=g).float()
    pts = torch.cat([pts, pts, pts[:5]])
    sim = pairwise_similarity(pts, "l1")
    for k in range(sim.shape[0] + 1):
        expected = brute_force_greedy(sim, k)
        assert greedy_facility_location_incremental(sim, k).tolist() == expected
        assert greedy_facility_location_dense(sim, k).tolist() == expected


def test_all_equal_similarities_pick_in_index_order():
    sim = torch.ones(6, 6)
    assert greedy_facility_location(sim, 4).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes(dtype):
    g = torch.Generator().manual_seed(1)
    sim = pairwise_similarity(torch.randint(0, 5, (20, 3), generator=g).float(), "l1").to(dtype)
    assert greedy_facility_location(sim, 6).tolist() == brute_force_greedy(sim.float(), 6)


def test_k_edges_and_errors():
    sim = pairwise_similarity(torch.randn(5, 2), "l2")
    assert greedy_facility_location(sim, 0).numel() == 0
    assert sorted(greedy_facility_location(sim, 5).tolist()) == list(range(5))
    for bad in (-1, 6):
        with pytest.raises(ValueError, match="k must be in"):
            greedy_facility_location(sim, bad)
    with pytest.raises(ValueError, match="square"):
        greedy_facility_location(torch.ones(3, 4), 1)
    bad_sim = sim.clone()
    bad_sim[1, 2] = float("nan")
    for fn in (greedy_facility_location_incremental, greedy_facility_location_dense):
        with pytest.raises(ValueError, match="NaN"):
            fn(bad_sim, 2)
        assert fn(torch.zeros(0, 0), 0).numel() == 0


def test_negative_entries_count_as_zero_like_the_plain_greedy():
    g = torch.Generator().manual_seed(2)
    sim = torch.randn(15, 15, generator=g)
    expected = brute_force_greedy(sim.clamp(min=0), 5)
    assert greedy_facility_location_incremental(sim, 5).tolist() == expected
    assert greedy_facility_location_dense(sim, 5).tolist() == expected


def test_every_prefix_is_the_greedy_of_that_size():
    g = torch.Generator().manual_seed(3)
    sim = pairwise_similarity(torch.randn(30, 5, generator=g), "cosine")
    full = greedy_facility_location(sim, 12).tolist()
    for k in itertools.chain(range(0, 12, 3), [12]):
        assert greedy_facility_location(sim, k).tolist() == full[:k]


@pytest.mark.parametrize("seed", range(4))
def test_zero_gain_ties_at_the_end_go_to_the_lowest_index(seed):
    # Once every row is covered, all remaining gains are 0 in exact arithmetic; kept (incremental)
    # gains drift by rounding, so they must be recomputed before breaking the tie.
    g = torch.Generator().manual_seed(seed)
    sim = torch.rand(9, 9, generator=g, dtype=torch.float64)
    if seed % 2:
        sim = (sim + sim.T) / 2
    expected = brute_force_greedy(sim, 9)
    assert greedy_facility_location_incremental(sim, 9).tolist() == expected
    assert greedy_facility_location_dense(sim, 9).tolist() == expected
