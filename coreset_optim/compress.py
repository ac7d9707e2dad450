"""Compressing long per-example sketches to a few informative coordinates (CoLM's choice)."""

from __future__ import annotations

import torch


def top_coordinates(sketches: torch.Tensor, dim: int) -> torch.Tensor:
    """Indices of the ``dim`` columns with the largest mean absolute value (all if fewer)."""
    if sketches.shape[1] <= dim:
        return torch.arange(sketches.shape[1], device=sketches.device)
    return sketches.abs().mean(0).topk(dim, sorted=False).indices.sort().values


def compress_per_source(
    sketches: torch.Tensor, valid: torch.Tensor, source_codes: torch.Tensor, num_sources: int, dim: int
) -> torch.Tensor:
    """``Tensor[B, min(dim, D)]``: each source's valid rows on that source's top coordinates.

    Coordinates are chosen per source from its valid examples, so two sources' rows may hold
    different coordinates (selection never compares across sources). Invalid rows are NaN.
    """
    out_dim = min(dim, sketches.shape[1])
    out = torch.full((sketches.shape[0], out_dim), float("nan"), dtype=sketches.dtype, device=sketches.device)
    for code in range(num_sources):
        rows = torch.nonzero(valid & (source_codes == code)).flatten()
        if rows.numel() == 0:
            continue
        block = sketches.index_select(0, rows)
        cols = top_coordinates(block, out_dim)
        out.index_copy_(0, rows, block.index_select(1, cols))
    return out
