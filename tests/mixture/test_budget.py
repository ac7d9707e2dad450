"""Source-aware budgets: kept sources, proportional split (floor + remainder), kept > budget."""

import random
from fractions import Fraction

import pytest
import torch

from coreset_optim.mixture.budget import allocate_budget, proportional_split, small_sources, sources_kept_whole
from coreset_optim.methods.facility_location import FacilityLocation
from coreset_optim.mixture.choose import select_from_sketches
from core_utils import build, make_batch, regression_loss


def _largest_remainder(counts, budget):
    """Reference with exact fractions: floor of each share, then one more to the largest
    fractional parts (ties: the larger source, then the first)."""
    total = sum(counts)
    if budget >= total:
        return list(counts)
    if budget <= 0:
        return [0] * len(counts)
    shares = [Fraction(budget * c, total) for c in counts]
    alloc = [int(s) for s in shares]
    order = sorted(range(len(counts)), key=lambda i: (-(shares[i] - int(shares[i])), -counts[i], i))
    for i in order[: budget - sum(alloc)]:
        alloc[i] += 1
    return alloc


@pytest.mark.parametrize(
    "counts,budget,expected",
    [
        ([5, 3, 2], 5, [3, 1, 1]),  # 2.5, 1.5, 1.0: tie of .5 -> the larger source
        ([7, 2, 1], 4, [3, 1, 0]),  # 2.8, .8, .4
        ([2, 23, 11], 21, [1, 14, 6]),  # 1.17, 13.42, 6.42: exact tie -> the larger source
        ([4, 4], 3, [2, 1]),  # 1.5, 1.5: equal sources -> the first
        ([10, 0, 5], 6, [4, 0, 2]),
        ([3, 3], 10, [3, 3]),  # budget >= total: everything
        ([3, 3], 0, [0, 0]),
        ([], 3, []),
    ],
)
def test_proportional_split_hand_cases(counts, budget, expected):
    assert proportional_split(counts, budget) == expected


def test_proportional_split_matches_exact_reference():
    rng = random.Random(0)
    for _ in range(3000):
        counts = [rng.randint(0, 40) for _ in range(rng.randint(1, 6))]
        budget = rng.randint(0, sum(counts) + 2)
        alloc = proportional_split(counts, budget)
        assert alloc == _largest_remainder(counts, budget), (counts, budget)
        assert sum(alloc) == min(budget, sum(counts))
        assert all(0 <= a <= c for a, c in zip(alloc, counts))


def test_auto_rule():
    # share = count * budget / total: below one example -> small
    assert small_sources([90, 8, 2], 10) == [False, True, True]
    assert small_sources([50, 10, 0], 10) == [False, False, False]  # 10 * 10 / 60 >= 1; empty never
    # every source small: the kept examples exceed the budget, so none is kept whole
    assert small_sources([5, 5], 1) == [True, True]
    assert allocate_budget([5, 5], 1, [True, True]) == [1, 0]


def test_allocate_budget_keeps_small_sources():
    assert allocate_budget([14, 4, 2], 6, [False, False, True]) == [3, 1, 2]
    # keeping both would leave nothing for "a": only the smallest is kept whole
    assert allocate_budget([14, 4, 2], 6, [False, True, True]) == [3, 1, 2]
    assert allocate_budget([14, 4, 2], 8, [False, True, True]) == [2, 4, 2]
    assert allocate_budget([90, 8, 2], 10, [False, True, True]) == [7, 1, 2]
    # kept examples exceed the budget: proportional over all sources, never above the budget
    assert allocate_budget([14, 4, 2], 3, [False, True, True]) == [2, 1, 0]
    rng = random.Random(1)
    for _ in range(500):
        counts = [rng.randint(0, 20) for _ in range(rng.randint(1, 5))]
        keep = [rng.random() < 0.5 for _ in counts]
        budget = rng.randint(1, sum(counts) + 3)
        alloc = allocate_budget(counts, budget, keep)
        assert sum(alloc) == min(budget, sum(counts))
        assert all(0 <= a <= c for a, c in zip(alloc, counts))
        whole = sources_kept_whole(counts, budget, keep)
        assert all(k for w, k in zip(whole, keep) if w)  # only marked sources are kept whole
        assert all(a == c for a, c, w in zip(alloc, counts, whole) if w)
        others = sum(1 for c, w in zip(counts, whole) if c > 0 and not w)
        assert sum(c for c, w in zip(counts, whole) if w) + others <= max(budget, others)
        if sum(c for c, k in zip(counts, keep) if k) + sum(1 for c, k in zip(counts, keep) if c and not k) <= budget:
            assert all(a == c for a, c, k in zip(alloc, counts, keep) if k)  # all marked fit


def _sources_batch():
    sources = ["a"] * 14 + ["b"] * 4 + ["c"] * 2
    order = torch.randperm(20, generator=torch.Generator().manual_seed(3)).tolist()
    return [sources[i] for i in order]


def _check_per_source(cs, sources, kept):
    picked = [sources[i] for i in cs.indices.tolist()]
    for name in set(sources):
        rows = [j for j, s in enumerate(picked) if s == name]
        assert cs.source_counts[name].in_batch == sources.count(name)
        assert cs.source_counts[name].selected == len(rows)
        if name in kept:
            assert cs.source_counts[name].kept_whole
            assert sorted(cs.indices[rows].tolist()) == [i for i, s in enumerate(sources) if s == name]
            torch.testing.assert_close(cs.weights[rows], torch.ones(len(rows)))
        elif rows:
            # cluster weights within a source sum to its number of examples
            torch.testing.assert_close(cs.weights[rows].sum(), torch.tensor(float(sources.count(name))))


def test_select_with_listed_keep_sources():
    sources = _sources_batch()
    model, opt, wrapper = build(coreset_size=6, keep_sources=["c"])
    cs = wrapper.select(make_batch(20), regression_loss(model), sources=sources)
    assert len(cs) == 6
    assert {n: (s.in_batch, s.selected, s.kept_whole) for n, s in cs.source_counts.items()} == {
        "a": (14, 3, False),
        "b": (4, 1, False),
        "c": (2, 2, True),
    }
    _check_per_source(cs, sources, kept={"c"})
    torch.testing.assert_close(cs.weights.sum(), torch.tensor(20.0))


def test_select_auto_rule_and_source_key():
    sources = ["a"] * 18 + ["b"] * 2
    model, opt, wrapper = build(coreset_size=5, source_key="src")
    batch = make_batch(20)
    batch["src"] = sources
    loss_fn = regression_loss(model)
    cs = wrapper.select(batch, lambda b: loss_fn({"x": b["x"], "y": b["y"]}))
    assert {n: (s.in_batch, s.selected, s.kept_whole) for n, s in cs.source_counts.items()} == {
        "a": (18, 3, False),
        "b": (2, 2, True),
    }
    _check_per_source(cs, sources, kept={"b"})
    assert cs.batch["src"] == [sources[i] for i in cs.indices.tolist()]


def test_select_keep_sources_none_is_proportional():
    sources = _sources_batch()
    model, opt, wrapper = build(coreset_size=10, keep_sources=None)
    cs = wrapper.select(make_batch(20), regression_loss(model), sources=torch.tensor([ord(s) for s in sources]))
    assert [cs.source_counts[ord(n)].selected for n in "abc"] == [7, 2, 1]
    assert not any(s.kept_whole for s in cs.source_counts.values())
    torch.testing.assert_close(cs.weights.sum(), torch.tensor(20.0))


def test_select_sources_as_numpy():
    import numpy as np

    sources = _sources_batch()
    model, opt, wrapper = build(coreset_size=6, keep_sources=["c"])
    cs = wrapper.select(make_batch(20), regression_loss(model), sources=np.array(sources))
    assert {n: s.selected for n, s in cs.source_counts.items()} == {"a": 3, "b": 1, "c": 2}


def test_select_kept_exceeding_budget():
    sources = _sources_batch()
    model, opt, wrapper = build(coreset_size=3, keep_sources=["b", "c"])
    cs = wrapper.select(make_batch(20), regression_loss(model), sources=sources)
    assert len(cs) == 3
    assert [cs.source_counts[n].selected for n in "abc"] == [2, 1, 0]
    assert not any(s.kept_whole for s in cs.source_counts.values())
    torch.testing.assert_close(cs.weights.sum(), torch.tensor(20.0))


def test_selection_invariants_random():
    """Through select_from_sketches: never above the budget, only valid rows, weights sum to N."""
    g = torch.Generator().manual_seed(0)
    rng = random.Random(0)
    for trial in range(60):
        B = rng.randint(1, 24)
        num_sources = rng.randint(1, 4)
        codes = torch.randint(num_sources, (B,), generator=g)
        valid = torch.rand(B, generator=g) > 0.2
        if not valid.any():
            valid[0] = True
        sketches = torch.randn(B, 7, generator=g)
        counts = torch.bincount(codes[valid], minlength=num_sources).tolist()
        budget = rng.randint(1, B)
        keep = small_sources(counts, budget) if trial % 2 else [rng.random() < 0.3 for _ in counts]
        sel = select_from_sketches(sketches, valid, codes, num_sources, budget, keep, FacilityLocation(sketch_dim=4))
        N = int(valid.sum())
        assert sel.indices.numel() == min(budget, N) == sel.weights.numel()
        assert sel.indices.unique().numel() == sel.indices.numel()
        assert bool(valid[sel.indices].all())
        assert torch.all(sel.indices[1:] > sel.indices[:-1])
        torch.testing.assert_close(sel.weights.sum(), torch.tensor(float(N)))
        assert bool((sel.weights > 0).all())
        per_source = torch.bincount(codes[sel.indices], minlength=num_sources).tolist()
        assert per_source == sel.selected_per_source == allocate_budget(counts, budget, keep)
        assert sel.compressed.shape == (B, 4)
        assert bool(torch.isnan(sel.compressed[~valid]).all())
