"""Highest-loss selection that does not chase mislabeled examples (``selection="trimmed_loss"``).

Highest-loss selection (``"loss"``) trains on each source's hardest examples, which on clean data
are the informative ones; with corrupted answers they are the corrupted ones (RHO-LOSS and
Selective Backprop share this flaw). A mislabeled answer stays unlearnable, so its loss sits in a
separate, high cluster of its source's losses; a hard clean example's loss is part of the spread.
In the spirit of the small-loss criterion (DivideMix, Co-teaching), each source's losses are cut
at their widest gap when it is wide against the spread below it (:func:`high_loss_cluster`); the
examples above are *suspects*. The selector takes the hardest non-suspect examples, and suspects
only if the clean ones run out (lowest loss first).

The split is a fixed number of tensor operations (a sort and cumulative sums; no host read of the
losses), run on the device inside the chooser's per-source loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..records import ChooseContext
from .base import SelectionMethod
from .suspects import flag_per_source, hardest_first

GAP_RATIO = 3.0  # the gap must exceed this many standard deviations of the losses below it
MIN_EXAMPLES = 6  # fewer losses than this: no split (every example is clean)


def high_loss_cluster(losses: torch.Tensor, ratio: float = GAP_RATIO) -> torch.Tensor:
    """``BoolTensor[n]``: the losses above the widest gap of the sorted losses, when that gap
    leaves at most half of them above it and exceeds ``ratio`` standard deviations of the losses
    below it; all False otherwise (and for fewer than ``MIN_EXAMPLES`` finite losses).

    An unlearnable (corrupted) answer keeps a loss far above its source's learnable ones: a cluster
    cut off by a gap. Hard clean examples form a tail without such a gap (a smooth or uniform
    spread gives gaps of a fraction of a standard deviation). Non-finite losses are never members.
    """
    n = losses.numel()
    finite = torch.isfinite(losses)
    if n < MIN_EXAMPLES:
        return torch.zeros(n, dtype=torch.bool, device=losses.device)
    x = torch.where(finite, losses, float("inf")).double()
    s = torch.sort(x).values  # non-finite last; they count as "above" but never as members
    m = finite.sum()
    below = torch.arange(1, n, device=x.device)  # cut c: s[:c] below, s[c:] above
    prefix = torch.cumsum(torch.where(torch.isfinite(s), s, 0.0), 0)
    prefix_sq = torch.cumsum(torch.where(torch.isfinite(s), s * s, 0.0), 0)
    mean = prefix[:-1] / below
    std = (prefix_sq[:-1] / below - mean * mean).clamp(min=0).sqrt()
    gap = s[1:] - s[:-1]
    # Allowed cuts: at most half of the finite losses above, at least MIN_EXAMPLES // 2 below.
    ok = (2 * (m - below) <= m) & (below >= MIN_EXAMPLES // 2) & (below < m) & torch.isfinite(gap)
    score = torch.where(ok, gap / (std + 1e-12), -1.0)
    best = score.argmax()
    threshold = torch.where(score[best] >= ratio, s[best + 1], float("inf"))
    return finite & (x >= threshold)


def suspect_examples(
    sketches: torch.Tensor, losses: torch.Tensor, valid: torch.Tensor, source_codes: torch.Tensor, num_sources: int
) -> torch.Tensor:
    """``BoolTensor[B]``: the examples their source's split puts in its high-loss component (the
    same split the selector makes), for :attr:`~coreset_optim.Coreset.suspects` (``sketches``
    unused: the split reads losses only)."""
    return flag_per_source(losses, high_loss_cluster, valid, source_codes, num_sources)


def trimmed_loss_coreset(losses: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` hardest examples of one source's clean component (``losses[n]``: the source's),
    then its suspects, lowest loss first."""
    return hardest_first(losses, k, high_loss_cluster(losses))


@dataclass(kw_only=True)
class TrimmedLoss(SelectionMethod):
    """``selection="trimmed_loss"``: the hardest examples below each source's high-loss cluster
    (losses only: one no-grad pass); the cluster's examples are the suspects."""

    name: ClassVar[str] = "trimmed_loss"

    def choose(self, x: torch.Tensor, k: int, context: ChooseContext) -> tuple[torch.Tensor, None]:
        return trimmed_loss_coreset(context.group_losses(), k), None

    def suspects(self, compressed, losses, valid, codes, num_sources, reference_losses=None) -> torch.Tensor:
        return suspect_examples(compressed, losses, valid, codes, num_sources)
