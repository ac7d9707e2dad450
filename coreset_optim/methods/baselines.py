"""Baseline selectors, same contract as facility location: ``k`` rows, weights summing to n.

``random``: a uniform subset drawn with the optimizer's generator (so a checkpoint reload replays
the same draws), each weighted n / k: an unbiased estimate of the source's sum.
``loss``: the k highest per-example losses (ties: lowest index), each weighted n / k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import SelectionMethod


def random_coreset(
    x: torch.Tensor, k: int, *, generator: torch.Generator | None = None, **_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    chosen = torch.randperm(n, generator=generator)[:k].to(x.device)
    return chosen, torch.full((k,), n / k, device=x.device)


def loss_coreset(
    x: torch.Tensor, k: int, *, losses: torch.Tensor, rows: torch.Tensor, **_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    n = rows.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    local = losses.to(rows.device).index_select(0, rows).float()
    # Stable descending order: equal losses keep their batch order.
    order = torch.sort(local, descending=True, stable=True).indices
    return order[:k], torch.full((k,), n / k, device=rows.device)


# Neither reads a gradient sketch: the base class's pass computes the losses only (no grad).


@dataclass(kw_only=True)
class RandomSubset(SelectionMethod):
    """``selection="random"``: a uniform subset of each source, weighted n / k."""

    name: ClassVar[str] = "random"

    def choose(self, x: torch.Tensor, k: int, **context: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return random_coreset(x, k, **context)


@dataclass(kw_only=True)
class HighestLoss(SelectionMethod):
    """``selection="loss"``: each source's k highest losses, weighted n / k (chases mislabeled
    examples when there are some: see :class:`~coreset_optim.methods.consensus.ConsensusLoss`)."""

    name: ClassVar[str] = "loss"

    def choose(self, x: torch.Tensor, k: int, **context: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return loss_coreset(x, k, **context)
