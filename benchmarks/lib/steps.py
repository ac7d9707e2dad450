"""One training step of the kinds the memory benchmarks measure side by side: a plain step on the
first n examples of a batch, and a coreset step (``select()``, then the wrapped optimizer's step)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from coreset_optim import CoresetOptimizer
from coreset_optim.batching import index_batch


def plain_step(optimizer: torch.optim.Optimizer, loss_fn: Callable, batch, n: int) -> None:
    """Forward/backward of the first ``n`` examples (mean loss), then the optimizer's step."""
    loss_fn(index_batch(batch, torch.arange(n))).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def coreset_step(wrapper: CoresetOptimizer, loss_fn: Callable, batch, **select):
    """``wrapper.select(batch, loss_fn, **select)``, then the step; returns the coreset."""
    coreset = wrapper.select(batch, loss_fn, **select)
    wrapper.step()
    wrapper.zero_grad(set_to_none=True)
    return coreset
