"""Adam normalization of sketches, against hand-written formulas and real optimizer steps."""

import copy

import pytest
import torch
from torch import nn

from coreset_optim import CoresetOptimizer
from coreset_optim.precondition.moments import read_adam_moments
from coreset_optim.precondition.normalize import normalize_sketches
from core_utils import (
    TwoLayer,
    assert_state_dicts_equal,
    make_batch,
    per_example_grads_loop,
    regression_loss,
    take_steps,
)


def _model_and_adam(amsgrad=False, steps=3, opt_cls=torch.optim.Adam):
    torch.manual_seed(0)
    model = TwoLayer()
    opt = opt_cls(
        [
            {"params": model.fc1.parameters()},
            {"params": model.fc2.parameters(), "betas": (0.8, 0.95), "eps": 1e-3},
        ],
        lr=1e-2,
        amsgrad=amsgrad,
    )
    if amsgrad:  # a large first gradient, so max_exp_avg_sq differs from exp_avg_sq later
        for p in model.parameters():
            p.grad = 10 * torch.randn_like(p)
        opt.step()
        steps -= 1
    take_steps(opt, model, steps)
    return model, opt


def _by_hand_adam(sketches, opt, params, use_max=False):
    blocks, start = [], 0
    for p in params:
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        state = opt.state[p]
        v = state["max_exp_avg_sq" if use_max else "exp_avg_sq"]
        t = float(state["step"])
        beta2, eps = group["betas"][1], group["eps"]
        block = sketches[:, start : start + p.numel()]
        start += p.numel()
        blocks.append(block / ((v.flatten() / (1 - beta2**t)).sqrt() + eps))
    return torch.cat(blocks, 1)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_mode_by_hand(amsgrad):
    model, opt = _model_and_adam(amsgrad)
    params = list(model.parameters())
    g = torch.randn(5, sum(p.numel() for p in params))
    got = normalize_sketches(g, opt, params, "adam")
    torch.testing.assert_close(got, _by_hand_adam(g, opt, params, use_max=amsgrad))
    if amsgrad:
        assert not torch.allclose(got, _by_hand_adam(g, opt, params, use_max=False))


def _by_hand_adam_update(sketches, opt, params):
    blocks, start = [], 0
    for p in params:
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        state = opt.state[p]
        b1, b2 = group["betas"]
        eps, t = group["eps"], float(state["step"]) + 1
        g = sketches[:, start : start + p.numel()]
        start += p.numel()
        m = b1 * state["exp_avg"].flatten() + (1 - b1) * g
        v = b2 * state["exp_avg_sq"].flatten() + (1 - b2) * g**2
        if group["amsgrad"]:
            v = torch.maximum(v, state["max_exp_avg_sq"].flatten())
        blocks.append((m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + eps))
    return torch.cat(blocks, 1)


def _update_by_stepping(sketches, opt, params):
    """Row i: the update a deep copy of the optimizer makes when example i's gradient alone is
    the next gradient (lr = 1, no weight decay)."""
    rows = []
    for i in range(sketches.shape[0]):
        twin_opt, twin_params = copy.deepcopy((opt, params))
        for group in twin_opt.param_groups:
            group["lr"], group["weight_decay"] = 1.0, 0.0
        start = 0
        for q in twin_params:
            q.grad = sketches[i, start : start + q.numel()].reshape(q.shape).clone()
            start += q.numel()
        before = [q.detach().clone() for q in twin_params]
        twin_opt.step()
        rows.append(torch.cat([(b - q.detach()).flatten() for b, q in zip(before, twin_params)]))
    return torch.stack(rows)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_update_mode_by_hand_and_by_stepping(amsgrad):
    model, opt = _model_and_adam(amsgrad)
    params = list(model.parameters())
    g = torch.randn(4, sum(p.numel() for p in params))
    got = normalize_sketches(g, opt, params, "adam_update")
    torch.testing.assert_close(got, _by_hand_adam_update(g, opt, params))
    torch.testing.assert_close(got, _update_by_stepping(g, opt, params), atol=1e-5, rtol=1e-4)


def test_before_first_step():
    torch.manual_seed(0)
    model = TwoLayer()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-3)
    params = list(model.parameters())
    g = torch.randn(4, sum(p.numel() for p in params))
    # documented: "adam" leaves sketches raw before the first step (no second moment yet)
    torch.testing.assert_close(normalize_sketches(g, opt, params, "adam"), g, rtol=0, atol=0)
    # "adam_update" is Adam's first update: g / (|g| + eps)
    got = normalize_sketches(g, opt, params, "adam_update")
    torch.testing.assert_close(got, g / (g.abs() + 1e-3))
    torch.testing.assert_close(got, _update_by_stepping(g, opt, params), atol=1e-5, rtol=1e-4)
    assert len(opt.state) == 0  # nothing written: Adam's lazy initialization still works
    assert normalize_sketches(g, opt, params, None) is g


@pytest.mark.parametrize("mode", ["adam", "adam_update", None])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_leaves_sketches_raw(mode, momentum):
    torch.manual_seed(0)
    model = TwoLayer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    take_steps(opt, model, 2)
    params = list(model.parameters())
    g = torch.randn(3, sum(p.numel() for p in params))
    torch.testing.assert_close(normalize_sketches(g, opt, params, mode), g, rtol=0, atol=0)


def test_read_adam_moments_exact():
    model, opt = _model_and_adam(amsgrad=True)
    for p in model.parameters():
        m = read_adam_moments(opt, p)
        s = opt.state[p]
        torch.testing.assert_close(m.exp_avg, s["exp_avg"], rtol=0, atol=0)
        torch.testing.assert_close(m.exp_avg_sq, s["exp_avg_sq"], rtol=0, atol=0)
        torch.testing.assert_close(m.denominator_sq, s["max_exp_avg_sq"], rtol=0, atol=0)
        assert m.step == 3


@pytest.mark.parametrize("mode", ["adam", "adam_update", None])
@pytest.mark.parametrize("steps", [0, 3])
@pytest.mark.parametrize("opt_cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD])
def test_select_never_writes_optimizer_state(mode, steps, opt_cls):
    torch.manual_seed(0)
    model = TwoLayer()
    opt = opt_cls(model.parameters(), lr=1e-2)
    take_steps(opt, model, steps)
    opt.zero_grad()
    wrapper = CoresetOptimizer(opt, model, coreset_size=3, normalize=mode)
    before = copy.deepcopy(opt.state_dict())
    keys = {id(p): sorted(s) for p, s in opt.state.items()}
    wrapper.select(make_batch(9), regression_loss(model))
    assert {id(p): sorted(s) for p, s in opt.state.items()} == keys
    assert_state_dicts_equal(opt.state_dict(), before)


@pytest.mark.parametrize("mode", ["adam", "adam_update"])
def test_select_sketches_are_normalized_per_example_grads(mode):
    """Coreset.sketches (sketch_dim >= D keeps every coordinate) == loop grads, normalized."""
    model, opt = _model_and_adam(amsgrad=False)
    opt.zero_grad()
    wrapper = CoresetOptimizer(opt, model, coreset_size=3, normalize=mode, selection="gradient_matching")
    batch, loss_fn = make_batch(8), regression_loss(model)
    params = [model.fc2.weight, model.fc2.bias]
    raw = per_example_grads_loop(model, params, batch, loss_fn, 8)
    expected = _by_hand_adam(raw, opt, params) if mode == "adam" else _by_hand_adam_update(raw, opt, params)
    cs = wrapper.select(batch, loss_fn)
    torch.testing.assert_close(cs.sketches, expected)


@pytest.mark.parametrize("mode", ["adam", "adam_update"])
def test_betas_and_eps_without_second_moment_stay_raw(mode):
    """Adamax has betas and eps but keeps exp_inf, not exp_avg_sq: raw once it has state."""
    torch.manual_seed(0)
    model = TwoLayer()
    opt = torch.optim.Adamax(model.parameters(), lr=1e-2)
    take_steps(opt, model, 2)
    params = list(model.parameters())
    g = torch.randn(3, sum(p.numel() for p in params))
    torch.testing.assert_close(normalize_sketches(g, opt, params, mode), g, rtol=0, atol=0)


def test_parameter_without_state_yet_in_a_stepped_adam():
    """A parameter added after the first steps has no state: raw under "adam" while the others
    are normalized, Adam's first update under "adam_update"."""
    model, opt = _model_and_adam()
    extra = nn.Parameter(torch.randn(3))
    opt.add_param_group({"params": [extra], "eps": 1e-3})
    params = [model.fc2.weight, extra]
    g = torch.randn(4, model.fc2.weight.numel() + 3)
    got = normalize_sketches(g, opt, params, "adam")
    torch.testing.assert_close(got[:, :-3], _by_hand_adam(g[:, :-3], opt, params[:1]))
    torch.testing.assert_close(got[:, -3:], g[:, -3:], rtol=0, atol=0)
    got = normalize_sketches(g, opt, params, "adam_update")
    torch.testing.assert_close(got[:, -3:], g[:, -3:] / (g[:, -3:].abs() + 1e-3))
    assert extra not in opt.state
