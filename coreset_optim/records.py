"""What one selection returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch


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

    def __post_init__(self) -> None:
        if self.local_indices is None:
            self.local_indices, self.local_weights = self.indices, self.weights
        if self.rank_sizes is None:
            self.rank_sizes = [int(self.losses.shape[0])]

    @property
    def batch_loss(self) -> torch.Tensor:
        """The large batch's mean per-example loss over its finite losses (what plain training on
        the batch would report; from the selection pass, in eval mode), a 0-d tensor (no host sync)."""
        finite = torch.isfinite(self.losses)
        return torch.where(finite, self.losses, 0.0).sum() / finite.sum()

    def __len__(self) -> int:
        return int(self.indices.numel())
