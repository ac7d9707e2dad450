"""Target-aware selection's math (coreset_optim/target.py) against brute force and a Taylor
expansion built from batch-size-1 gradient loops."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from coreset_optim.precondition.normalize import normalize_sketches
from coreset_optim.sketch.capture import exact_sketches, resolve_sketch_modules, sketch_params
from coreset_optim.methods.target import (
    greedy_target,
    predicted_decrease,
    scale_columns,
    step_sizes,
    target_coreset,
    target_gradient,
)
from core_utils import TwoLayer, make_batch, per_example_grads_loop, regression_loss


def _decrease(updates, target_grad, subset, coefficient, curvature):
    c = torch.zeros(updates.shape[0], dtype=torch.double)
    c[list(subset)] = coefficient
    return float(predicted_decrease(updates, target_grad, c, curvature))


def _random_case(n=7, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    updates = torch.randn(n, d, generator=g, dtype=torch.double)
    target = torch.randn(d, generator=g, dtype=torch.double)
    return updates, target, updates @ target


@pytest.mark.parametrize("seed", range(5))
def test_first_order_greedy_is_the_brute_force_optimum(seed):
    updates, target, a = _random_case(seed=seed)
    k, c = 3, 0.25
    chosen, gains = greedy_target(a, None, k, c, 0.0)
    best = max(itertools.combinations(range(7), k), key=lambda s: _decrease(updates, target, s, c, 0.0))
    assert sorted(chosen.tolist()) == sorted(best)
    torch.testing.assert_close(gains.sum().item(), _decrease(updates, target, best, c, 0.0))


@pytest.mark.parametrize("curvature", [0.3, 2.0, 20.0])
@pytest.mark.parametrize("seed", range(4))
def test_greedy_gains_are_brute_force_marginal_decreases(curvature, seed):
    """Each pick is the argmax over j of D(S + j) evaluated from scratch, and its gain is D(S + j) - D(S)."""
    updates, target, a = _random_case(seed=seed)
    k, c = 4, 1 / 3
    chosen, gains = greedy_target(a, updates, k, c, curvature)
    subset: list[int] = []
    for j, gain in zip(chosen.tolist(), gains.tolist()):
        before = _decrease(updates, target, subset, c, curvature)
        scores = [
            _decrease(updates, target, subset + [i], c, curvature) - before if i not in subset else -float("inf")
            for i in range(updates.shape[0])
        ]
        assert j == max(range(len(scores)), key=lambda i: (scores[i], -i))
        torch.testing.assert_close(gain, scores[j])
        subset.append(j)


def test_redundancy_term_avoids_a_duplicate_like_brute_force():
    """Two copies of the best-aligned update: first order takes both, the second-order term one."""
    updates = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.6, 0.6], [0.0, 1.0]], dtype=torch.double)
    target = torch.tensor([1.0, 0.5], dtype=torch.double)
    a = updates @ target
    first, _ = greedy_target(a, updates, 2, 0.5, 0.0)
    assert sorted(first.tolist()) == [0, 1]
    second, _ = greedy_target(a, updates, 2, 0.5, 1.0)
    best = max(itertools.combinations(range(4), 2), key=lambda s: _decrease(updates, target, s, 0.5, 1.0))
    assert sorted(second.tolist()) == sorted(best) == [0, 2]


def test_ties_go_to_the_lowest_index():
    a = torch.tensor([1.0, 2.0, 2.0, 0.5])
    chosen, _ = greedy_target(a, None, 2, 1.0, 0.0)
    assert chosen.tolist() == [1, 2]
    chosen, _ = greedy_target(a, torch.zeros(4, 3), 2, 1.0, 1.0)
    assert chosen.tolist() == [1, 2]


def test_selector_runs_the_greedy_with_the_group_mean_coefficient():
    updates, target, a = _random_case(n=6)
    x = torch.cat([a[:, None], updates], 1)
    chosen = target_coreset(x, 2, curvature=0.0, total=10)
    assert sorted(chosen.tolist()) == sorted(torch.topk(a, 2).indices.tolist())
    # With curvature, the selector runs the greedy on the update columns with c = (n / k) / N.
    chosen = target_coreset(x, 3, curvature=5.0, total=10)
    expected, _ = greedy_target(a, updates, 3, (6 / 3) / 10, 5.0)
    assert chosen.tolist() == expected.tolist()


def test_target_gradient_refuses_non_finite_and_empty():
    rows = torch.ones(3, 2)
    torch.testing.assert_close(target_gradient(rows, torch.zeros(3)), torch.ones(2))
    with pytest.raises(ValueError, match=r"target examples \[1\]"):
        target_gradient(rows, torch.tensor([0.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="empty"):
        target_gradient(torch.empty(0, 2), torch.empty(0))


def test_greedy_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        greedy_target(torch.zeros(3), None, 4, 1.0, 0.0)


# --- Against a Taylor expansion built from batch-size-1 gradients -------------------------------


def _trained_adamw(model, steps=3, lr=0.05, betas=(0.8, 0.99)):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, eps=1e-6, weight_decay=0.0)
    loss_fn = regression_loss(model)
    for s in range(steps):
        opt.zero_grad()
        loss_fn(make_batch(8, seed=100 + s)).mean().backward()
        opt.step()
    opt.zero_grad()
    return opt


def test_library_inputs_match_a_hand_built_taylor_model():
    """Alignment and updates from the library's sketch, normalize and step-size functions equal
    the hand formula from a batch-size-1 gradient loop and Adam's state read by hand."""
    torch.manual_seed(0)
    model = TwoLayer()
    lr, betas = 0.05, (0.8, 0.99)
    opt = _trained_adamw(model, lr=lr, betas=betas)
    loss_fn = regression_loss(model)
    batch, target = make_batch(9, seed=1), make_batch(4, seed=2)
    targets = resolve_sketch_modules(model, opt, None)
    params = sketch_params(targets)

    raw, _ = exact_sketches(model, targets, batch, loss_fn, 9, 4)
    traw, tlosses = exact_sketches(model, targets, target, loss_fn, 4, 3)
    updates = scale_columns(normalize_sketches(raw, opt, params, "adam"), params, step_sizes(opt, params))
    g_t = target_gradient(traw, tlosses)

    # Hand reference: per-example gradients by a loop, P = 1 / (sqrt(v_hat) + eps), eta by hand.
    grads = per_example_grads_loop(model, params, batch, loss_fn, 9)
    tgrad = per_example_grads_loop(model, params, target, loss_fn, 4).mean(0)
    t = int(opt.state[params[0]]["step"])
    v = torch.cat([opt.state[p]["exp_avg_sq"].reshape(-1) for p in params])
    precond = 1.0 / ((v / (1 - betas[1] ** t)).sqrt() + 1e-6)
    eta = lr * (1 - betas[0]) / (1 - betas[0] ** (t + 1))
    hand_updates = eta * precond * grads
    torch.testing.assert_close(updates, hand_updates, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(g_t, tgrad, rtol=1e-5, atol=1e-7)

    # The greedy's gains equal the hand-built model's marginal decreases.
    k, h = 3, 50.0
    c = (9 / k) / 9
    chosen, gains = greedy_target(updates @ g_t, updates, k, c, h)
    subset: list[int] = []
    for j, gain in zip(chosen.tolist(), gains.tolist()):
        step_before = c * hand_updates[subset].sum(0)
        step_after = step_before + c * hand_updates[j]
        model_before = tgrad @ step_before - h / 2 * step_before.square().sum()
        model_after = tgrad @ step_after - h / 2 * step_after.square().sum()
        torch.testing.assert_close(gain, float(model_after - model_before), rtol=1e-4, atol=1e-9)
        subset.append(j)


def test_first_order_term_predicts_the_target_loss_change():
    """Moving the sketched parameters by -sum c_j delta_j changes the target loss by -D to first order."""
    torch.manual_seed(1)
    model = TwoLayer()
    opt = _trained_adamw(model)
    loss_fn = regression_loss(model)
    batch, target = make_batch(8, seed=3), make_batch(5, seed=4)
    targets = resolve_sketch_modules(model, opt, None)
    params = sketch_params(targets)
    raw, _ = exact_sketches(model, targets, batch, loss_fn, 8, None)
    traw, tlosses = exact_sketches(model, targets, target, loss_fn, 5, None)
    normalized = normalize_sketches(raw, opt, params, "adam")
    g_t = target_gradient(traw, tlosses)
    coefficients = torch.zeros(8)
    coefficients[[0, 2, 5]] = 1 / 3
    errors = []
    for scale in (1e-2, 1e-3):
        updates = scale * normalized
        predicted = float(predicted_decrease(updates, g_t, coefficients, 0.0))
        step = coefficients @ updates
        with torch.no_grad():
            before = loss_fn(target).mean().item()
            offset = 0
            saved = [p.detach().clone() for p in params]
            for p in params:
                p -= step[offset : offset + p.numel()].reshape(p.shape)
                offset += p.numel()
            after = loss_fn(target).mean().item()
            for p, s in zip(params, saved):
                p.copy_(s)
        errors.append(abs((before - after) - predicted) / abs(predicted))
    assert errors[1] < 0.2 * errors[0] + 1e-4  # the error shrinks like the step: first order


def test_second_order_model_is_exact_for_a_quadratic_target():
    """For a target loss with Hessian h*I on the sketched weight, D(S) is the exact decrease."""
    torch.manual_seed(2)
    d_in, d_out, h = 4, 3, 0.7
    model = nn.Linear(d_in, d_out, bias=False)
    scale = h * d_in  # target: x = e_1..e_d, loss_i = scale/2 ||W x_i - y_i||^2 -> Hessian of the mean = h I

    def loss_fn(batch):
        return 0.5 * scale * (model(batch["x"]) - batch["y"]).pow(2).sum(1)

    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    targets = resolve_sketch_modules(model, opt, None)
    params = sketch_params(targets)
    batch = {"x": torch.randn(6, d_in), "y": torch.randn(6, d_out)}
    target = {"x": torch.eye(d_in), "y": torch.randn(d_in, d_out)}
    raw, _ = exact_sketches(model, targets, batch, loss_fn, 6, None)
    traw, tlosses = exact_sketches(model, targets, target, loss_fn, d_in, None)
    updates = scale_columns(normalize_sketches(raw, opt, params, "adam"), params, step_sizes(opt, params))
    g_t = target_gradient(traw, tlosses)
    chosen, gains = greedy_target(updates @ g_t, updates, 2, 1 / 2, h)
    coefficients = torch.zeros(6)
    coefficients[chosen] = 1 / 2
    with torch.no_grad():
        before = loss_fn(target).mean()
        model.weight -= (coefficients @ updates).reshape(model.weight.shape)
        after = loss_fn(target).mean()
    torch.testing.assert_close(float(before - after), float(gains.sum()), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(
        float(before - after), float(predicted_decrease(updates, g_t, coefficients, h)), rtol=1e-4, atol=1e-6
    )
