"""Choosing the weighted subset from normalized sketches: the pure part of ``select()``.

compress (per source) -> similarity -> greedy facility location -> cluster weights, with the
budget shared among sources by :mod:`coreset_optim.budget`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .baselines import loss_coreset, random_coreset
from .consensus import consensus_loss_coreset
from .budget import allocate_budget, tempered_scores, tempered_split
from .compress import compress_per_source, rows_per_source
from .facility_location import cluster_weights, greedy_facility_location
from .gradient_matching import gradient_matching_coreset
from .similarity import pairwise_similarity
from .target import target_coreset
from .trimmed_loss import trimmed_loss_coreset


@dataclass
class Selection:
    indices: torch.Tensor  # LongTensor[k], ascending
    weights: torch.Tensor  # Tensor[k], sums to the number of valid examples
    compressed: torch.Tensor  # Tensor[B, d]
    selected_per_source: list[int]
    timings: dict[str, float] = field(default_factory=dict)


class _Stopwatch:
    """Accumulates seconds per stage; synchronizes CUDA at stage boundaries only."""

    def __init__(self, timings: dict[str, float], device: torch.device):
        self.timings, self.cuda = timings, device.type == "cuda"
        self.last = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, stage: str) -> None:
        now = self._now()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.last = now


def facility_location_coreset(
    x: torch.Tensor, k: int, *, similarity: str, watch: _Stopwatch, **_: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` rows of ``x`` by greedy facility location, weighted by cluster size."""
    sim = pairwise_similarity(x, similarity)
    watch.lap("similarity")
    chosen = greedy_facility_location(sim, k)
    watch.lap("greedy")
    weights = cluster_weights(sim, chosen)
    watch.lap("weights")
    return chosen, weights


# A selector picks ``k`` rows of one source's compressed sketches ``x[n, d]`` and weights them so
# the weights sum to ``n``. Keyword context: similarity, watch (stage timer), and whatever
# select_from_sketches is given in ``extra`` (e.g. per-example losses, a generator).
SELECTORS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "facility_location": facility_location_coreset,
    "gradient_matching": gradient_matching_coreset,
    "random": random_coreset,
    "loss": loss_coreset,
    "trimmed_loss": trimmed_loss_coreset,
    "consensus_loss": consensus_loss_coreset,
    "target": target_coreset,
}


def select_from_sketches(
    sketches: torch.Tensor,
    valid: torch.Tensor,
    source_codes: torch.Tensor,
    num_sources: int,
    budget: int,
    keep: Sequence[bool],
    sketch_dim: int,
    similarity: str,
    method: str = "facility_location",
    extra: dict | None = None,
    temperature: float = 1.0,
) -> Selection:
    """Select ``budget`` of the valid rows of ``sketches[B, D]`` (normalized), source by source.

    ``temperature`` != 1 re-weights the mixture: source s gets a budget and a total weight in
    proportion to ``n_s ** (1 / temperature)`` (``inf``: every source present counts equally),
    instead of ``n_s``; the weights still sum to the number of valid examples.
    """
    if method not in SELECTORS:
        raise ValueError(f"selection must be one of {tuple(SELECTORS)}, got {method!r}")
    selector = SELECTORS[method]
    device = sketches.device
    timings: dict[str, float] = {}
    watch = _Stopwatch(timings, device)
    if getattr(selector, "runs_on_host", False):  # one copy to the host, not one per source
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
        local, w = selector(
            compressed.index_select(0, rows),
            alloc[code],
            similarity=similarity,
            watch=watch,
            rows=rows,
            **(extra or {}),
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
