"""Compressing normalized sketches by a seeded CountSketch instead of keeping top coordinates.

Coordinate j goes to bucket h(j) with sign s(j); the projection of x is
y[b] = sum_{j: h(j) = b} s(j) x[j]. Inner products (hence distances and norms) are preserved in
expectation, with variance falling as 1 / dim, and every coordinate contributes (top-k keeps only
the largest ones). ``h`` and ``s`` are a function of the seed alone, so the same seed (saved in
the optimizer's state) gives the same projection after a checkpoint reload.
"""

from __future__ import annotations

import torch


def countsketch_hash(numel: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets ``h[numel]`` in ``[0, dim)`` and signs ``s[numel]`` in {-1, +1} for ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    buckets = torch.randint(0, dim, (numel,), generator=gen)
    signs = torch.randint(0, 2, (numel,), generator=gen).float().mul_(2).sub_(1)
    return buckets, signs


def countsketch(x: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """``Tensor[n, dim]``: the CountSketch of the rows of ``x[n, D]`` (rows with NaN stay NaN)."""
    buckets, signs = countsketch_hash(x.shape[1], dim, seed)
    buckets, signs = buckets.to(x.device), signs.to(x.device, x.dtype)
    out = x.new_zeros(x.shape[0], dim)
    out.index_add_(1, buckets, x * signs)
    return out
