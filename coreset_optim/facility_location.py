"""Facility location: F(S) = sum_i max_{j in S} sim[i, j], maximized greedily.

The marginal gain is apart from the greedy loop (as in apricot), and the loop stays on the
similarity's device with no host synchronization, so it runs as well on a GPU as on a CPU.
"""

from __future__ import annotations

import torch


def facility_location_value(sim: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """F(S) for the columns ``selected`` (0 for the empty set; similarities are non-negative)."""
    if selected.numel() == 0:
        return sim.new_zeros(())
    return sim.index_select(1, selected).amax(1).sum()


def facility_location_gains(sim: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Gain of adding each candidate j: ``sum_i max(sim[i, j] - coverage[i], 0)``."""
    return (sim - coverage[:, None]).clamp_(min=0).sum(0)


def greedy_facility_location(sim: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` columns chosen greedily by largest gain (ties: the lowest index)."""
    n = sim.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    selected = torch.empty(k, dtype=torch.long, device=sim.device)
    coverage = sim.new_zeros(n)
    taken = torch.zeros(n, dtype=torch.bool, device=sim.device)
    for step in range(k):
        gains = facility_location_gains(sim, coverage).masked_fill_(taken, -float("inf"))
        best = gains.argmax().view(1)
        selected[step : step + 1] = best
        taken.index_fill_(0, best, True)
        coverage = torch.maximum(coverage, sim.index_select(1, best).squeeze(1))
    return selected


def cluster_weights(sim: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """How many rows are most similar to each selected column (CRAIG's weights); sums to n."""
    nearest = sim.index_select(1, selected).argmax(1)
    return torch.bincount(nearest, minlength=selected.numel()).to(sim.dtype)
