"""The target stage folded block by block (streaming.target_sketches, streaming.summed_gradients)
== the whole-row math (target.target_features on exact_sketches) == a batch-size-1 loop; and
select(selection="target") never builds a whole layer's per-example gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import coreset_optim.sketch.capture as sketch_module
import coreset_optim.sketch.streaming as streaming
from coreset_optim import CoresetOptimizer
from coreset_optim.precondition.normalize import normalize_sketches
from coreset_optim.sketch.capture import exact_sketches, resolve_sketch_modules, sketch_params, BatchPass
from coreset_optim.methods.target_passes import summed_gradients, target_sketches
from coreset_optim.methods.target import step_sizes, target_features, target_gradient
from core_utils import Snapshot, TwoLayer, make_batch, per_example_grads_loop, regression_loss, take_steps


class Tied(nn.Module):
    """A layer used twice in one forward (tied weights)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(self.inp(x))))))


def _setup(model_cls=TwoLayer, steps=3, opt_cls=torch.optim.AdamW):
    torch.manual_seed(0)
    model = model_cls()
    opt = opt_cls(model.parameters(), lr=1e-2)
    loss_fn = regression_loss(model)
    for s in range(steps):
        opt.zero_grad()
        loss_fn(make_batch(8, 5, 3, tokens=2, seed=10 + s)).mean().backward()
        opt.step()
    opt.zero_grad()
    return model, opt


def _whole(model, opt, targets, batch, loss_fn, n, chunk, mode, g_t, curvature, dim, seed):
    """Today's whole-row math: every per-example gradient, normalized, scaled, aligned, CountSketched."""
    raw, losses = exact_sketches(model, targets, batch, loss_fn, n, chunk)
    params = sketch_params(targets)
    normalized = normalize_sketches(raw, opt, params, mode)
    rows = target_features(normalized, g_t, params, step_sizes(opt, params), curvature, dim, seed)
    valid = torch.isfinite(losses) & torch.isfinite(rows).all(1)
    return torch.where(valid[:, None], rows, torch.full_like(rows, float("nan"))), losses, valid


CASES = [(TwoLayer, "fc2", None), (TwoLayer, ["fc1", "fc2"], 3), (Tied, ["shared", "out"], 2)]


@pytest.mark.parametrize("model_cls,spec,tokens", CASES)
@pytest.mark.parametrize(
    "mode,steps,opt_cls",
    [
        ("adam", 3, torch.optim.AdamW),
        ("adam", 0, torch.optim.AdamW),
        (None, 3, torch.optim.AdamW),
        ("adam", 2, torch.optim.SGD),
    ],
)
@pytest.mark.parametrize("curvature,dim", [(0.0, 8), (5.0, 7), (5.0, 10**4)])
@pytest.mark.parametrize("block_bytes,chunk", [(1, 3), (10**9, None)])
def test_target_rows_match_whole_row_math(
    model_cls, spec, tokens, mode, steps, opt_cls, curvature, dim, block_bytes, chunk
):
    model, opt = _setup(model_cls, steps, opt_cls)
    targets = resolve_sketch_modules(model, opt, spec)
    params = sketch_params(targets)
    n, loss_fn = 9, regression_loss(model)
    batch = make_batch(n, 5, 3, tokens=tokens, seed=1)
    g_t = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(4))
    snap = Snapshot(model, opt)
    got, losses, valid = target_sketches(
        BatchPass(model, targets, batch, loss_fn, n, chunk),
        optimizer=opt,
        normalize=mode,
        target_grad=g_t,
        step_sizes=step_sizes(opt, params),
        curvature=curvature,
        dim=dim,
        seed=3,
        block_bytes=block_bytes,
    )
    snap.assert_unchanged()
    ref, ref_losses, ref_valid = _whole(model, opt, targets, batch, loss_fn, n, chunk, mode, g_t, curvature, dim, 3)
    assert valid.all() and torch.equal(valid, ref_valid)
    torch.testing.assert_close(losses, ref_losses)
    # curvature 0: [B, 1]; dim 7 < D: CountSketch (the same hash as on whole rows); dim 10**4: whole rows
    assert got.shape == ref.shape == (n, 1 + (0 if curvature == 0 else min(dim, len(g_t))))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


def test_target_rows_of_non_finite_examples_are_nan_and_invalid():
    model, opt = _setup()
    targets = resolve_sketch_modules(model, opt, ["fc1", "fc2"])
    params = sketch_params(targets)
    batch = make_batch(6, seed=1)
    batch["y"][2] = float("nan")  # a non-finite loss
    g_t = torch.randn(sum(p.numel() for p in params))
    args = dict(optimizer=opt, normalize="adam", target_grad=g_t, step_sizes=step_sizes(opt, params), seed=0)
    got, _, valid = target_sketches(
        BatchPass(model, targets, batch, regression_loss(model), 6, 4), curvature=1.0, dim=5, block_bytes=1, **args
    )
    assert valid.tolist() == [True, True, False, True, True, True]
    assert torch.isnan(got[2]).all() and torch.isfinite(got[valid]).all()


@pytest.mark.parametrize("block_bytes,chunk", [(1, 2), (10**9, None)])
def test_summed_gradients_match_batch_size_one_loop(block_bytes, chunk):
    model, opt = _setup()
    targets = resolve_sketch_modules(model, opt, ["fc1", "fc2"])
    params = sketch_params(targets)
    target = make_batch(5, tokens=2, seed=6)
    loss_fn = regression_loss(model)
    summed, finite = summed_gradients(BatchPass(model, targets, target, loss_fn, 5, chunk), block_bytes)
    assert summed.dtype == torch.float32 and finite.all()
    loop = per_example_grads_loop(model, params, target, loss_fn, 5)
    torch.testing.assert_close(summed, loop.sum(0), rtol=1e-5, atol=1e-6)
    raw, losses = exact_sketches(model, targets, target, loss_fn, 5, None)
    torch.testing.assert_close((summed / 5).float(), target_gradient(raw, losses), rtol=1e-5, atol=1e-7)
    target["y"][3] = float("inf")
    _, finite = summed_gradients(BatchPass(model, targets, target, loss_fn, 5, chunk), block_bytes)
    assert finite.tolist() == [True, True, True, False, True]


def test_select_target_mode_holds_no_whole_layer(monkeypatch):
    """With a one-row block budget, select(selection="target") builds every per-example gradient
    one output row at a time (batch and target), and never the whole-gradient path."""
    torch.manual_seed(0)
    model = TwoLayer()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    take_steps(inner, model, 2)
    inner.zero_grad()
    opt = CoresetOptimizer(
        inner,
        model,
        coreset_size=3,
        selection="target",
        curvature=2.0,
        sketch_dim=6,
        sketch_modules=["fc1", "fc2"],
        sketch_block_bytes=1,
        sketch_batch_size=16,
    )
    widths = []
    real = streaming.linear_grad_block

    def spy(calls, rows, with_bias, out=None):
        weight, bias = real(calls, rows, with_bias, out=out)
        widths.append((weight.shape[0], weight.shape[1]))
        return weight, bias

    def whole(*args, **kwargs):
        raise AssertionError("a whole per-example gradient was built")

    monkeypatch.setattr(streaming, "linear_grad_block", spy)
    monkeypatch.setattr(sketch_module, "linear_per_example_grads", whole)
    opt.selection.set_target(make_batch(3, tokens=2, seed=2))
    cs = opt.select(make_batch(10, tokens=2, seed=1), regression_loss(model))
    assert len(cs.indices) == 3
    # target (3 examples) then batch (10): fc1 = 4 rows of 5 inputs, fc2 = 3 rows of 4, one per block
    assert widths == [(3, 5)] * 4 + [(3, 4)] * 3 + [(10, 5)] * 4 + [(10, 4)] * 3


def test_select_target_same_coreset_for_any_block_budget():
    """select() with a one-row block budget picks what one block per layer picks."""
    picks = []
    for block in (1, 10**9):
        torch.manual_seed(0)
        model = TwoLayer()
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
        take_steps(inner, model, 2)
        inner.zero_grad()
        opt = CoresetOptimizer(
            inner,
            model,
            coreset_size=4,
            selection="target",
            curvature=50.0,
            sketch_dim=8,
            sketch_modules=["fc1", "fc2"],
            sketch_block_bytes=block,
        )
        opt.selection.set_target(make_batch(4, tokens=2, seed=4))
        cs = opt.select(make_batch(12, tokens=2, seed=3), regression_loss(model))
        picks.append((cs.indices, opt.selection.cache["grad"]))
    assert torch.equal(picks[0][0], picks[1][0])
    torch.testing.assert_close(picks[0][1], picks[1][1])


def test_zero_step_size_gives_zero_rows_like_whole_rows():
    """A zero learning rate (an infinite divisor of the update): zero rows, valid, as whole rows give."""
    model, opt = _setup()
    targets = resolve_sketch_modules(model, opt, ["fc1", "fc2"])
    params = sketch_params(targets)
    batch = make_batch(5, seed=1)
    g_t = torch.randn(sum(p.numel() for p in params))
    for dim in (5, 10**4):
        got, _, valid = target_sketches(
            BatchPass(model, targets, batch, regression_loss(model), 5, None),
            optimizer=opt,
            normalize="adam",
            target_grad=g_t,
            step_sizes=[0.0] * len(params),
            curvature=1.0,
            dim=dim,
            seed=0,
            block_bytes=1,
        )
        assert valid.all()
        torch.testing.assert_close(got, torch.zeros_like(got), rtol=0, atol=0)
