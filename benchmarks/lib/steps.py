"""One training step of the kinds the step benchmarks measure side by side: a plain step on the
first n examples of a batch, a coreset step (``select()``, then the wrapped optimizer's step), the
whole batch accumulated in micro-batches, and CoLM's ideal (a no-grad forward of the batch, then a
plain step of k)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from coreset_optim import CoresetOptimizer
from coreset_optim.batching import batch_size, index_batch


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


def accumulation_step(optimizer: torch.optim.Optimizer, loss_fn: Callable, batch, k: int) -> None:
    """The whole batch in micro-batches of ``k`` (forward/backward each, the mean over the batch), one step."""
    n = batch_size(batch)
    for start in range(0, n, k):
        (loss_fn(index_batch(batch, torch.arange(start, min(start + k, n)))).sum() / n).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def ideal_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss_fn: Callable, batch, k: int) -> None:
    """CoLM's ideal: a no-grad forward of the whole batch in chunks of ``k`` (eval mode), then a
    plain step of ``k`` examples (what any coreset step must at least do; ``real_shapes.py``'s ideal)."""
    n, was = batch_size(batch), model.training
    model.eval()
    with torch.no_grad():
        for start in range(0, n, k):
            loss_fn(index_batch(batch, torch.arange(start, min(start + k, n))))
    model.train(was)
    plain_step(optimizer, loss_fn, batch, k)
