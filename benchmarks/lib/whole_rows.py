"""The sketch paths the bounded ones replaced, as selection methods, so that a benchmark can run
them through ``CoresetOptimizer.select`` beside today's: every example's whole gradient of the
sketch layers (a ``[B, layer size]`` tensor), normalized whole, then compressed (top coordinates,
or the former randint-hashed CountSketch); for the target method, the target's and the batch's
whole rows. Only the pass over the batch differs: budgets, the method's choice and the backward
are ``select()``'s own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from coreset_optim import SketchedMethod, TargetAware
from coreset_optim.batching import batch_size
from coreset_optim.methods.target import step_sizes, target_features, target_gradient
from coreset_optim.precondition.normalize import normalize_sketches
from coreset_optim.records import Sketches
from coreset_optim.sketch.capture import BatchPass, exact_sketches, sketch_params


def whole_sketches(batch_pass: BatchPass) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows[B, D], losses[B])``: whole per-example gradients of the pass's sketch layers."""
    bp = batch_pass
    return exact_sketches(bp.model, bp.layers, bp.batch, bp.loss_fn, bp.num_examples, bp.chunk_size)


def old_countsketch(x: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """The CountSketch select() used before the bounded path (hash drawn in sequence by randint)."""
    gen = torch.Generator().manual_seed(seed)
    buckets = torch.randint(0, dim, (x.shape[1],), generator=gen)
    signs = torch.randint(0, 2, (x.shape[1],), generator=gen).float().mul_(2).sub_(1)
    out = x.new_zeros(x.shape[0], dim)
    out.index_add_(1, buckets, x * signs)
    return out


class WholeRows:
    """Mixed in before a :class:`SketchedMethod`: its sketches built whole (then compressed by
    ``select()`` to the method's top coordinates, or first CountSketched the former way when
    ``old_projection``)."""

    old_projection: ClassVar[bool] = False

    def sketches(self, context) -> Sketches:
        raw, losses = whole_sketches(context.batch_pass)
        valid = torch.isfinite(losses) & torch.isfinite(raw).all(1)
        rows = normalize_sketches(raw, context.optimizer, sketch_params(context.layers), self.normalize)
        del raw
        if self.old_projection:
            rows = old_countsketch(rows, self.sketch_dim, context.seed)
        return Sketches(rows, losses, valid)


def whole_rows(method: SketchedMethod, old_projection: bool = False) -> SketchedMethod:
    """A method like ``method`` (same class, same options) whose sketches are built whole
    (``selection="target"``: :class:`WholeTarget`)."""
    if isinstance(method, TargetAware):
        return WholeTarget(**method.options())
    cls = type(method)
    name = f"WholeRows{'OldProjection' if old_projection else ''}{cls.__name__}"
    whole = type(name, (WholeRows, cls), {"old_projection": old_projection})
    return whole(**method.options())


@dataclass(kw_only=True)
class WholeTarget(TargetAware):
    """``selection="target"`` as it was computed before its passes streamed: the target's mean
    gradient from its whole per-example rows (every selection), then each example's whole
    normalized row turned into its ``[alignment | update]`` features."""

    whole_grad: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def prepare(self, context) -> None:
        target_rows, target_losses = whole_sketches(context.batch_pass.on(self.target, batch_size(self.target)))
        self.whole_grad = target_gradient(target_rows, target_losses)

    def sketches(self, context) -> Sketches:
        raw, losses = whole_sketches(context.batch_pass)
        params = sketch_params(context.layers)
        rows = normalize_sketches(raw, context.optimizer, params, self.normalize)
        del raw
        sizes = step_sizes(context.optimizer, params)
        rows = target_features(rows, self.whole_grad, params, sizes, self.curvature, self.sketch_dim, context.seed)
        return Sketches(rows, losses, torch.isfinite(losses) & torch.isfinite(rows).all(1))
