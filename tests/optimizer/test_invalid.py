"""Examples with a non-finite loss or sketch: never selected, counted, training goes on."""

import pytest
import torch

from core_utils import Snapshot, build, make_batch, regression_loss, take_steps, weighted_grad_reference


def _bad_batch():
    batch = make_batch(12)
    batch["x"][2, 0] = float("nan")
    batch["x"][5] = float("inf")
    batch["y"][7, 1] = float("-inf")
    return batch, [0, 1, 3, 4, 6, 8, 9, 10, 11]


@pytest.mark.parametrize("size", [4, 9, 12, 30])
@pytest.mark.parametrize("chunk", [None, 5])
def test_nonfinite_losses_never_selected(size, chunk):
    model, opt, wrapper = build(coreset_size=size, sketch_batch_size=chunk, micro_batch_size=chunk)
    take_steps(opt, model, 2)
    opt.zero_grad()
    batch, good = _bad_batch()
    loss_fn = regression_loss(model)
    cs = wrapper.select(batch, loss_fn)
    assert cs.num_invalid == 3 and cs.num_valid == 9
    assert set(cs.indices.tolist()) <= set(good)
    assert len(cs) == min(size, 9)
    torch.testing.assert_close(cs.weights.sum(), torch.tensor(9.0))
    assert cs.source_counts["all"].in_batch == 12 and cs.source_counts["all"].selected == len(cs)
    ref = weighted_grad_reference(model, batch, loss_fn, cs.indices, cs.weights, 9)
    for p, g in ref.items():
        assert bool(torch.isfinite(p.grad).all())
        torch.testing.assert_close(p.grad, g)
    if size < 9:
        assert bool(torch.isnan(cs.sketches[[2, 5, 7]]).all())
        assert bool(torch.isfinite(cs.sketches[good]).all())
    wrapper.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_finite_loss_with_nonfinite_sketch_is_invalid():
    """loss = ||out - y|| has an undefined (NaN) gradient where out == y."""
    model, opt, wrapper = build(coreset_size=3, bias=False, selection="gradient_matching")
    batch = make_batch(8)
    batch["x"][4] = 0.0  # bias-free model: output 0
    batch["y"][4] = 0.0  # loss 0 (finite), gradient 0/0

    def loss_fn(b):
        return (model(b["x"]) - b["y"]).pow(2).sum(1).sqrt()

    cs = wrapper.select(batch, loss_fn)
    assert bool(torch.isfinite(cs.losses).all())
    assert cs.num_invalid == 1 and 4 not in cs.indices.tolist()
    torch.testing.assert_close(cs.weights.sum(), torch.tensor(7.0))
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())


@pytest.mark.parametrize("size", [3, 20])
def test_all_invalid_raises_and_changes_nothing(size):
    model, opt, wrapper = build(coreset_size=size)
    take_steps(opt, model, 2)
    wrapper.select(make_batch(8), regression_loss(model))  # .grad holds something already
    snap = Snapshot(model, opt)
    batch = make_batch(8)
    batch["x"][:] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        wrapper.select(batch, regression_loss(model))
    snap.assert_unchanged()
    assert wrapper.num_selections == 1


def test_all_invalid_after_normalization_raises_clearly():
    """eps=0 and a zero second moment make every normalized sketch infinite."""
    model, opt, wrapper = build(coreset_size=3, opt_kwargs={"eps": 0.0}, selection="gradient_matching")
    for p in model.parameters():  # the state of a step whose gradients were all zero
        opt.state[p] = {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
    snap = Snapshot(model, opt)
    with pytest.raises(ValueError, match="finite"):
        wrapper.select(make_batch(8), regression_loss(model))
    snap.assert_unchanged()
