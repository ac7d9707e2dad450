"""Experimental selection methods of the benchmarks, registered with the library's public
``register_method`` on import (``selection="<name>"`` then builds them like the built-in ones):

* ``gradient_matching_unconstrained``: GradMatch's raw NNLS weights (no count coordinate, no
  rescale to n), so the weights do NOT sum to the source's count: what the coreset contract costs;
* ``gradient_matching_uniform``: gradient matching's examples, each weighted n / k;
* ``gradient_matching_count_weight``: gradient matching with the count coordinate's weight as an
  option (``count_weight``; the library's default is 1);
* ``consensus_loss_<mode>``: highest loss among the examples that agree with their source, under
  other agreement rules than the library's ``consensus_loss`` (:func:`consensus_variant`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from coreset_optim import GradientMatching, SketchedMethod, register_method
from coreset_optim.methods.consensus import agreement
from coreset_optim.methods.gradient_matching import gradient_matching_coreset, greedy_matching
from coreset_optim.methods.suspects import hardest_first
from coreset_optim.methods.trimmed_loss import high_loss_cluster

CONSENSUS_MODES = ("positive", "half", "product", "unit", "trim", "lowhalf", "lowhalf_half")


@register_method
@dataclass(kw_only=True)
class UnconstrainedMatching(GradientMatching):
    """Experiment only: GradMatch's raw non-negative least-squares weights (they need not sum to n)."""

    name: ClassVar[str] = "gradient_matching_unconstrained"

    def choose(self, x, k, context):
        return greedy_matching(x, k, count_weight=0.0, rescale=False)


@register_method
@dataclass(kw_only=True)
class GradientMatchingUniform(GradientMatching):
    """Experiment only: gradient matching's examples, each weighted n / k (uniform within a source)."""

    name: ClassVar[str] = "gradient_matching_uniform"

    def choose(self, x, k, context):
        chosen, _ = greedy_matching(x, k)
        return chosen, None


@register_method
@dataclass(kw_only=True)
class GradientMatchingCountWeight(GradientMatching):
    """Gradient matching with ``count_weight`` (the weight of the count coordinate) as an option."""

    name: ClassVar[str] = "gradient_matching_count_weight"

    count_weight: float = 1.0

    def choose(self, x, k, context):
        return gradient_matching_coreset(x, k, context.watch, count_weight=self.count_weight)


def raw_agreement(x: torch.Tensor) -> torch.Tensor:
    """Cosine of each row with the mean of the other rows of its source (leave-one-out): the rows
    as they are, so the largest gradients set the consensus (the library's :func:`agreement` gives
    each row one vote, a unit vector)."""
    n = x.shape[0]
    others = (x.sum(0, keepdim=True) - x) / max(1, n - 1)
    return torch.nn.functional.cosine_similarity(x, others, dim=1)


def consensus_variant(x: torch.Tensor, k: int, losses: torch.Tensor, mode: str) -> torch.Tensor:
    """The ``k`` rows of one source's sketches ``x[n, d]`` (``losses``: theirs) a consensus rule
    ``mode`` picks: the highest losses among the rows it finds agreeing (then the others, lowest
    loss first), or for ``"product"`` the highest ``loss * max(agreement, 0)``.

    Rules: ``positive``/``half``: :func:`raw_agreement` above 0 / at least its median; ``unit``:
    the library's :func:`agreement` above 0; ``trim``: ``positive`` and not in the high-loss
    cluster; ``lowhalf``/``lowhalf_half``: votes from the source's lower-loss half only (the
    small-loss criterion), above 0 / at least the median."""
    local = losses.double()
    if mode in ("lowhalf", "lowhalf_half"):
        u = torch.nn.functional.normalize(x.double(), dim=1)
        voter = (local <= local.median()).double()[:, None]
        a = torch.nn.functional.cosine_similarity(x.double(), (u * voter).sum(0, keepdim=True) - u * voter, dim=1)
        ok = a > 0 if mode == "lowhalf" else a >= a.median()
    elif mode == "unit":
        ok = agreement(x) > 0
    else:
        a = raw_agreement(x.double())
        if mode == "product":
            return torch.sort(local * a.clamp(min=0), descending=True, stable=True).indices[:k]
        if mode == "half":
            ok = a >= a.median()
        elif mode == "trim":
            ok = (a > 0) & ~high_loss_cluster(local)
        else:  # positive
            ok = a > 0
    return hardest_first(local, k, ~ok)


@dataclass(kw_only=True)
class ConsensusVariant(SketchedMethod):
    """:func:`consensus_variant` with the rule ``mode``, each weighted n / k (one registered
    subclass per mode, ``consensus_loss_<mode>``; no suspects reported)."""

    mode: ClassVar[str] = "positive"

    def choose(self, x, k, context):
        return consensus_variant(x, k, context.group_losses(), self.mode), None


for _mode in CONSENSUS_MODES:
    register_method(
        type(f"ConsensusLoss_{_mode}", (ConsensusVariant,), {"name": f"consensus_loss_{_mode}", "mode": _mode})
    )
