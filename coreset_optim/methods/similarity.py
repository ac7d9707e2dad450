"""Pairwise similarities between sketches, all non-negative (facility location needs that)."""

from __future__ import annotations

import torch

SIMILARITIES = ("l1", "cosine", "l2")


def pairwise_similarity(x: torch.Tensor, kind: str = "l1") -> torch.Tensor:
    """``Tensor[n, n]`` similarity of the rows of ``x[n, d]``.

    ``"l1"``/``"l2"``: ``max(D) - D`` for the L1/L2 distance matrix D (CoLM uses L1).
    ``"cosine"``: ``1 + cos``, in [0, 2].
    """
    if kind in ("l1", "l2"):
        dist = torch.cdist(x.unsqueeze(0), x.unsqueeze(0), p=1.0 if kind == "l1" else 2.0).squeeze(0)
        return dist.max() - dist
    if kind == "cosine":
        unit = x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        return (unit @ unit.T).clamp(-1.0, 1.0) + 1.0
    raise ValueError(f"similarity must be one of {SIMILARITIES}, got {kind!r}")
