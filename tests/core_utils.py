"""Shared references and helpers for the core tests (tiny models, slow obviously-right loops)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from coreset_optim import CoresetOptimizer


class TwoLayer(nn.Module):
    """x -> Linear -> tanh -> Linear; works on (n, d) and (n, T, d) inputs."""

    def __init__(self, d_in: int = 5, hidden: int = 4, d_out: int = 3, bias: bool = True):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, d_out, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def regression_loss(model: nn.Module):
    """loss_fn for a dict batch {"x": (n, d) or (n, T, d), "y": same leading dims, d_out}:
    per-example mean squared error (mean over tokens and outputs)."""

    def loss_fn(batch):
        out = model(batch["x"])
        return (out - batch["y"]).pow(2).flatten(1).mean(1)

    return loss_fn


def make_batch(n: int = 12, d_in: int = 5, d_out: int = 3, tokens: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (n, d_in) if tokens is None else (n, tokens, d_in)
    out_shape = (n, d_out) if tokens is None else (n, tokens, d_out)
    return {"x": torch.randn(shape, generator=g), "y": torch.randn(out_shape, generator=g)}


def per_example_grads_loop(model: nn.Module, params, batch, loss_fn, n: int) -> torch.Tensor:
    """Reference: row i = grad of loss_fn(batch[i:i+1]) w.r.t. ``params``, flattened side by side,
    from one batch-size-1 backward pass per example (no hooks, no chunking)."""
    rows = []
    for i in range(n):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        loss = loss_fn(one)
        assert loss.shape == (1,)
        grads = torch.autograd.grad(loss.sum(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def weighted_grad_reference(model: nn.Module, batch, loss_fn, indices, weights, num_valid: int):
    """Reference for select(): {param: (1/N) sum_j w_j grad(loss_j)} by a loop over examples."""
    params = [p for p in model.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    for j, w in zip(indices.tolist(), weights.tolist()):
        one = {k: v[j : j + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(loss_fn(one).sum(), params)
        for t, g in zip(total, grads):
            t.add_(g, alpha=w / num_valid)
    return dict(zip(params, total))


def take_steps(opt: torch.optim.Optimizer, model: nn.Module, steps: int, seed: int = 1) -> None:
    """A few plain optimizer steps on random data so the optimizer has state."""
    loss_fn = regression_loss(model)
    for s in range(steps):
        batch = make_batch(8, model.fc1.in_features, model.fc2.out_features, seed=seed + s)
        opt.zero_grad()
        loss_fn(batch).mean().backward()
        opt.step()


class Snapshot:
    """Everything a failed select() or constructor must leave alone: parameter values, .grad,
    requires_grad flags, train/eval modes and the optimizer's state (values and keys)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer
        self.params = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.grads = {n: None if p.grad is None else p.grad.detach().clone() for n, p in model.named_parameters()}
        self.flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.modes = {n: m.training for n, m in model.named_modules()}
        self.state = copy.deepcopy(optimizer.state_dict())
        self.state_ids = {id(p): sorted(s.keys()) for p, s in optimizer.state.items()}

    def assert_unchanged(self) -> None:
        model, optimizer = self.model, self.optimizer
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), self.params[n], rtol=0, atol=0, msg=f"param {n} changed")
            before = self.grads[n]
            if before is None:
                assert p.grad is None, f".grad of {n} was written"
            else:
                torch.testing.assert_close(p.grad, before, rtol=0, atol=0, msg=f".grad of {n} changed")
            assert p.requires_grad == self.flags[n], f"requires_grad of {n} changed"
        assert {n: m.training for n, m in model.named_modules()} == self.modes
        assert {id(p): sorted(s.keys()) for p, s in optimizer.state.items()} == self.state_ids
        assert_state_dicts_equal(optimizer.state_dict(), self.state)


def assert_state_dicts_equal(a, b) -> None:
    """Exact, recursive equality of (optimizer) state dicts."""
    assert type(a) is type(b) or (isinstance(a, (int, float)) and isinstance(b, (int, float))), (a, b)
    if isinstance(a, dict):
        assert a.keys() == b.keys(), (a.keys(), b.keys())
        for k in a:
            assert_state_dicts_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_state_dicts_equal(x, y)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    else:
        assert a == b, (a, b)


def build(seed: int = 0, opt_cls=torch.optim.AdamW, opt_kwargs=None, bias: bool = True, **wrapper_kwargs):
    """A seeded TwoLayer model, an optimizer over all its parameters, and the wrapper."""
    torch.manual_seed(seed)
    model = TwoLayer(bias=bias)
    opt = opt_cls(model.parameters(), **({"lr": 1e-2} | (opt_kwargs or {})))
    wrapper_kwargs.setdefault("coreset_size", 4)
    return model, opt, CoresetOptimizer(opt, model, **wrapper_kwargs)


FLIPPED = [2, 9, 15, 20]


def flipped_targets(steps: int, selection: str, shift: float):
    """A 24-row regression batch whose clean targets pull the outputs up and whose rows ``FLIPPED``
    pull them down (``shift`` below), for a ``selection`` that judges suspects; the optimizer has
    taken ``steps`` steps. Returns ``(model, opt, wrapper, batch, loss_fn)``; sources are
    ``i % 2``, the sketch layer ``fc2`` kept whole (sketch_dim 10 000)."""
    torch.manual_seed(0)
    model = TwoLayer(d_in=4, hidden=5, d_out=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    take_steps(opt, model, steps)
    wrapper = CoresetOptimizer(
        opt, model, coreset_size=6, selection=selection, sketch_modules=["fc2"], sketch_dim=10_000
    )
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 4, generator=g)
    with torch.no_grad():
        y = model(x) + 1.0 + 0.5 * torch.rand(24, 2, generator=g)
    y[FLIPPED] -= shift

    def loss_fn(b):
        return (model(b["x"]) - b["y"]).pow(2).mean(1)

    return model, opt, wrapper, {"x": x, "y": y}, loss_fn
