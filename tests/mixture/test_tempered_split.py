"""tempered_split: per-source budgets for balanced / temperature sampling, hand-computed."""

import itertools

import pytest

from coreset_optim.mixture.budget import proportional_split, tempered_split

INF = float("inf")


def test_balanced_hand_computed():
    # equal share 16/5 = 3.2: the sources of 1 and 3 take all they have, the other 12 split 4/4/4
    assert tempered_split([30, 20, 10, 3, 1], 16, INF) == [4, 4, 4, 3, 1]
    assert tempered_split([40, 1, 1], 3, INF) == [1, 1, 1]
    assert tempered_split([0, 5, 9], 4, INF) == [0, 2, 2]


def test_temperature_two_hand_computed():
    # sqrt counts 10, 5, 1 of 16: shares 6.25 / 3.125 / 0.625 -> floors 6, 3, 0, remainder to 0.625
    assert tempered_split([100, 25, 1], 10, 2.0) == [6, 3, 1]


def test_temperature_one_is_proportional():
    for counts in itertools.product([0, 1, 3, 8, 20], repeat=3):
        for budget in range(0, sum(counts) + 2):
            assert tempered_split(list(counts), budget, 1.0) == proportional_split(list(counts), budget), (
                counts,
                budget,
            )


def test_budget_larger_than_batch_takes_everything():
    assert tempered_split([2, 3], 10, INF) == [2, 3]


def test_sums_and_caps():
    for counts in itertools.product([0, 1, 2, 7, 30], repeat=4):
        for budget in (1, 5, 16):
            for t in (0.5, 2.0, INF):
                alloc = tempered_split(list(counts), budget, t)
                assert sum(alloc) == min(budget, sum(counts))
                assert all(0 <= a <= c for a, c in zip(alloc, counts))


def test_bad_temperature():
    with pytest.raises(ValueError, match="temperature must be > 0"):
        tempered_split([1, 2], 2, 0.0)
