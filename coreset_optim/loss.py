"""Backpropagating the chosen examples' weighted losses, in micro-batches like gradient accumulation."""

from __future__ import annotations

import math
from typing import Any

import torch

from .batching import LossFn, call_loss_fn, chunk_slices, index_batch


def backward_weighted(
    batch: Any,
    weights: torch.Tensor,
    loss_fn: LossFn,
    denominator: float,
    micro_batch_size: int | None,
) -> torch.Tensor:
    """Backpropagate ``sum_j weights[j] * loss_j / denominator`` over ``batch`` in micro-batches.

    Gradients accumulate into ``.grad`` like ordinary gradient accumulation. Returns the
    (detached) value of the weighted loss.
    """
    total = None
    for piece in chunk_slices(int(weights.numel()), micro_batch_size):
        part = backward_weighted_losses(loss_fn, index_batch(batch, piece), weights[piece], denominator)
        total = part if total is None else total + part
    return total


@torch.enable_grad()  # select() backpropagates even when called under torch.no_grad()
def backward_weighted_losses(loss_fn: LossFn, batch: Any, weights: torch.Tensor, denominator: float) -> torch.Tensor:
    """One backward of ``sum_j weights[j] * loss_j / denominator`` over ``batch``; its value, detached."""
    losses = call_loss_fn(loss_fn, batch, int(weights.numel()))
    part = (weights.to(losses.device, losses.dtype) * losses).sum() / denominator
    if not part.requires_grad:
        raise ValueError(
            "loss_fn's losses do not require grad, so there is nothing to backpropagate; do "
            "not run the model under torch.no_grad() inside loss_fn"
        )
    part.backward()
    return part.detach()


def check_loss_scale(loss_scale: Any) -> None:
    """A finite, non-zero number (or a tensor, not checked: that would synchronize the device)."""
    if isinstance(loss_scale, torch.Tensor):
        return
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)):
        raise TypeError(f"loss_scale must be a float, got {type(loss_scale).__name__}")
    if not math.isfinite(loss_scale) or loss_scale == 0:
        raise ValueError(f"loss_scale must be a finite, non-zero number, got {loss_scale}")
