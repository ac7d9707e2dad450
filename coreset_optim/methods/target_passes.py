"""The target method's two streamed passes, folded block by block like the sketch pass
(:func:`~coreset_optim.sketch.streaming.fold_chunks`): never a ``[B, layer size]`` tensor.

* :func:`summed_gradients`: the held-out target's mean gradient is a sum of blocks;
* :func:`target_sketches`: an example's alignment ``a_j = g_t . delta_j`` is linear in its
  gradient, so each block adds its share, and the update rows of the second-order term add
  their CountSketch as the projection sketch does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..precondition.normalize import ParamPreconditioner
from ..sketch.projection import countsketch_add_
from ..sketch.capture import sketch_mode, BatchPass
from ..sketch.streaming import fold_chunks, DEFAULT_BLOCK_BYTES, Normalizer


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
    """The target stage's rows ``[a_j | delta_j]`` (:func:`~coreset_optim.methods.target.target_features`),
    folded block by block: never a ``[B, layer size]`` tensor.

    ``delta_j``: example j's gradient divided by the optimizer's per-coordinate divisor (``normalize``
    must be one, "adam" or raw) times its parameter's step size (``step_sizes``, one per sketched
    parameter); ``a_j = g_t . delta_j`` over every sketch coordinate. The update rows are only
    built when ``curvature > 0``: whole when the sketch has at most ``dim`` coordinates, else their
    seeded CountSketch (the same hash as on whole rows). Returns ``(rows[B, 1 (+ d)], losses[B],
    valid[B])``; invalid rows are NaN, as in :func:`compressed_sketches`.
    """
    params = [p for t in batch_pass.layers for p in t.params]
    scalings = [ParamPreconditioner.of(optimizer, p, normalize) for p in params]
    divisors = [s.divisor() for s in scalings]
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
        divide=not all(s.divisor_is_positive() for s in scalings),
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
