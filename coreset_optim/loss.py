"""Calling the user's per-example loss function, with the checks that make its mistakes clear."""

from __future__ import annotations

from typing import Any, Callable

import torch

LossFn = Callable[[Any], torch.Tensor]


def call_loss_fn(loss_fn: LossFn, batch: Any, num_examples: int) -> torch.Tensor:
    """``loss_fn(batch)`` checked to be a Tensor[num_examples] of per-example losses."""
    losses = loss_fn(batch)
    if not isinstance(losses, torch.Tensor):
        raise TypeError(
            f"loss_fn must return a Tensor of per-example losses, got {type(losses).__name__}; "
            "return e.g. F.cross_entropy(..., reduction='none') reduced to one value per example"
        )
    if losses.ndim != 1 or losses.shape[0] != num_examples:
        raise ValueError(
            f"loss_fn returned a tensor of shape {tuple(losses.shape)} for a slice of "
            f"{num_examples} examples; it must return one loss per example (shape "
            f"[{num_examples}]), not a scalar or a per-token loss: use reduction='none' and "
            "average each example's tokens"
        )
    if not losses.is_floating_point():
        raise TypeError(f"loss_fn must return floating-point losses, got dtype {losses.dtype}")
    return losses
