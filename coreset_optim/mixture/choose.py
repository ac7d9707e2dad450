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
from ..records import Selection
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
    context: dict[str, Any] | None = None,
) -> Selection:
    """Select ``budget`` of the valid rows of ``sketches[B, D]`` (normalized), source by source,
    with ``method.choose`` (:class:`~coreset_optim.methods.base.SelectionMethod`) on each source's rows
    compressed to ``method.compressed_width(sketches)`` columns. ``context``: what ``choose``
    reads besides the rows (``losses``, ``generator``, ``total``); ``rows`` and ``watch`` are added.

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
        local, w = method.choose(
            compressed.index_select(0, rows), alloc[code], rows=rows, watch=watch, **(context or {})
        )
        picked.append(rows.index_select(0, local))
        weights.append(w.float() * scale)
    indices = torch.cat(picked)
    weights_t = torch.cat(weights)
    num_valid = sum(counts)
    if any(a == 0 < c for a, c in zip(alloc, counts)):
        # Some source got no example (budget < number of sources): spread its mass over the rest.
        weights_t = weights_t * (num_valid / weights_t.sum())
    order = indices.argsort()
    watch.lap("weights")
    return Selection(indices[order].to(device), weights_t[order].to(device), compressed.to(device), alloc, timings)


def take_every_valid(sketches: torch.Tensor, valid: torch.Tensor, counts: Sequence[int]) -> Selection:
    """The selection when the budget covers the batch: every valid row, weight 1 (``counts``: valid
    rows per source). Nothing to compare, so no sketch is needed and no stage is timed."""
    indices = torch.nonzero(valid).flatten()
    return Selection(indices, torch.ones(indices.numel(), device=valid.device), sketches, list(counts))
