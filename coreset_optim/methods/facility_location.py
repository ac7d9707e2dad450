"""Facility location: F(S) = sum_i max_{j in S} sim[i, j], maximized greedily.

Two implementations of the same greedy (largest gain first; gains within ``TIE_RTOL`` of the
largest, relative to the largest possible gain, count as tied and go to the lowest index), both
summing gains in float64 so that they choose alike:

* :func:`greedy_facility_location_dense` recomputes every gain at every step, a fixed amount of
  work on the similarity's device with no host synchronization: the path for GPUs.
* :func:`greedy_facility_location_incremental` keeps the gains and, after each choice, subtracts
  only what the rows whose coverage rose lose (few rows after the first steps): the path for CPUs,
  where it beats lazy greedy (see docs/performance.md). Its loop needs data-dependent row sets,
  so it runs in numpy on the host.

:func:`greedy_facility_location` picks by device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..records import ChooseContext
from ..timing import Stopwatch
from .base import SketchedMethod
from .similarity import pairwise_similarity, SIMILARITIES


def facility_location_value(sim: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """F(S) for the columns ``selected`` (0 for the empty set; similarities are non-negative)."""
    if selected.numel() == 0:
        return sim.new_zeros(())
    return sim.index_select(1, selected).amax(1).sum()


def facility_location_gains(sim: torch.Tensor, coverage: torch.Tensor) -> torch.Tensor:
    """Gain of adding each candidate j: ``sum_i max(sim[i, j] - coverage[i], 0)``."""
    return (sim - coverage[:, None]).clamp_(min=0).sum(0)


TIE_RTOL = 1e-12  # gains closer than this (relative to the largest column sum) are ties
_DRIFT_RTOL = 1e-9  # incremental gains this close to the best are recomputed exactly


def _check_k(sim: torch.Tensor, k: int) -> int:
    if sim.ndim != 2 or sim.shape[0] != sim.shape[1]:
        raise ValueError(f"sim must be a square Tensor[n, n], got shape {tuple(sim.shape)}")
    n = sim.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if not bool(torch.isfinite(sim).all()):  # one check before the loop, never inside it
        raise ValueError("sim has NaN or infinite entries; drop those rows and columns first")
    return n


def greedy_facility_location_dense(sim: torch.Tensor, k: int) -> torch.Tensor:
    """The plain greedy: all gains recomputed each step (float64), no host syncs in the loop."""
    n = _check_k(sim, k)
    if k == 0:
        return torch.empty(0, dtype=torch.long, device=sim.device)
    sim64 = sim.detach().to(torch.float64)
    selected = torch.empty(k, dtype=torch.long, device=sim.device)
    coverage = sim64.new_zeros(n)
    taken = torch.zeros(n, dtype=torch.bool, device=sim.device)
    tol = sim64.clamp(min=0).sum(0).max() * TIE_RTOL
    for step in range(k):
        gains = facility_location_gains(sim64, coverage).masked_fill_(taken, -float("inf"))
        best = (gains >= gains.max() - tol).byte().argmax().view(1)  # first of the tied
        selected[step : step + 1] = best
        taken.index_fill_(0, best, True)
        coverage = torch.maximum(coverage, sim64.index_select(1, best).squeeze(1))
    return selected


def greedy_facility_location_incremental(sim: torch.Tensor, k: int) -> torch.Tensor:
    """The same greedy with gains updated in place (host numpy; for CPU tensors).

    When row i's coverage rises from ``lo`` to ``hi``, candidate j's gain loses
    ``clip(sim[i, j], lo, hi) - lo``; rows whose coverage did not rise lose nothing. Clipping is
    exact and the sums are float64; when several gains are near the best they are recomputed
    exactly before the choice, so ties are broken as in the plain greedy.
    """
    n = _check_k(sim, k)
    dtype = np.float64 if sim.dtype == torch.float64 else np.float32
    s = np.maximum(sim.detach().cpu().to(torch.float64 if dtype is np.float64 else torch.float32).numpy(), 0)
    coverage = np.zeros(n, dtype=dtype)
    gains = s.sum(0, dtype=np.float64)
    scale = float(gains.max()) if n else 0.0
    selected = np.empty(k, dtype=np.int64)
    buf = np.empty_like(s)
    for step in range(k):
        # The kept gains carry float64 drift: when several are near the best, recompute them
        # exactly, then break ties as the dense path does.
        near = np.flatnonzero(gains >= gains.max() - _DRIFT_RTOL * scale)
        if near.size == 1:  # clear winner: drift (~1e-13 relative) cannot change it
            best = int(near[0])
        else:
            exact = np.maximum(s[:, near].astype(np.float64) - coverage[:, None], 0).sum(0)
            gains[near] = exact
            best = int(near[np.argmax(exact >= exact.max() - TIE_RTOL * scale)])
        selected[step] = best
        column = s[:, best]
        rows = np.flatnonzero(column > coverage)
        lo, hi = coverage[rows], column[rows]
        block = np.take(s, rows, axis=0, out=buf[: rows.size])
        np.clip(block, lo[:, None], hi[:, None], out=block)
        gains -= block.sum(0, dtype=np.float64)
        gains += lo.sum(dtype=np.float64)
        coverage[rows] = hi
        gains[best] = -np.inf
    return torch.from_numpy(selected).to(sim.device)


def greedy_facility_location(sim: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of ``k`` columns chosen greedily by largest gain (ties: the lowest index)."""
    if sim.device.type == "cpu":
        return greedy_facility_location_incremental(sim, k)
    return greedy_facility_location_dense(sim, k)


def cluster_weights(sim: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """How many rows are most similar to each selected column (CRAIG's weights); sums to n."""
    nearest = sim.index_select(1, selected).argmax(1)
    return torch.bincount(nearest, minlength=selected.numel()).to(sim.dtype)


def facility_location_coreset(
    x: torch.Tensor, k: int, similarity: str, watch: Stopwatch | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` rows of ``x`` by greedy facility location, weighted by cluster size."""
    sim = pairwise_similarity(x, similarity)
    if watch is not None:
        watch.lap("similarity")
    chosen = greedy_facility_location(sim, k)
    if watch is not None:
        watch.lap("greedy")
    weights = cluster_weights(sim, chosen)
    if watch is not None:
        watch.lap("weights")
    return chosen, weights


@dataclass(kw_only=True)
class FacilityLocation(SketchedMethod):
    """``selection="facility_location"``, CoLM's rule: per source, the rows that best cover the
    others under ``similarity`` ("l1": CoLM's ``max - ||x_i - x_j||_1``, or "cosine"), each
    weighted by the size of its cluster."""

    name: ClassVar[str] = "facility_location"
    similarity: str = "l1"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")

    def choose(self, x: torch.Tensor, k: int, context: ChooseContext) -> tuple[torch.Tensor, torch.Tensor]:
        return facility_location_coreset(x, k, self.similarity, context.watch)
