"""Baseline samplers: ``k`` rows of a large batch with per-source budgets, drawn at random within a
source (trained on with an unweighted mean, no coreset weights)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from coreset_optim.mixture.budget import tempered_split


def draw_per_source(source: torch.Tensor, alloc: Sequence[int], g: torch.Generator) -> torch.Tensor:
    """``alloc[s]`` random rows of each source ``s`` of the batch (``source``: its codes), sorted."""
    picked = []
    for s, a in enumerate(alloc):
        if a:
            rows = torch.nonzero(source == s).flatten()
            picked.append(rows[torch.randperm(rows.numel(), generator=g)[:a]])
    return torch.cat(picked).sort().values


def tempered_indices(source: torch.Tensor, k: int, temperature: float, g: torch.Generator) -> torch.Tensor:
    """``k`` rows of a batch, per-source budgets from the library's :func:`tempered_split`."""
    num = int(source.max()) + 1
    counts = torch.bincount(source, minlength=num).tolist()
    return draw_per_source(source, tempered_split(counts, k, temperature), g)


def fixed_split(counts: Sequence[int], names: Sequence[str], k: int, weights: dict, balanced: bool) -> list[int]:
    """``k`` split among sources in proportion to ``count_s * weight_s`` (``balanced``: ``weight_s``
    alone, among the sources present): floors of the shares of what is left, again until none
    floors above 0, then one at a time to the largest share; capped at each source's count (the
    rest goes to the other weighted sources, then to any).

    Not :func:`tempered_split`: that one takes scores from counts and a temperature, and rounds
    the remainder of one split once; the committed fixed-reweighting results were drawn with
    this rule."""
    w = [float(weights.get(n, 0.0)) if c else 0.0 for n, c in zip(names, counts)]
    score = [wi if balanced else wi * c for wi, c in zip(w, counts)]
    alloc = [0] * len(names)
    left = k
    for _ in range(2):  # weighted sources first, then every source for what is left
        while left > 0:
            open_ = [s for s in range(len(names)) if alloc[s] < counts[s] and score[s] > 0]
            if not open_:
                break
            total = sum(score[s] for s in open_)
            raw = {s: left * score[s] / total for s in open_}
            give = {s: min(int(raw[s]), counts[s] - alloc[s]) for s in open_}
            if sum(give.values()) == 0:  # hand out one by one, largest remainder first
                s = max(open_, key=lambda s: (raw[s] - int(raw[s]), score[s], -s))
                give = {s: 1}
            for s, n in give.items():
                alloc[s] += n
                left -= n
        score = [1.0 if c else 0.0 for c in counts]
    return alloc


def fixed_indices(
    source: torch.Tensor, names: list[str], k: int, weights: dict, balanced: bool, g: torch.Generator
) -> torch.Tensor:
    """``k`` rows of a batch with the budgets of :func:`fixed_split`, random within a source."""
    counts = torch.bincount(source, minlength=len(names)).tolist()
    return draw_per_source(source, fixed_split(counts, names, k, weights, balanced), g)
