"""What the noise-aware selectors share: flag suspects source by source, then take the hardest of
the rest (``consensus_loss``, ``trimmed_loss``)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..sketch.compress import rows_per_source


def hardest_first(losses: torch.Tensor, k: int, suspect: torch.Tensor) -> torch.Tensor:
    """The ``k`` highest losses among the non-suspects (ties: lowest index), then the suspects by
    ascending loss when the others run out."""
    key = losses.double()
    key = torch.where(suspect, -key - (key.abs().max() + 1.0) * 4, key)  # every suspect below every other
    return torch.sort(key, descending=True, stable=True).indices[:k]


def flag_per_source(
    values: torch.Tensor,
    flag: Callable[[torch.Tensor], torch.Tensor],
    valid: torch.Tensor,
    source_codes: torch.Tensor,
    num_sources: int,
) -> torch.Tensor:
    """``BoolTensor[B]``: ``flag`` applied to each source's valid rows of ``values`` (losses or
    sketches), as the selector applies it within a source; False for invalid rows."""
    out = torch.zeros(values.shape[0], dtype=torch.bool, device=values.device)
    _, rows = rows_per_source(valid.to(values.device), source_codes.to(values.device), num_sources)
    for source_rows in rows:
        out[source_rows] = flag(values.index_select(0, source_rows))
    return out
