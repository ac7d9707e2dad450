"""Baseline selectors: ``k`` rows of a source, each weighted n / k (the pipeline's default weights).

``random``: a uniform subset drawn with the optimizer's generator (so a checkpoint reload replays
the same draws), each weighted n / k: an unbiased estimate of the source's sum. It reads nothing
of the examples, so ``select()`` makes no pass over the batch for it (``reads_losses = False``).
``loss``: the k highest per-example losses (ties: lowest index), each weighted n / k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..records import ChooseContext
from .base import SelectionMethod


def random_rows(n: int, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` of ``n`` rows, uniformly without replacement (on the host: the generator's device)."""
    return torch.randperm(n, generator=generator)[:k]


def highest_losses(losses: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest of ``losses[n]``; equal losses keep their order (a stable sort)."""
    return torch.sort(losses.float(), descending=True, stable=True).indices[:k]


# Neither reads a gradient sketch; "loss" reads the losses of the base class's pass (no grad),
# "random" not even those: it gets no pass.


@dataclass(kw_only=True)
class RandomSubset(SelectionMethod):
    """``selection="random"``: a uniform subset of each source, weighted n / k.

    No pass over the large batch runs (``reads_losses = False``): a step costs a plain step of k
    plus bookkeeping. The draws are those the pass-based pipeline made (same generator, same
    per-source budgets), so a seed chooses the same examples as before, provided every example's
    loss is finite: examples are not judged before the draw, so one with a non-finite loss can be
    drawn, and is then left out of the backward (see ``CoresetOptimizer.select``).
    """

    name: ClassVar[str] = "random"
    reads_losses: ClassVar[bool] = False

    def choose(self, x: torch.Tensor, k: int, context: ChooseContext) -> tuple[torch.Tensor, None]:
        return random_rows(x.shape[0], k, context.generator).to(x.device), None


@dataclass(kw_only=True)
class HighestLoss(SelectionMethod):
    """``selection="loss"``: each source's k highest losses, weighted n / k (chases mislabeled
    examples when there are some: see :class:`~coreset_optim.methods.consensus.ConsensusLoss`)."""

    name: ClassVar[str] = "loss"

    def choose(self, x: torch.Tensor, k: int, context: ChooseContext) -> tuple[torch.Tensor, None]:
        return highest_losses(context.group_losses(), k), None
