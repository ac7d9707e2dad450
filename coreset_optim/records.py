"""The records ``select()``'s stages pass each other, and the one it returns: the floor of the
package that methods, the mixture, the sketch pass and the distributed layout all import (it
imports nothing of theirs).

``Sketches`` (one row per example) -> ``Selection`` (indices, weights) -> ``Coreset`` (what the
user gets). ``ChooseContext`` is what a method's choose step reads besides the rows;
``Agreement`` is what ranks share while streaming; ``Layout`` is what ``select()`` asks of the
batch's layout over the ranks (:class:`~coreset_optim.distributed.LocalBatch` in one process,
:class:`~coreset_optim.distributed.Shards` under torch.distributed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import torch

if TYPE_CHECKING:
    from .timing import Stopwatch


@dataclass
class Sketches:
    """What flows between ``select()``'s stages: one row per example of a batch.

    ``rows``: Tensor[n, D] (D = 0 when the chooser needs no gradient, e.g. every example is
    selected); ``losses``: Tensor[n]; ``valid``: BoolTensor[n], a finite loss and a finite row.
    The sketch stage gives raw gradients, the normalize stage Adam-normalized ones, the gather
    stage the global batch's (compressed across ranks under ``torch.distributed``).
    """

    rows: torch.Tensor
    losses: torch.Tensor
    valid: torch.Tensor
    # Zeroth-order sketches, normalized whole: which rows were valid before (a row Adam's scaling
    # made non-finite is reported as such). None: normalized while streaming, nothing to tell.
    valid_before_normalization: torch.Tensor | None = None
    # Tensor[n]: each example's loss under the method's reference (the base model, adapters off:
    # methods/reference.py), or None: no reference computed.
    reference_losses: torch.Tensor | None = None


@dataclass
class Selection:
    """The chosen rows of the (global) batch and their weights, before the backward."""

    indices: torch.Tensor  # LongTensor[k], ascending
    weights: torch.Tensor  # Tensor[k], sums to the number of valid examples
    compressed: torch.Tensor  # Tensor[B, d]
    selected_per_source: list[int]
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ChooseContext:
    """What :meth:`~coreset_optim.SelectionMethod.choose` reads besides one group's rows ``x[n, d]``."""

    rows: torch.Tensor  # LongTensor[n]: the group's rows, as indices into the batch
    losses: torch.Tensor  # Tensor[B]: every example's loss
    generator: torch.Generator | None  # the optimizer's generator (saved in checkpoints)
    total: int  # N: the valid examples of the whole batch
    watch: Stopwatch  # watch.lap("stage") times a sub-stage of the choice
    reference_losses: torch.Tensor | None = None  # Tensor[B] under the reference, or None (Sketches')

    def group_losses(self) -> torch.Tensor:
        """The group's losses, ``Tensor[n]``, on the rows' device."""
        return self.losses.to(self.rows.device).index_select(0, self.rows)

    def group_reference_losses(self) -> torch.Tensor | None:
        """The group's losses under the reference, ``Tensor[n]`` on the rows' device, or None."""
        if self.reference_losses is None:
            return None
        return self.reference_losses.to(self.rows.device).index_select(0, self.rows)


@dataclass
class Agreement:
    """What ranks selecting from one global batch must share while they stream (None: one process).

    ``all_reduce(t)`` sums ``t`` over the ranks in place; ``any_rank(flag)`` is True when the flag is
    set on some rank; ``plan_examples`` is the largest number of examples on any rank, so that all
    ranks cut the layers into the same blocks (and so make the same collectives).
    """

    all_reduce: Callable[[torch.Tensor], None]
    any_rank: Callable[[bool], bool]
    plan_examples: int


class SourceCount(NamedTuple):
    """Examples of one source in the large batch, and how many of them were selected."""

    in_batch: int
    selected: int
    kept_whole: bool = False


@dataclass
class Coreset:
    """A weighted subset of a large batch.

    ``indices`` point into the batch (ascending); ``weights`` (one per index) sum to ``num_valid``;
    the step applies ``sum_j weights[j] * grad(loss_j) / num_valid`` (for gradient matching and
    facility location an estimate of the batch's mean gradient; for ``"loss"`` and ``"target"`` a
    deliberately different one: the hardest, or the most useful, examples).
    ``sketches`` is every example's compressed, normalized sketch as used for selection (NaN rows
    for invalid examples; zero columns when no sketch pass ran). ``loss`` is the coreset's
    weighted loss ``sum_j weights[j] * loss_j / num_valid`` (detached: what was backpropagated;
    an estimate of the batch's mean loss only when the selector estimates its gradient; the batch's
    own mean loss is :attr:`batch_loss`). ``timings`` are seconds per stage.

    ``losses`` are every example's loss from the pass over the batch (eval mode, no grad). A method
    that reads no losses (``"random"``) gets no pass: ``losses_computed`` is False, ``losses`` is
    NaN (never computed), every example counts as valid (``num_invalid == 0``), ``batch_loss`` is
    the coreset's weighted loss, and ``timings`` has no ``"sketch"`` stage.

    Under ``torch.distributed`` (see ``docs/distributed.md``) the batch is the *global* batch (rank
    0's examples, then rank 1's, ...): ``indices``, ``weights``, ``sketches``, ``losses``,
    ``source_counts``, ``num_valid``, ``num_invalid`` and ``loss`` describe it and are identical on
    every rank, while ``batch``, ``local_indices`` (into this rank's own batch) and
    ``local_weights`` are this rank's share. ``rank_sizes`` are the examples each rank held. In
    one process the local fields equal the global ones and ``rank_sizes == [len(batch)]``.
    """

    indices: torch.Tensor
    weights: torch.Tensor
    batch: Any
    sketches: torch.Tensor
    losses: torch.Tensor
    source_counts: dict[Any, SourceCount]
    num_valid: int
    num_invalid: int
    loss: torch.Tensor | None = None
    timings: dict[str, float] = field(default_factory=dict)
    local_indices: torch.Tensor | None = None
    local_weights: torch.Tensor | None = None
    rank_sizes: list[int] | None = None
    # BoolTensor[B]: examples the selector judged likely mislabeled ("trimmed_loss": their loss
    # sits in a separate high component of their source's losses); None for selectors that do not judge.
    suspects: torch.Tensor | None = None
    # LongTensor[B] (host): each example's source, as the position of its name in source_counts
    source_codes: torch.Tensor | None = None
    # False when no pass over the batch ran (a method that reads no losses): ``losses`` is NaN
    losses_computed: bool = True

    def __post_init__(self) -> None:
        if self.local_indices is None:
            self.local_indices, self.local_weights = self.indices, self.weights
        if self.rank_sizes is None:
            self.rank_sizes = [int(self.losses.shape[0])]

    @property
    def batch_loss(self) -> torch.Tensor:
        """The large batch's mean per-example loss over its finite losses (what plain training on
        the batch would report; from the selection pass, in eval mode), a 0-d tensor (no host sync).

        When no pass ran (``losses_computed`` False) no loss of the batch was computed: the
        coreset's weighted loss :attr:`loss` stands in (from its own forward, in train mode; for
        ``"random"``'s weights an unbiased estimate of the batch's mean loss), NaN without one."""
        if not self.losses_computed:
            return torch.tensor(float("nan")) if self.loss is None else self.loss.detach()
        finite = torch.isfinite(self.losses)
        return torch.where(finite, self.losses, 0.0).sum() / finite.sum()

    def suspect_shares(self) -> dict[Any, float] | None:
        """Per source, the share of its examples in the batch flagged as suspect: the method's
        estimate of how many look mislabeled (None when the method does not judge, or when no sketch
        ran because every example was taken). Reads the flags on the host (one device sync)."""
        if self.suspects is None or self.source_codes is None:
            return None
        flagged = torch.bincount(self.source_codes[self.suspects.cpu()], minlength=len(self.source_counts))
        return {
            name: (flagged[i].item() / count.in_batch if count.in_batch else 0.0)
            for i, (name, count) in enumerate(self.source_counts.items())
        }

    def __len__(self) -> int:
        return int(self.indices.numel())


class Layout(Protocol):
    """How the batch ``select()`` chooses from is laid out over the ranks, and the collectives it
    uses: ``gather`` (this rank's sketches -> the global batch's), ``on_first_rank`` (run the
    chooser once, share its result) and ``backward`` (each rank its own share)."""

    sizes: list[int]  # examples per rank
    names: list[Any]  # the global batch's source names
    codes: torch.Tensor  # LongTensor[total]: source code of every example of the global batch
    local_codes: torch.Tensor  # LongTensor[local size]: this rank's examples, global codes

    @property
    def total(self) -> int: ...

    def gather(self, sketches: Sketches, dim: int, timings: dict[str, float]) -> Sketches: ...

    def agreement(self) -> Agreement | None: ...

    def any_rank(self, flag: bool) -> bool: ...

    def sum_over_ranks(
        self, summed: torch.Tensor, count: float, bad: torch.Tensor
    ) -> tuple[torch.Tensor, float, torch.Tensor]: ...

    def on_first_rank(self, select: Callable[..., Selection]) -> Callable[..., Selection]: ...

    def backward(
        self,
        batch: Any,
        indices: torch.Tensor,
        weights: torch.Tensor,
        loss_fn: Callable[[Any], torch.Tensor],
        denominator: float,
        micro_batch_size: int | None,
        model: torch.nn.Module,
        valid: torch.Tensor,
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]: ...
