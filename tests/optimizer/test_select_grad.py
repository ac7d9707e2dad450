"""p.grad after select() == (1/N) * sum_j w_j grad(loss_j) over the returned indices/weights."""

import pytest
import torch

from core_utils import build, make_batch, regression_loss, take_steps, weighted_grad_reference


def _assert_grads(model, ref, scale=1.0):
    for p, g in ref.items():
        torch.testing.assert_close(p.grad, scale * g)


@pytest.mark.parametrize("normalize", ["adam", "adam_update", None])
@pytest.mark.parametrize("tokens", [None, 3])
def test_grad_equals_weighted_loop(normalize, tokens):
    model, opt, wrapper = build(normalize=normalize, coreset_size=4)
    take_steps(opt, model, 2)
    opt.zero_grad()
    batch, loss_fn = make_batch(12, tokens=tokens), regression_loss(model)
    cs = wrapper.select(batch, loss_fn)
    assert len(cs) == 4 and cs.num_valid == 12 and cs.num_invalid == 0
    assert torch.all(cs.indices[1:] > cs.indices[:-1])
    torch.testing.assert_close(cs.weights.sum(), torch.tensor(12.0))
    assert cs.sketches.shape[0] == 12
    ref = weighted_grad_reference(model, batch, loss_fn, cs.indices, cs.weights, 12)
    assert len(ref) == 4  # every parameter is trained
    _assert_grads(model, ref)
    # the coreset's loss estimate is the weighted mean of its losses
    per = loss_fn(batch).detach()
    torch.testing.assert_close(cs.loss, (cs.weights * per[cs.indices]).sum() / 12)
    torch.testing.assert_close(cs.losses, per)


def test_untrained_parameter_gets_no_grad_and_trained_match():
    model, opt, wrapper = build(coreset_size=3)
    model.fc1.weight.requires_grad_(False)
    batch, loss_fn = make_batch(10), regression_loss(model)
    cs = wrapper.select(batch, loss_fn)
    assert model.fc1.weight.grad is None and not model.fc1.weight.requires_grad
    _assert_grads(model, weighted_grad_reference(model, batch, loss_fn, cs.indices, cs.weights, 10))


@pytest.mark.parametrize("micro", [1, 2, 3])
def test_micro_batch_chunking_same_grad(micro):
    batch = make_batch(12)
    model_a, opt_a, wrap_a = build(coreset_size=5)
    model_b, opt_b, wrap_b = build(coreset_size=5, micro_batch_size=micro)
    take_steps(opt_a, model_a, 2)
    take_steps(opt_b, model_b, 2)
    opt_a.zero_grad()
    opt_b.zero_grad()
    calls = []

    def loss_b(b):
        calls.append(b["x"].shape[0])
        return regression_loss(model_b)(b)

    cs_a = wrap_a.select(batch, regression_loss(model_a))
    cs_b = wrap_b.select(batch, loss_b)
    assert max(calls) <= micro
    torch.testing.assert_close(cs_b.indices, cs_a.indices)
    torch.testing.assert_close(cs_b.weights, cs_a.weights)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad)
    _assert_grads(
        model_b, weighted_grad_reference(model_b, batch, regression_loss(model_b), cs_b.indices, cs_b.weights, 12)
    )


def test_two_selects_accumulate():
    model, opt, wrapper = build(coreset_size=4)
    take_steps(opt, model, 1)
    opt.zero_grad()
    loss_fn = regression_loss(model)
    b1, b2 = make_batch(10, seed=5), make_batch(8, seed=6)
    cs1 = wrapper.select(b1, loss_fn)
    cs2 = wrapper.select(b2, loss_fn)
    r1 = weighted_grad_reference(model, b1, loss_fn, cs1.indices, cs1.weights, 10)
    r2 = weighted_grad_reference(model, b2, loss_fn, cs2.indices, cs2.weights, 8)
    for p in r1:
        torch.testing.assert_close(p.grad, r1[p] + r2[p])
    assert wrapper.num_selections == 2


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_loss_scale(scale):
    model, opt, wrapper = build(coreset_size=4)
    batch, loss_fn = make_batch(9), regression_loss(model)
    cs = wrapper.select(batch, loss_fn, loss_scale=scale)
    _assert_grads(model, weighted_grad_reference(model, batch, loss_fn, cs.indices, cs.weights, 9), scale)
    with torch.no_grad():  # Coreset.loss estimates the batch's mean loss, without the scale
        torch.testing.assert_close(cs.loss, (cs.weights * loss_fn(batch)[cs.indices]).sum() / 9)


def test_coreset_size_at_least_batch_selects_all_with_weight_one():
    model, opt, wrapper = build(coreset_size=50)
    batch, loss_fn = make_batch(7), regression_loss(model)
    cs = wrapper.select(batch, loss_fn)
    torch.testing.assert_close(cs.indices, torch.arange(7))
    torch.testing.assert_close(cs.weights, torch.ones(7))
    opt2 = torch.optim.AdamW(model.parameters())
    grads = {p: p.grad.clone() for p in model.parameters()}
    opt2.zero_grad()
    loss_fn(batch).mean().backward()
    for p, g in grads.items():
        torch.testing.assert_close(g, p.grad)


def test_timings_reported():
    model, opt, wrapper = build(coreset_size=3)
    cs = wrapper.select(make_batch(8), regression_loss(model))
    # the default method's stages (normalization is part of the sketch stage), then facility
    # location's own; no gather in one process
    assert set(cs.timings) == {"prepare", "sketch", "compress", "weights", "backward", "total"}
    assert cs.timings["sketch"] > 0 and cs.timings["backward"] > 0
    assert cs.timings["total"] >= sum(v for k, v in cs.timings.items() if k != "total")
    _, _, fl = build(coreset_size=3, selection="facility_location")
    timings = fl.select(make_batch(8), regression_loss(fl.model)).timings
    assert {"similarity", "greedy", "weights"} <= set(timings)


@pytest.mark.parametrize("size", [4, 30])
def test_select_under_no_grad_still_backpropagates(size):
    model, opt, wrapper = build(coreset_size=size)
    batch, loss_fn = make_batch(12), regression_loss(model)
    with torch.no_grad():
        cs = wrapper.select(batch, loss_fn)
    _assert_grads(model, weighted_grad_reference(model, batch, loss_fn, cs.indices, cs.weights, 12))
