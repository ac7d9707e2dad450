"""Compressed sketches built block by block: no ``[B, layer size]`` tensor ever exists.

A Linear layer's per-example gradient for output rows r0:r1 needs only ``dy[..., r0:r1]`` and the
layer's input (:func:`~coreset_optim.sketch.linear_grad_block`). Each block is normalized with the
wrapped optimizer's moments of those coordinates only (every normalization is elementwise) and
folded straight into the compressed sketch. Where the normalization divides each coordinate by
one number for all examples ("adam", raw), the division is left to the compressor, which applies
it to column scores and kept values only (the CountSketch folds it into the signs): one pass
less over the block.

* ``sketch="projection"``: CountSketch is linear with a hash per coordinate, so each block adds
  its own projection; examples are streamed chunk by chunk and a chunk's layer inputs/output
  gradients are dropped once folded.
* top coordinates (``sketch="exact"``): a column's score (mean |value| over a source's valid rows)
  depends on that column alone, so a running per-source top-``dim`` merge
  (:class:`~coreset_optim.compress.StreamingTopCoordinates`) keeps the columns a whole-gradient compression keeps. A
  score needs every example, so the sketch layers' inputs and output gradients of the whole
  (local) batch are held while the blocks run: ``B x tokens x (in + out)`` values per layer, the
  size of that layer's activations, not of its weight.

* the target stage (``selection="target"``, :mod:`~coreset_optim.target`): an example's
  alignment ``a_j = g_t . delta_j`` is linear in its gradient, so each block adds its share
  (:func:`target_sketches`), and the update rows of the second-order term add their CountSketch
  as above; the target's own mean gradient is a sum of blocks (:func:`summed_gradients`).

The streamed passes share one driver, :func:`fold_chunks`: chunk after chunk, the chunk's blocks
go to a fold (projection, target rows, gradient sum) that turns them into the chunk's result,
then the chunk is dropped. Top coordinates use the same blocks over the held chunks.

Either way the extra memory is the compressed sketch (``B x sketch_dim``) plus one block, sized
from ``block_bytes``, plus what the layer inputs/output gradients take. The result equals
normalizing and compressing the whole per-example gradient at once (up to float summation order
and ties between equal top-coordinate scores).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .compress import StreamingTopCoordinates
from .normalize import coordinate_divisor, divisor_is_positive, param_normalizer
from .projection import countsketch_add_
from .sketch import BatchPass, LayerCalls, SketchLayer, linear_grad_block, sketch_mode

DEFAULT_BLOCK_BYTES = 32 * 2**20
# float32 tensors of a block's size alive at once at the peak: the block, its absolute values
# (top coordinates) or signed copy (projection), and a temporary of "adam_update"'s
# normalization; with margin.
BLOCK_COPIES = 4


@dataclass
class Agreement:
    """What ranks selecting from one global batch must share while they stream (None: one process).

    ``all_reduce(t)`` sums ``t`` over the ranks in place; ``any_rank(flag)`` is True when the flag is
    set on some rank; ``plan_examples`` is the largest number of examples on any rank, so that all
    ranks cut the layers into the same blocks (and so make the same collectives).
    """

    all_reduce: Callable[[torch.Tensor], None]
    any_rank: Callable[[bool], bool]
    plan_examples: int


def rows_per_block(num_examples: int, in_features: int, block_bytes: int) -> int:
    """Output rows per block so that a block's working set stays within ``block_bytes`` (at least 1)."""
    per_row = 4 * BLOCK_COPIES * max(1, num_examples) * in_features
    return max(1, block_bytes // per_row)


def _layer_width(layer: SketchLayer) -> tuple[int, int]:
    out_features, in_features = layer.module.weight.shape
    return int(out_features), int(in_features)


def sketch_blocks(
    layers: Sequence[SketchLayer],
    calls: Sequence[Sequence[LayerCalls]],
    normalizers: Sequence[Normalizer],
    num_examples: int,
    block_bytes: int,
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor | None]]:
    """``(start, block[n, m], divisor[m] or None)``: the per-example gradients of sketch coordinates
    ``start .. start+m-1`` (numbered as in a whole sketch row: each layer's weight, row-major,
    then its bias), every coordinate exactly once; the normalized sketch is ``block / divisor``
    (``divisor`` None: ``block`` is normalized already, or raw is wanted).

    ``calls[c][t]``: what layer t saw in chunk c; a block's rows are all chunks' examples in order.
    ``normalizers``: one per sketched parameter, in :func:`~coreset_optim.sketch.sketch_params` order.
    """
    offset, which = 0, 0
    for t, layer in enumerate(layers):
        out_features, in_features = _layer_width(layer)
        step = rows_per_block(num_examples, in_features, block_bytes)
        weight_start, bias_start = offset, offset + out_features * in_features
        for r0 in range(0, out_features, step):
            rows = slice(r0, min(r0 + step, out_features))
            weight, biases, first = None, [], 0
            for chunk in calls:  # every chunk's examples written into one block
                n = chunk[t].num_examples
                if weight is None:
                    total = sum(c[t].num_examples for c in calls)
                    weight = torch.empty(total, (rows.stop - r0) * in_features, device=chunk[t].inputs[0].device)
                _, bias = linear_grad_block(chunk[t], rows, layer.with_bias, out=weight[first : first + n])
                biases.append(bias)
                first += n
            yield (weight_start + r0 * in_features, *normalizers[which](weight, r0 * in_features))
            del weight
            if layer.with_bias:
                bias = torch.cat(biases) if len(biases) > 1 else biases[0]
                yield (bias_start + r0, *normalizers[which + 1](bias, r0))
        offset = bias_start + (out_features if layer.with_bias else 0)
        which += 1 + int(layer.with_bias)


Normalizer = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor | None]"]


def block_normalizer(optimizer: torch.optim.Optimizer, param: torch.Tensor, mode: str | None) -> Normalizer:
    """``f(block, start) -> (block, divisor)`` for ``param``'s flat coordinates from ``start``:
    a per-coordinate divisor left to the compressor when the mode is one ("adam", raw: it then
    divides only what it keeps) and it is known positive (eps > 0), else the block normalized in
    place ("adam_update", or eps = 0, where folding ``1 / divisor`` could multiply 0 by inf)."""
    divisor = coordinate_divisor(optimizer, param, mode)
    if divisor is not None and divisor_is_positive(optimizer, param):
        return lambda block, start: (block, divisor(start, start + block.shape[1]))
    normalize = param_normalizer(optimizer, param, mode, inplace=True)
    return lambda block, start: (normalize(block, start), None)


def compressed_sketches(
    batch_pass: BatchPass,
    *,
    optimizer: torch.optim.Optimizer,
    normalize: str | None,
    sketch: str,
    dim: int,
    seed: int,
    source_codes: torch.Tensor,
    num_sources: int,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    agreement: Agreement | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalized, compressed per-example sketches, never holding a whole per-example gradient.

    Returns ``(sketches[B, d], losses[B], valid[B])``: ``d = dim`` for ``sketch="projection"``,
    ``min(dim, D)`` for top coordinates (``sketch="exact"``; each source's rows on that source's
    columns, in ascending order). ``valid``: finite loss and finite normalized gradient; invalid
    rows are NaN. The model's ``.grad``, modes and flags are unchanged; the optimizer's state is
    only read.
    """
    layers, num_examples = batch_pass.layers, batch_pass.num_examples
    params = [p for t in layers for p in t.params]
    normalizers = [block_normalizer(optimizer, p, normalize) for p in params]
    with sketch_mode(batch_pass.model, layers), torch.enable_grad():
        chunks = batch_pass.chunks()
        if sketch == "auto":
            first = [next(chunks)]
            sketch = "exact" if _hold_fits(first[0], num_examples, block_bytes, agreement) else "projection"
            chunks = _first_then(first, chunks)
            del first
        if sketch == "projection":
            return fold_chunks(chunks, layers, normalizers, block_bytes, _ProjectionFold(dim, seed))
        held = list(chunks)
    return _top_coordinates(
        held, layers, num_examples, normalizers, dim, source_codes, num_sources, block_bytes, agreement
    )


def _first_then(first: list, rest: Iterator) -> Iterator:
    """``first``'s one item, then ``rest``; holds no reference to the item once it is taken (an
    ``itertools.chain([item], rest)`` keeps it, and with it a chunk's activations, to the end)."""
    yield first.pop()
    yield from rest


# Top coordinates hold every example's sketch-layer inputs and output gradients (their scores need
# the whole batch); sketch="auto" does so while that stays within this many blocks, and streams a
# CountSketch chunk by chunk beyond (e.g. an lm_head: B x tokens x vocabulary output gradients).
HOLD_BLOCKS = 4


def _hold_fits(
    first: tuple[slice, list[LayerCalls], torch.Tensor],
    num_examples: int,
    block_bytes: int,
    agreement: Agreement | None,
) -> bool:
    """Whether holding the whole batch's layer calls (estimated from the first chunk's) stays within
    ``HOLD_BLOCKS`` blocks; under torch.distributed, on every rank."""
    piece, calls, _ = first
    held = sum(t.numel() * t.element_size() for c in calls for t in (*c.inputs, *c.grad_outputs))
    fits = held * num_examples / max(1, piece.stop - piece.start) <= HOLD_BLOCKS * block_bytes
    return fits if agreement is None else not agreement.any_rank(not fits)


# A fold turns one chunk's blocks ``(start, block[n, m], divisor[m] or None)`` into that chunk's
# result (e.g. its compressed rows), given the chunk's size and losses.
Fold = Callable[[int, torch.Tensor, Iterator[tuple[int, torch.Tensor, "torch.Tensor | None"]]], Any]


def fold_chunks(
    chunks: Iterator[tuple[slice, list[LayerCalls], torch.Tensor]],
    layers: Sequence[SketchLayer],
    normalizers: Sequence[Normalizer],
    block_bytes: int,
    fold: Fold,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The block driver of the streamed passes: each chunk's blocks through ``fold``, the chunk
    dropped before the next one runs; returns ``(rows[B, d], losses[B], valid[B])`` with the
    chunks' rows stacked, ``valid`` a finite loss and row, and invalid rows NaN.

    Must run inside ``sketch_mode(model, layers)`` with grad enabled (``chunks``:
    :meth:`~coreset_optim.sketch.BatchPass.chunks`)."""
    rows, loss_rows = [], []
    for piece, calls, losses in chunks:
        n = piece.stop - piece.start
        rows.append(fold(n, losses, sketch_blocks(layers, [calls], normalizers, n, block_bytes)))
        loss_rows.append(losses)
        del calls
    sketches, losses = torch.cat(rows), torch.cat(loss_rows)
    valid = torch.isfinite(losses).to(sketches.device) & torch.isfinite(sketches).all(1)
    sketches = torch.where(valid[:, None], sketches, torch.full_like(sketches, float("nan")))
    return sketches, losses, valid


@dataclass
class _ProjectionFold:
    """A chunk's ``[n, dim]`` CountSketch rows, each block added as it comes."""

    dim: int
    seed: int

    def __call__(self, n: int, losses: torch.Tensor, blocks) -> torch.Tensor:
        out = None
        for start, block, divisor in blocks:
            out = block.new_zeros(n, self.dim) if out is None else out
            countsketch_add_(out, block, self.seed, start, divisor)
        return out


def _top_coordinates(chunks, layers, num_examples, normalizers, dim, source_codes, num_sources, block_bytes, agreement):
    """Hold every chunk's layer calls, then score the whole batch's columns block by block."""
    calls = [c for _, c, _ in chunks]
    losses = torch.cat([loss for _, _, loss in chunks])
    del chunks
    device = calls[0][0].grad_outputs[0].device
    plan_examples = num_examples if agreement is None else agreement.plan_examples
    valid = torch.isfinite(losses).to(device)
    while True:
        top = StreamingTopCoordinates(
            valid, source_codes.to(device), num_sources, dim, None if agreement is None else agreement.all_reduce
        )
        finite = valid.clone()
        for start, block, divisor in sketch_blocks(layers, calls, normalizers, plan_examples, block_bytes):
            finite &= top.add(block, start, divisor)
        # A row found non-finite part-way has already entered some scores: redo without it (rare:
        # an overflowing gradient, or eps = 0 with a zero second moment).
        changed = bool((finite != valid).any())
        if agreement is not None:
            changed = agreement.any_rank(changed)
        if not changed:
            break
        valid = finite
    return top.result(num_examples, device=device), losses, valid


def _raw(block: torch.Tensor, start: int) -> tuple[torch.Tensor, None]:
    return block, None


def summed_gradients(
    batch_pass: BatchPass, block_bytes: int = DEFAULT_BLOCK_BYTES
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum[D] float32, finite[n])``: the sum of the finite examples' raw sketch gradients, and
    which examples have a finite loss and gradient; one ``[D]`` vector, never ``[n, D]`` (float32,
    as a whole-row mean would be: for an ``lm_head`` the vector is the size of its weight).

    For the held-out target of ``selection="target"``, whose mean gradient is ``sum / n`` when
    every example is finite (the caller refuses the target otherwise). The model's ``.grad``,
    modes and flags are unchanged.
    """
    params = [p for t in batch_pass.layers for p in t.params]
    fold = _SumFold(torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=params[0].device))
    if batch_pass.num_examples == 0:
        return fold.total, torch.zeros(0, dtype=torch.bool, device=fold.total.device)
    with sketch_mode(batch_pass.model, batch_pass.layers), torch.enable_grad():
        finite, _, _ = fold_chunks(batch_pass.chunks(), batch_pass.layers, [_raw] * len(params), block_bytes, fold)
    return fold.total, finite[:, 0] > 0


@dataclass
class _SumFold:
    """Adds the chunk's finite rows into ``total``; the chunk's result is its finite flags
    (``[n, 1]``, 1.0 or 0.0: a non-finite row adds nothing, with no host check per block)."""

    total: torch.Tensor

    def __call__(self, n: int, losses: torch.Tensor, blocks) -> torch.Tensor:
        finite = None
        for start, block, _ in blocks:
            if self.total.device != block.device:
                self.total = self.total.to(block.device)
            if finite is None:
                finite = torch.isfinite(losses).to(block.device)
            ok = torch.isfinite(block).all(1)
            finite &= ok
            self.total[start : start + block.shape[1]] += torch.where(ok[:, None], block, 0.0).sum(0)
        return finite.float()[:, None]


def target_sketches(
    batch_pass: BatchPass,
    *,
    optimizer: torch.optim.Optimizer,
    normalize: str | None,
    target_grad: torch.Tensor,
    step_sizes: Sequence[float],
    curvature: float,
    dim: int,
    seed: int,
    block_bytes: int = DEFAULT_BLOCK_BYTES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The target stage's rows ``[a_j | delta_j]`` (:func:`~coreset_optim.target.target_features`),
    folded block by block: never a ``[B, layer size]`` tensor.

    ``delta_j``: example j's gradient divided by the optimizer's per-coordinate divisor (``normalize``
    must be one, "adam" or raw) times its parameter's step size (``step_sizes``, one per sketched
    parameter); ``a_j = g_t . delta_j`` over every sketch coordinate. The update rows are only
    built when ``curvature > 0``: whole when the sketch has at most ``dim`` coordinates, else their
    seeded CountSketch (the same hash as on whole rows). Returns ``(rows[B, 1 (+ d)], losses[B],
    valid[B])``; invalid rows are NaN, as in :func:`compressed_sketches`.
    """
    params = [p for t in batch_pass.layers for p in t.params]
    divisors = [coordinate_divisor(optimizer, p, normalize) for p in params]
    if any(d is None for d in divisors):
        raise ValueError(f"the target stage needs a per-coordinate normalization ('adam' or None), got {normalize!r}")
    numel = sum(p.numel() for p in params)
    width = 0 if curvature <= 0 else min(dim, numel)
    # eps > 0: 1 / divisor is finite, so it folds into the target's weights and the CountSketch's
    # signs (no host check per block); eps = 0: the block itself is divided, as a whole row would be.
    fold = _TargetFold(
        target_grad,
        width,
        compress=width > 0 and numel > dim,
        seed=seed,
        divide=not all(divisor_is_positive(optimizer, p) for p in params),
    )
    # the divisor of the update (gradient / divisor * step size), per parameter: divisor / size
    normalizers = [_scaled_divisor(divisor, float(size)) for divisor, size in zip(divisors, step_sizes)]
    with sketch_mode(batch_pass.model, batch_pass.layers), torch.enable_grad():
        return fold_chunks(batch_pass.chunks(), batch_pass.layers, normalizers, block_bytes, fold)


@dataclass
class _TargetFold:
    """A chunk's ``[a_j | delta_j]`` rows: each block adds its share of the alignment (in float64)
    and its update columns (whole, or their CountSketch when ``compress``)."""

    target_grad: torch.Tensor
    width: int
    compress: bool
    seed: int
    divide: bool  # divide the block itself (eps = 0) instead of folding 1 / divisor

    def __call__(self, n: int, losses: torch.Tensor, blocks) -> torch.Tensor:
        alignment = updates = None
        for start, block, divisor in blocks:
            if alignment is None:
                alignment = block.new_zeros(n, dtype=torch.float64)
                updates = block.new_zeros(n, self.width)
            stop = start + block.shape[1]
            g = self.target_grad[start:stop].to(block.device, block.dtype)
            if self.divide:
                block, divisor = block / divisor, None
            alignment += block @ (g if divisor is None else g / divisor)
            if self.compress:
                countsketch_add_(updates, block, self.seed, start, divisor)
            elif self.width:
                updates[:, start:stop] = block if divisor is None else block / divisor
        return torch.cat([alignment.to(updates.dtype)[:, None], updates], dim=1)


def _scaled_divisor(divisor, size: float) -> Normalizer:
    """``f(block, start) -> (block, divisor / size)``: the update is ``block / (divisor / size)``
    (size 0, a zero learning rate: an infinite divisor, a zero update)."""

    def f(block: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        d = divisor(start, start + block.shape[1])
        if d is None:
            d = torch.ones(block.shape[1], dtype=block.dtype, device=block.device)
        d = d.to(block.device, block.dtype)
        return block, d / size if size != 0 else torch.full_like(d, float("inf"))

    return f
