"""Highest loss among the examples that agree with their source (``selection="consensus_loss"``).

Highest-loss selection (``"loss"``) trains on each source's hardest examples: on clean data the
informative ones, with corrupted answers the corrupted ones (the flaw RHO-LOSS points out in loss
and gradient-norm selection). A hard clean example still pulls the model the way its source's
other examples do; a wrong answer pulls elsewhere. So each example's Adam-normalized gradient
sketch (the gradient as the wrapped optimizer will scale it: divided by ``sqrt(v_hat) + eps``) is
compared with its source's other sketches, each a unit vector: one vote per example
(:func:`agreement`). Examples with a positive cosine are eligible, hardest first; the others are
*suspects*, taken only when the eligible run out (lowest loss first). Weights are n / k, as for
``"loss"``.

It needs the sketch pass (per-example gradients of the sketch layers), not a second pass: the
consensus is the batch's own, so no clean examples and no extra forward are needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..records import ChooseContext
from .base import SketchedMethod
from .suspects import flag_per_source, hardest_first

MIN_EXAMPLES = 3  # a consensus needs at least two other examples of the source


def agreement(x: torch.Tensor) -> torch.Tensor:
    """``Tensor[n]``: cosine of each row of ``x[n, d]`` with the sum of the other rows' unit
    vectors (0 for a zero row or a zero sum).

    One vote per example: summing the raw rows instead lets the largest gradients (the highest
    losses, i.e. the corrupted answers when there are some) set the consensus, and a coherent
    group of wrong answers (another task's answers) then agrees with itself."""
    x = x.double()
    unit = torch.nn.functional.normalize(x, dim=1)
    others = unit.sum(0, keepdim=True) - unit
    return torch.nn.functional.cosine_similarity(x, others, dim=1, eps=1e-30)


def disagreeing(x: torch.Tensor) -> torch.Tensor:
    """``BoolTensor[n]``: rows whose cosine with the rest of their source is not positive (none
    when the source has fewer than ``MIN_EXAMPLES`` rows)."""
    if x.shape[0] < MIN_EXAMPLES:
        return torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    return agreement(x) <= 0


def consensus_loss_coreset(x: torch.Tensor, k: int, losses: torch.Tensor) -> torch.Tensor:
    """The ``k`` highest-loss rows of one source's ``x[n, d]`` (its normalized sketches; ``losses``:
    theirs) among those that agree with the rest, then the disagreeing ones by ascending loss."""
    return hardest_first(losses.to(x.device), k, disagreeing(x))


def consensus_suspects(
    sketches: torch.Tensor, losses: torch.Tensor, valid: torch.Tensor, source_codes: torch.Tensor, num_sources: int
) -> torch.Tensor:
    """``BoolTensor[B]``: the examples whose normalized sketch disagrees with their source's
    (``sketches``: the rows the selector read, each source on its own coordinates)."""
    return flag_per_source(sketches, disagreeing, valid, source_codes, num_sources)


@dataclass(kw_only=True)
class ConsensusLoss(SketchedMethod):
    """``selection="consensus_loss"``, the default: the highest losses among the examples whose
    Adam-normalized sketch agrees with their source's; the others are the suspects."""

    name: ClassVar[str] = "consensus_loss"

    def choose(self, x: torch.Tensor, k: int, context: ChooseContext) -> tuple[torch.Tensor, None]:
        return consensus_loss_coreset(x, k, context.group_losses()).to(context.rows.device), None

    def suspects(self, compressed, losses, valid, codes, num_sources, reference_losses=None) -> torch.Tensor:
        return consensus_suspects(compressed, losses, valid, codes, num_sources)
