"""select() with selection="target": the coreset the hand-built Taylor model picks, the gradient it
backpropagates, the target's options (refresh, per-source), bad inputs and exact resume."""

from __future__ import annotations

import copy

import pytest
import torch

from coreset_optim import CoresetOptimizer
from coreset_optim.methods.target import greedy_target
from core_utils import (
    Snapshot,
    TwoLayer,
    make_batch,
    per_example_grads_loop,
    regression_loss,
    take_steps,
    weighted_grad_reference,
)

LR, BETAS, EPS = 0.05, (0.8, 0.99), 1e-6


def _setup(steps=2, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = TwoLayer()
    inner = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS)
    take_steps(inner, model, steps)
    inner.zero_grad()
    kwargs.setdefault("coreset_size", 4)
    return model, inner, CoresetOptimizer(inner, model, selection="target", **kwargs)


def _hand_choice(model, inner, batch, target, k, curvature, n):
    """The greedy on inputs built by hand: batch-size-1 gradients of fc2, Adam's P and step size."""
    loss_fn = regression_loss(model)
    params = [model.fc2.weight, model.fc2.bias]
    grads = per_example_grads_loop(model, params, batch, loss_fn, n)
    tgrad = per_example_grads_loop(model, params, target, loss_fn, target["x"].shape[0]).mean(0)
    if inner.state:
        t = int(inner.state[params[0]]["step"])
        v = torch.cat([inner.state[p]["exp_avg_sq"].reshape(-1) for p in params])
        precond = 1.0 / ((v / (1 - BETAS[1] ** t)).sqrt() + EPS)
    else:
        t, precond = 0, torch.ones(grads.shape[1])
    updates = LR * (1 - BETAS[0]) / (1 - BETAS[0] ** (t + 1)) * precond * grads
    chosen, _ = greedy_target(updates @ tgrad, updates, k, 1 / k, curvature)
    return sorted(chosen.tolist())


@pytest.mark.parametrize("curvature", [0.0, 3e3])
@pytest.mark.parametrize("steps", [0, 2])
def test_select_picks_the_hand_built_greedy_and_backpropagates_it(curvature, steps):
    model, inner, opt = _setup(steps=steps, curvature=curvature)
    batch, target = make_batch(10, seed=5), make_batch(3, seed=6)
    expected = _hand_choice(model, inner, batch, target, 4, curvature, 10)
    opt.selection.set_target(target)
    cs = opt.select(batch, regression_loss(model))
    assert cs.indices.tolist() == expected
    torch.testing.assert_close(cs.weights, torch.full((4,), 10 / 4))
    assert float(cs.weights.sum()) == pytest.approx(cs.num_valid)
    ref = weighted_grad_reference(model, batch, regression_loss(model), cs.indices, cs.weights, cs.num_valid)
    for p, g in ref.items():
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    assert cs.timings["prepare"] > 0


def test_curvature_changes_the_choice_somewhere():
    """The second-order term is live: on some batch a large curvature picks differently."""
    model, inner, opt = _setup()
    differs = 0
    for seed in range(6):
        batch, target = make_batch(10, seed=20 + seed), make_batch(3, seed=40 + seed)
        a = _hand_choice(model, inner, batch, target, 4, 0.0, 10)
        b = _hand_choice(model, inner, batch, target, 4, 1e5, 10)
        differs += a != b
    assert differs > 0


def test_global_selection_ignores_source_budgets_and_reports_counts():
    model, inner, opt = _setup(coreset_size=4, per_source=False)
    batch, target = make_batch(10, seed=5), make_batch(3, seed=6)
    sources = ["a"] * 7 + ["b"] * 3
    expected = _hand_choice(model, inner, batch, target, 4, 0.0, 10)
    opt.selection.set_target(target)
    cs = opt.select(batch, regression_loss(model), sources=sources)
    assert cs.indices.tolist() == expected
    assert cs.source_counts["a"].selected == sum(i < 7 for i in expected)
    assert cs.source_counts["b"].selected == sum(i >= 7 for i in expected)
    assert not any(c.kept_whole for c in cs.source_counts.values())


def test_per_source_selection_runs_the_greedy_within_each_budget():
    model, inner, opt = _setup(coreset_size=4, keep_sources=None)  # per-source budgets: the default
    batch, target = make_batch(12, seed=7), make_batch(3, seed=8)
    sources = ["a"] * 6 + ["b"] * 6
    opt.selection.set_target(target)
    cs = opt.select(batch, regression_loss(model), sources=sources)
    assert cs.source_counts["a"].selected == cs.source_counts["b"].selected == 2
    for lo, hi in ((0, 6), (6, 12)):
        part = {k: v[lo:hi] for k, v in batch.items()}
        chosen = [i + lo for i in _hand_choice(model, inner, part, target, 2, 0.0, 6)]
        assert [i for i in cs.indices.tolist() if lo <= i < hi] == chosen
    torch.testing.assert_close(cs.weights, torch.full((4,), 3.0))


def test_set_target_is_used_and_refreshed_every_n_selections():
    model, inner, opt = _setup(refresh=3)
    target = make_batch(3, seed=6)
    opt.selection.set_target(target)
    seen = []
    for s in range(7):
        cs = opt.select(make_batch(10, seed=50 + s), regression_loss(model))
        opt.step()
        opt.zero_grad()
        seen.append(opt.selection.cache["computed_at"])
        assert "prepare" in cs.timings
    assert seen == [0, 0, 0, 3, 3, 3, 6]
    opt.selection.set_target(make_batch(3, seed=99))  # a new target: refreshed at once
    opt.select(make_batch(10, seed=70), regression_loss(model))
    assert opt.selection.cache["computed_at"] == 7


def test_cached_target_gradient_is_the_one_of_its_step():
    """With refresh > 1, later selections align with the gradient computed at the refresh."""
    model, inner, opt = _setup(refresh=2)
    target = make_batch(3, seed=6)
    opt.selection.set_target(target)
    opt.select(make_batch(10, seed=1), regression_loss(model))
    cached = opt.selection.cache["grad"].clone()
    opt.step()
    opt.zero_grad()
    opt.select(make_batch(10, seed=2), regression_loss(model))
    torch.testing.assert_close(opt.selection.cache["grad"], cached, rtol=0, atol=0)
    params = [model.fc2.weight, model.fc2.bias]
    now = per_example_grads_loop(model, params, target, regression_loss(model), 3).mean(0)
    assert not torch.allclose(now, cached)  # the model moved: a refresh would differ


def _train(model, opt, steps, first_seed):
    picks = []
    for s in range(steps):
        cs = opt.select(make_batch(10, seed=first_seed + s), regression_loss(model))
        opt.step()
        opt.zero_grad()
        picks.append(cs.indices.clone())
    return picks


@pytest.mark.parametrize("refresh", [1, 3])
def test_exact_resume(refresh):
    target = make_batch(3, seed=6)
    model_a, inner_a, opt_a = _setup(refresh=refresh, curvature=1e3)
    opt_a.selection.set_target(target)
    _train(model_a, opt_a, 4, 0)
    sd, msd = copy.deepcopy(opt_a.state_dict()), copy.deepcopy(model_a.state_dict())
    model_b, inner_b, opt_b = _setup(seed=5, refresh=refresh, curvature=1e3)
    opt_b.selection.set_target(copy.deepcopy(target))
    model_b.load_state_dict(msd)
    opt_b.load_state_dict(sd)
    assert opt_b.config == opt_a.config
    assert opt_b.selection.cache["computed_at"] == opt_a.selection.cache["computed_at"] == 3
    torch.testing.assert_close(opt_b.selection.cache["grad"], opt_a.selection.cache["grad"], rtol=0, atol=0)
    picks_a, picks_b = _train(model_a, opt_a, 1, 100), _train(model_b, opt_b, 1, 100)
    # The restored cache is used (refresh 3: selection 4 reuses selection 3's target gradient).
    assert opt_b.selection.cache["computed_at"] == opt_a.selection.cache["computed_at"] == (3 if refresh == 3 else 4)
    picks_a += _train(model_a, opt_a, 4, 101)
    picks_b += _train(model_b, opt_b, 4, 101)
    assert [p.tolist() for p in picks_a] == [p.tolist() for p in picks_b]
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


# --- bad inputs: a clear error, nothing changed ---------------------------------------------


@pytest.fixture
def armed():
    model, inner, opt = _setup()
    opt.selection.set_target(make_batch(3, seed=6))
    opt.select(make_batch(10, seed=9), regression_loss(model))  # .grad and a cached target exist
    return model, inner, opt


def _bad_targets():
    nan = make_batch(3, seed=6)
    nan["x"][1, 0] = float("nan")
    return [
        ({"x": torch.empty(0, 5), "y": torch.empty(0, 3)}, ValueError, "empty"),
        (nan, ValueError, r"target examples \[1\]"),
        ({"x": torch.randn(3, 5)}, ValueError, r"lacks the batch.s fields \[.y.\]"),
        ({"x": torch.randn(3, 5), "y": torch.randn(3, 3), "z": torch.randn(3)}, ValueError, "structure"),
        ({"x": torch.randn(3, 2, 5), "y": torch.randn(3, 2, 3)}, ValueError, "structure"),
        ({"x": torch.randn(3, 5).double(), "y": torch.randn(3, 3).double()}, ValueError, "structure"),
        ((torch.randn(3, 5), torch.randn(3, 3)), ValueError, "structure"),
    ]


@pytest.mark.parametrize("target,error,match", _bad_targets())
def test_bad_target_in_select(armed, target, error, match):
    model, inner, opt = armed
    snap = Snapshot(model, inner)
    cache = copy.deepcopy(opt.selection.cache)
    selections, rng = opt.num_selections, opt.generator.get_state()
    with pytest.raises(error, match=match):
        opt.selection.set_target(target)
        opt.select(make_batch(10, seed=10), regression_loss(model))
    snap.assert_unchanged()
    assert opt.num_selections == selections and torch.equal(opt.generator.get_state(), rng)
    assert opt.selection.cache["fingerprint"] == cache["fingerprint"]
    torch.testing.assert_close(opt.selection.cache["grad"], cache["grad"], rtol=0, atol=0)


def test_missing_target_and_target_without_target_mode():
    model, inner, opt = _setup()
    snap = Snapshot(model, inner)
    with pytest.raises(ValueError, match="set_target"):
        opt.select(make_batch(10), regression_loss(model))
    snap.assert_unchanged()
    other = CoresetOptimizer(inner, model, coreset_size=4)
    assert not hasattr(other.selection, "set_target")  # only the target method holds a target
    snap.assert_unchanged()
    with pytest.raises(ValueError, match="empty"):
        opt.selection.set_target({"x": torch.empty(0, 5), "y": torch.empty(0, 3)})
    assert opt.selection.target is None


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"curvature": -1.0}, "curvature"),
        ({"curvature": float("inf")}, "curvature"),
        ({"curvature": "1"}, "curvature"),
        ({"refresh": 0}, "refresh"),
        ({"refresh": 1.5}, "refresh"),
        ({"sketch": "zeroth_order"}, "exact"),
        ({"normalize": "adam_update"}, "adam_update"),
    ],
)
def test_bad_target_options(kwargs, match):
    model = TwoLayer()
    inner = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match=match):
        CoresetOptimizer(inner, model, coreset_size=4, selection="target", **kwargs)
    with pytest.raises(TypeError, match="per_source"):
        CoresetOptimizer(inner, model, coreset_size=4, selection="target", per_source=1)


def test_source_field_may_be_absent_from_the_target():
    model, inner, opt = _setup(source_key="source")
    batch = make_batch(10, seed=5) | {"source": ["a"] * 5 + ["b"] * 5}
    opt.selection.set_target(make_batch(3, seed=6))
    cs = opt.select(batch, regression_loss(model))
    assert len(cs) == 4


def test_target_may_lack_fields_loss_fn_does_not_read():
    model, inner, opt = _setup()
    batch = make_batch(10, seed=5) | {"meta": torch.arange(10)}
    opt.selection.set_target(make_batch(3, seed=6))
    cs = opt.select(batch, regression_loss(model))
    assert len(cs) == 4
