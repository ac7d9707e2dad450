"""Choosing the weighted subset from normalized sketches: the pure part of ``select()``.

compress (per source) -> the method's choose step (e.g. similarity -> greedy facility location ->
cluster weights) -> weights scaled to the mixture, with the
budget shared among sources by :mod:`coreset_optim.mixture.budget`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from .budget import allocate_budget, tempered_scores, tempered_split
from ..sketch.compress import compress_per_source, rows_per_source
from ..records import ChooseContext, Selection
from ..timing import Stopwatch

if TYPE_CHECKING:
    from ..methods.base import SelectionMethod


def select_from_sketches(
    sketches: torch.Tensor,
    valid: torch.Tensor,
    source_codes: torch.Tensor,
    num_sources: int,
    budget: int,
    keep: Sequence[bool],
    method: SelectionMethod,
    *,
    temperature: float = 1.0,
    losses: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    reference_losses: torch.Tensor | None = None,
) -> Selection:
    """Select ``budget`` of the valid rows of ``sketches[B, D]`` (normalized), source by source,
    with ``method.choose`` (:class:`~coreset_optim.methods.base.SelectionMethod`) on each source's rows
    compressed to ``method.compressed_width(sketches)`` columns; ``losses`` (None: zeros) and
    ``generator`` (None: torch's global one) and ``reference_losses`` (None: no reference) reach
    it in its :class:`~coreset_optim.records.ChooseContext`. A group whose budget covers it
    is taken whole; a method asked for ``k`` of ``n`` rows (``1 <= k < n``) returns ``k`` indices
    and their weights, or None for ``n / k`` each.

    ``temperature`` != 1 re-weights the mixture: source s gets a budget and a total weight in
    proportion to ``n_s ** (1 / temperature)`` (``inf``: every source present counts equally),
    instead of ``n_s``; the weights still sum to the number of valid examples.
    """
    device = sketches.device
    timings: dict[str, float] = {}
    watch = Stopwatch(timings, device)
    sketch_dim = method.compressed_width(sketches)
    if method.runs_on_host:  # one copy to the host, not one per source
        sketches = sketches.cpu()
    valid = valid.to(sketches.device)
    source_codes = source_codes.to(sketches.device)
    if losses is None:
        losses = torch.zeros(valid.shape[0], device=sketches.device)
    counts, source_rows = rows_per_source(valid, source_codes, num_sources)
    compressed = compress_per_source(sketches, valid, source_codes, num_sources, sketch_dim, source_rows)
    watch.lap("compress")
    if temperature == 1.0:
        alloc = allocate_budget(counts, budget, keep)
        totals = [float(c) for c in counts]
    else:
        alloc = tempered_split(counts, budget, temperature)
        scores = tempered_scores(counts, temperature)
        totals = [sum(counts) * x / sum(scores) for x in scores]
    picked, weights = [], []
    for code in range(num_sources):
        if alloc[code] == 0:
            continue
        rows = source_rows[code]
        scale = totals[code] / counts[code]  # 1 unless temperature != 1
        if alloc[code] >= counts[code]:
            picked.append(rows)
            weights.append(torch.full((rows.numel(),), scale, device=rows.device))
            continue
        k, n = alloc[code], rows.numel()
        context = ChooseContext(rows, losses, generator, sum(counts), watch, reference_losses)
        local, w = checked_choice(method, method.choose(compressed.index_select(0, rows), k, context), k)
        picked.append(rows.index_select(0, local))
        weights.append((torch.full((k,), n / k, device=rows.device) if w is None else w.float()) * scale)
    indices = torch.cat(picked)
    weights_t = torch.cat(weights)
    num_valid = sum(counts)
    if any(a == 0 < c for a, c in zip(alloc, counts)):
        # Some source got no example (budget < number of sources): spread its mass over the rest.
        weights_t = weights_t * (num_valid / weights_t.sum())
    order = indices.argsort()
    watch.lap("weights")
    return Selection(indices[order].to(device), weights_t[order].to(device), compressed.to(device), alloc, timings)


def checked_choice(method: SelectionMethod, choice: Any, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``method.choose``'s answer, checked to be ``(indices[k], weights[k] or None)`` (shapes only:
    no device sync)."""
    name = type(method).__name__
    if not (isinstance(choice, tuple) and len(choice) == 2 and isinstance(choice[0], torch.Tensor)):
        raise TypeError(f"{name}.choose must return (indices, weights or None), got {type(choice).__name__}")
    indices, weights = choice
    if indices.shape != (k,) or (weights is not None and weights.shape != (k,)):
        got = tuple(indices.shape), None if weights is None else tuple(weights.shape)
        raise ValueError(f"{name}.choose was asked for k={k} rows and returned shapes {got}; return k of each")
    return indices, weights


def take_every_valid(sketches: torch.Tensor, valid: torch.Tensor, counts: Sequence[int]) -> Selection:
    """The selection when the budget covers the batch: every valid row, weight 1 (``counts``: valid
    rows per source). Nothing to compare, so no sketch is needed and no stage is timed."""
    indices = torch.nonzero(valid).flatten()
    return Selection(indices, torch.ones(indices.numel(), device=valid.device), sketches, list(counts))
