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


# --- candidates for a default with a bounded worst case (benchmarks/noise_bound.py) ------------
# Each flags suspects per source from the losses and the small-loss half's anchor; the coreset is
# the hardest non-suspects (then suspects, lowest loss first), weighted n / k. The one chosen is the
# library's anchored_consensus (rule "small-loss anchor, gap or negative"); these are the others
# compared with it while choosing, kept so that the choosing runs can be repeated.


def _flagged_choice(flag):
    """A choose step from ``flag(x, losses) -> BoolTensor[n]`` (no flags below four rows)."""

    def choose(self, x, k, context):
        losses = context.group_losses().to(x.device)
        if x.shape[0] < 4:
            return hardest_first(losses, k, torch.zeros_like(losses, dtype=torch.bool)), None
        return hardest_first(losses, k, flag(self, x, losses)), None

    return choose


def _anchor(x, losses):
    from coreset_optim.methods.anchored import anchor_agreement

    small = losses <= losses.median()
    return small, anchor_agreement(x, small)


def _below_quantile(x_self, x, losses):
    small, cosine = _anchor(x, losses)
    return ~((cosine > 0) & (losses <= torch.quantile(losses.double(), x_self.q).to(losses.dtype)))


def _gap_only(x_self, x, losses):
    from coreset_optim.methods.anchored import anchor_agreement, high_loss_component

    high = high_loss_component(losses, x_self.min_separation)
    voters = ~high if bool(high.any()) else losses <= losses.median()
    return ~((anchor_agreement(x, voters) > 0) & ~high)


def _gap_and_typical(x_self, x, losses):
    from coreset_optim.methods.anchored import high_loss_component

    small, cosine = _anchor(x, losses)
    return high_loss_component(losses) & (cosine < x_self.tau * cosine[small].median())


def _gap_or_top_anchor(x_self, x, losses):
    from coreset_optim.methods.anchored import anchor_agreement, high_loss_component

    small, cosine = _anchor(x, losses)
    closer_to_top = anchor_agreement(x, ~small) > cosine
    return (high_loss_component(losses) & (cosine < cosine[small].median())) | (~small & closer_to_top)


@register_method
@dataclass(kw_only=True)
class SmallLossQuantile(SketchedMethod):
    """Candidate: hardest among the rows below the loss quantile ``q`` that agree with the anchor."""

    name: ClassVar[str] = "bound_quantile"
    q: float = 0.5
    choose = _flagged_choice(_below_quantile)


@register_method
@dataclass(kw_only=True)
class GapOnly(SketchedMethod):
    """Candidate: the two-means high-loss component excluded, the rest voting the anchor."""

    name: ClassVar[str] = "bound_gap"
    min_separation: float = 2.0
    choose = _flagged_choice(_gap_only)


@register_method
@dataclass(kw_only=True)
class GapAndTypical(SketchedMethod):
    """Candidate: suspects are the high component's rows less aligned than ``tau`` x the small-loss
    half's median row (the chosen rule without its second clause)."""

    name: ClassVar[str] = "bound_gap_typical"
    tau: float = 1.0
    choose = _flagged_choice(_gap_and_typical)


@register_method
@dataclass(kw_only=True)
class GapOrTopAnchor(SketchedMethod):
    """Candidate: the above, or upper-half rows closer to the upper half's anchor than to the
    small-loss one."""

    name: ClassVar[str] = "bound_gap_top_anchor"
    choose = _flagged_choice(_gap_or_top_anchor)


# --- after the choice (issue 22, the second round): the same suspects, another order among the
# rest. The chosen rule takes the hardest non-suspects; when the suspects miss some corrupted rows,
# those are the hardest rows left, so hardest-first concentrates them in the coreset.


def _order_after_filter(order):
    """A choose step: ``order(losses, suspects, generator) -> key`` ranks the non-suspects (the
    library's :func:`anchored_suspects`); the suspects come after them, lowest loss first."""

    def choose(self, x, k, context):
        from coreset_optim.methods.anchored import anchored_suspects

        losses = context.group_losses().to(x.device)
        suspects = anchored_suspects(x, losses)
        key = order(losses.double(), suspects, context.generator).to(x.device)
        return hardest_first(torch.where(suspects, losses.double(), key), k, suspects), None

    return choose


def _random_key(losses, suspects, generator):
    return torch.rand(losses.shape[0], generator=generator, dtype=torch.float64)


def _middle_key(losses, suspects, generator):
    """Closest to the non-suspects' median loss first (higher key = earlier)."""
    rest = losses[~suspects] if bool((~suspects).any()) else losses
    return -(losses - rest.median()).abs()


@register_method
@dataclass(kw_only=True)
class FilterRandom(SketchedMethod):
    """Candidate: the default's suspects excluded, a uniform draw among the other rows."""

    name: ClassVar[str] = "bound_filter_random"
    choose = _order_after_filter(_random_key)


@register_method
@dataclass(kw_only=True)
class FilterMiddle(SketchedMethod):
    """Candidate: the default's suspects excluded, the rows nearest the others' median loss."""

    name: ClassVar[str] = "bound_filter_middle"
    choose = _order_after_filter(_middle_key)


# --- third round (issue 22): a reference from outside the batch. The base model's loss (the PEFT
# adapters disabled, one no-grad forward over the batch): a wrong answer is unlikely under the base
# too, and no batch, however noisy, moves the base. Rows in the high component of the reference
# losses are suspects besides the default's.


@register_method
@dataclass(kw_only=True)
class ReferenceGap(SketchedMethod):
    """Candidate: the default's suspects, or the high component of the base model's losses
    (``log_reference``: of their logarithms), all of it (``rule="or"``), its rows less aligned with
    the small-loss half's anchor than that half's median row (``"disagree"``), or its rows in the
    upper half by loss (``"upper"``)."""

    name: ClassVar[str] = "bound_reference"
    log_reference: bool = False
    rule: str = "or"
    gate: float | None = None  # the reference's suspects only where a source's running high share reaches it
    decay: float = 0.9
    # (the gate on the batch's pooled share, round three's choice, is the library's
    # gate_statistic="implausible": noise_bound.py's bound_reference_pooled_* arms)

    def sketches(self, context):
        from coreset_optim.methods.reference import reference_losses

        self._reference = reference_losses(context.batch_pass)
        self._codes, self._names = context.layout.codes, context.layout.names
        return super().sketches(context)

    def choose(self, x, k, context):
        from coreset_optim.methods.anchored import anchored_suspects, high_loss_component

        losses = context.group_losses().to(x.device)
        ref = self._reference.to(x.device).index_select(0, context.rows.to(x.device)).double()
        if self.log_reference:
            ref = ref.clamp_min(1e-12).log()
        from coreset_optim.methods.anchored import lower_median, small_half_agreement

        flagged = high_loss_component(ref)
        if self.rule == "disagree":
            small, cosine = small_half_agreement(x, losses)
            flagged &= cosine < lower_median(cosine, small)
        elif self.rule == "none":
            flagged &= False
        elif self.rule == "upper":
            flagged &= losses > losses.median()
        if self.gate is not None:
            share = float(high_loss_component(ref).double().mean())
            if not hasattr(self, "_share"):
                self._share = {}
            name = self._names[int(self._codes[int(context.rows[0])])]
            before = self._share.get(name)
            self._share[name] = share if before is None else self.decay * before + (1 - self.decay) * share
            if self._share[name] < self.gate:
                flagged = torch.zeros_like(flagged)
        return hardest_first(losses, k, anchored_suspects(x, losses) | flagged), None
