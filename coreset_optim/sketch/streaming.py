"""Compressed sketches built block by block: no ``[B, layer size]`` tensor ever exists.

A Linear layer's per-example gradient for output rows r0:r1 needs only ``dy[..., r0:r1]`` and the
layer's input (:func:`~coreset_optim.sketch.capture.linear_grad_block`). Each block is normalized with the
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
  (:class:`~coreset_optim.sketch.compress.StreamingTopCoordinates`) keeps the columns a
  whole-gradient compression keeps. A score needs every example, so the sketch layers' inputs
  and output gradients of the whole (local) batch are held while the blocks run:
  ``B x tokens x (in + out)`` values per layer, the size of that layer's activations, not of
  its weight.

* the target method's passes (:mod:`~coreset_optim.methods.target_passes`) fold their blocks
  with the same driver.

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
from ..precondition.normalize import ParamPreconditioner
from .projection import countsketch_add_
from ..records import Agreement
from .capture import linear_grad_block, sketch_mode, BatchPass, LayerCalls, SketchLayer

DEFAULT_BLOCK_BYTES = 32 * 2**20
# float32 tensors of a block's size alive at once at the peak: the block, its absolute values
# (top coordinates) or signed copy (projection), and a temporary of "adam_update"'s
# normalization; with margin.
BLOCK_COPIES = 4


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
    ``normalizers``: one per sketched parameter, in :func:`~coreset_optim.sketch.capture.sketch_params` order.
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
    scaling = ParamPreconditioner.of(optimizer, param, mode)
    divisor = scaling.divisor()
    if divisor is not None and scaling.divisor_is_positive():
        return lambda block, start: (block, divisor(start, start + block.shape[1]))
    normalize = scaling.block_normalizer(inplace=True)
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
    :meth:`~coreset_optim.sketch.capture.BatchPass.chunks`)."""
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
