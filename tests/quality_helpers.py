"""Tiny models and batches shared by the tests in tests/quality/."""

from __future__ import annotations

import torch
from torch import nn


def tiny_model(seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).to(dtype)


def tiny_batch(n: int = 24, seed: int = 1, num_sources: int = 3, dtype=torch.float32) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "x": torch.randn(n, 5, generator=g, dtype=dtype),
        "y": torch.randn(n, 3, generator=g, dtype=dtype),
        "source": torch.arange(n) % num_sources,
    }


def make_loss_fn(model: nn.Module):
    def loss_fn(batch):
        return (model(batch["x"]) - batch["y"]).pow(2).mean(1)

    return loss_fn


def per_example_grads(model: nn.Module, batch: dict, params) -> torch.Tensor:
    """Reference: a batch-size-1 loop, each example's gradient of ``params`` flattened."""
    rows = []
    loss_fn = make_loss_fn(model)
    for i in range(batch["x"].shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(loss_fn(one).sum(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)
