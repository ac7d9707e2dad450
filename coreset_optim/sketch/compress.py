"""Compressing long per-example sketches to a few informative coordinates (CoLM's choice)."""

from __future__ import annotations

import torch


def top_coordinates(sketches: torch.Tensor, dim: int) -> torch.Tensor:
    """Indices of the ``dim`` columns with the largest mean absolute value (all if fewer)."""
    if sketches.shape[1] <= dim:
        return torch.arange(sketches.shape[1], device=sketches.device)
    return sketches.abs().mean(0).topk(dim, sorted=False).indices.sort().values


def rows_per_source(
    valid: torch.Tensor, source_codes: torch.Tensor, num_sources: int
) -> tuple[list[int], list[torch.Tensor]]:
    """Each source's valid rows (ascending) and their counts, with one host read for all sources
    (a stable sort and one ``tolist``, not a ``nonzero`` per source)."""
    key = torch.where(valid, source_codes.to(valid.device), num_sources)
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_sources + 1).tolist()
    return counts[:num_sources], list(torch.split(order, counts))[:num_sources]


def compress_per_source(
    sketches: torch.Tensor,
    valid: torch.Tensor,
    source_codes: torch.Tensor,
    num_sources: int,
    dim: int,
    rows: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``Tensor[B, min(dim, D)]``: each source's valid rows on that source's top coordinates.

    Coordinates are chosen per source from its valid examples, so two sources' rows may hold
    different coordinates (selection never compares across sources). Invalid rows are NaN.
    ``rows``: :func:`rows_per_source`'s rows, when the caller has them.
    """
    nan = torch.full((), float("nan"), dtype=sketches.dtype, device=sketches.device)
    if sketches.shape[1] <= dim:  # already narrow (streamed sketches): every column is kept
        return torch.where(valid.to(sketches.device)[:, None], sketches, nan)
    if rows is None:
        rows = rows_per_source(valid, source_codes, num_sources)[1]
    out = torch.full((sketches.shape[0], dim), float("nan"), dtype=sketches.dtype, device=sketches.device)
    for source_rows in rows:
        if source_rows.numel() == 0:
            continue
        block = sketches.index_select(0, source_rows)
        cols = top_coordinates(block, dim)
        out.index_copy_(0, source_rows, block.index_select(1, cols))
    return out


class StreamingTopCoordinates:
    """:func:`compress_per_source` over a sketch that arrives a block of columns at a time.

    A column's score (sum of |value| over a source's valid rows, the mean times a constant) depends
    on that column alone, so each source's top ``dim`` columns overall are the top ``dim`` of
    (its best so far, this block's best): a running merge that holds ``B x dim`` values plus one
    block, whatever the sketch's width. Every row belongs to one source, so row i's kept values
    sit in one ``[B, dim]`` tensor, on its source's columns. Ties between equal scores may be
    broken differently from :func:`top_coordinates` (torch's topk on the whole row); the output
    columns are in ascending coordinate order, as there.

    ``all_reduce``: sums a tensor over the ranks in place (``None`` alone), so that ranks holding
    different rows of one global batch keep the same columns.
    """

    def __init__(self, valid: torch.Tensor, source_codes: torch.Tensor, num_sources: int, dim: int, all_reduce=None):
        self.dim, self.num_sources, self.all_reduce = dim, num_sources, all_reduce
        self.valid = valid
        self.codes = source_codes.to(valid.device)
        self.scores: torch.Tensor | None = None  # [S, <= dim]
        self.coords: torch.Tensor | None = None  # [S, <= dim], long
        self.values: torch.Tensor | None = None  # [B, <= dim]: row i on its source's coords
        self.width = 0
        self.onehot: torch.Tensor | None = None  # [S, B]: 1 where a valid row belongs to the source
        self.invalid_rows = torch.empty(0, dtype=torch.long)
        self.buffer: torch.Tensor | None = None  # reused for |block|: no fresh pages per block

    def add(self, block: torch.Tensor, start: int, divisor: torch.Tensor | None = None) -> torch.Tensor:
        """Fold in columns ``start .. start+m-1`` of the sketch: ``block[B, m] / divisor[m]``
        (``divisor``: a per-column normalization applied only to the scores and the kept values;
        ``None``: the block is the sketch).

        Returns which rows of the block are all finite (a non-finite row adds nothing to the
        scores of this block; one that was taken for valid has added to earlier blocks' scores,
        so the caller redoes the pass without it)."""
        m = block.shape[1]
        self.width = max(self.width, start + m)
        device = block.device
        if self.onehot is None or self.onehot.device != device:
            valid, codes = self.valid.to(device), self.codes.to(device)
            self.onehot = torch.zeros(self.num_sources, block.shape[0], device=device)
            self.onehot[codes[valid], torch.nonzero(valid).flatten()] = 1.0
            self.codes, self.invalid_rows = codes, torch.nonzero(~valid).flatten()
        if self.buffer is None or self.buffer.numel() < block.numel() or self.buffer.device != device:
            self.buffer = torch.empty(block.numel(), device=device)
        magnitude = torch.abs(block, out=self.buffer[: block.numel()].view(block.shape))
        if self.invalid_rows.numel():  # may hold NaN, which a zero weight would not cancel
            magnitude.index_fill_(0, self.invalid_rows, 0.0)
        # Rows with a non-finite value add nothing to the scores: found on the device, no host
        # check (a sync per block would stall the GPU inside the loop). amax propagates NaN.
        finite = torch.isfinite(magnitude.amax(1))
        magnitude.masked_fill_(~finite[:, None], 0.0)
        scores = self.onehot @ magnitude  # [S, m]: per source, the sum over its valid rows
        if divisor is not None:  # positive (block_normalizer folds only such divisors)
            scores = scores / divisor
        del magnitude
        if self.all_reduce is not None:
            self.all_reduce(scores)
        keep = min(self.dim, m)
        if 4 * keep < m:  # narrow the block first; for narrower blocks one merge topk is cheaper
            scores, best = scores.topk(keep, dim=1, sorted=False)  # [S, keep]
            values = torch.gather(block, 1, best[self.codes])  # row i on its source's best columns
            if divisor is not None:
                values = values / divisor[best][self.codes]
        else:
            best = torch.arange(m, device=device).expand(self.num_sources, m)
            values = block if divisor is None else block / divisor
        coords = best + start
        if self.scores is not None:
            scores = torch.cat([self.scores, scores], 1)
            coords = torch.cat([self.coords, coords], 1)
            values = torch.cat([self.values, values], 1)
        if scores.shape[1] > self.dim:
            scores, top = scores.topk(self.dim, dim=1, sorted=False)
            coords = torch.gather(coords, 1, top)
            values = torch.gather(values, 1, top[self.codes])
        self.scores, self.coords, self.values = scores, coords, values
        return finite

    def result(self, num_rows: int, device=None, dtype=torch.float32) -> torch.Tensor:
        """``Tensor[B, min(dim, width)]``: each source's valid rows on its columns (ascending); NaN elsewhere."""
        out_dim = min(self.dim, self.width)
        if self.values is None:
            return torch.full((num_rows, out_dim), float("nan"), dtype=dtype, device=device)
        order = self.coords.argsort(dim=1)
        out = torch.gather(self.values, 1, order[self.codes]).to(device, dtype)
        valid = self.valid.to(out.device)
        return torch.where(valid[:, None], out, torch.full_like(out, float("nan")))
