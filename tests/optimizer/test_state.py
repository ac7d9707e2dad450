"""Checkpoints, deepcopy, repr and LR schedulers on the wrapper."""

import copy
from pathlib import Path
import io
import pickle
import warnings

import pytest
import torch

from coreset_optim import CoresetOptimizer
from core_utils import Snapshot, TwoLayer, build, make_batch, regression_loss
from selection_grid import SOURCES


def _train(model, wrapper, steps, first_seed):
    """select()+step() on fixed batches; returns each step's (indices, weights)."""
    picks = []
    for s in range(steps):
        batch = make_batch(12, seed=first_seed + s)
        cs = wrapper.select(batch, regression_loss(model))
        wrapper.step()
        wrapper.zero_grad()
        picks.append((cs.indices.clone(), cs.weights.clone()))
    return picks


def _round_trip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu")  # weights_only=True by default: must load


@pytest.mark.parametrize("via_file,amsgrad", [(False, False), (True, True)])
def test_state_dict_round_trip_mid_training(via_file, amsgrad):
    kw = dict(coreset_size=4, selection="facility_location", similarity="l1", opt_kwargs={"amsgrad": amsgrad})
    model_a, opt_a, wrap_a = build(seed=0, **kw)
    torch.randint(10, (3,), generator=wrap_a.generator)  # the wrapper's RNG has moved on
    _train(model_a, wrap_a, 20, first_seed=0)
    sd, model_sd = wrap_a.state_dict(), model_a.state_dict()
    if via_file:
        sd, model_sd = _round_trip(sd), _round_trip(model_sd)
    else:
        sd, model_sd = copy.deepcopy(sd), copy.deepcopy(model_sd)
    model_b, opt_b, wrap_b = build(seed=123, **kw)  # fresh objects, different init
    model_b.load_state_dict(model_sd)
    wrap_b.load_state_dict(sd)
    assert wrap_b.num_steps == 20 and wrap_b.num_selections == 20
    assert wrap_b.config == wrap_a.config
    assert torch.equal(wrap_b.generator.get_state(), wrap_a.generator.get_state())
    picks_a = _train(model_a, wrap_a, 20, first_seed=100)
    picks_b = _train(model_b, wrap_b, 20, first_seed=100)
    for (ia, wa), (ib, wb) in zip(picks_a, picks_b):
        torch.testing.assert_close(ib, ia, rtol=0, atol=0)
        torch.testing.assert_close(wb, wa, rtol=0, atol=0)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)
    for p, q in zip(model_a.parameters(), model_b.parameters()):
        for key in opt_a.state[p]:
            torch.testing.assert_close(opt_b.state[q][key], opt_a.state[p][key], rtol=0, atol=0)


def test_load_restores_saved_config_and_plain_state_dict_loads():
    model_a, opt_a, wrap_a = build(
        coreset_size=5, selection="facility_location", similarity="cosine", normalize="adam_update"
    )
    _train(model_a, wrap_a, 2, first_seed=0)
    model_b, opt_b, wrap_b = build(coreset_size=3)
    sd = wrap_a.state_dict()
    wrap_b.load_state_dict(sd)
    assert wrap_b.config == wrap_a.config
    assert wrap_b.selection == wrap_a.selection and wrap_b.selection.similarity == "cosine"
    assert wrap_b.selection is not wrap_a.selection
    assert "coreset_optim" in sd  # the caller's dict is not consumed
    # a plain optimizer state dict (no wrapper key) loads too and keeps the wrapper's options
    model_c, opt_c, wrap_c = build(coreset_size=3)
    wrap_c.load_state_dict(opt_a.state_dict())
    assert wrap_c.config.coreset_size == 3
    assert opt_c.state_dict()["state"].keys() == opt_a.state_dict()["state"].keys()


def test_state_dict_holds_wrapper_state_apart():
    model, opt, wrapper = build()
    _train(model, wrapper, 1, first_seed=0)
    sd = wrapper.state_dict()
    assert set(sd) == {"state", "param_groups", "coreset_optim"}
    assert sd["state"].keys() == opt.state_dict()["state"].keys()
    for per_param in sd["state"].values():
        assert set(per_param) == {"step", "exp_avg", "exp_avg_sq"}


def test_deepcopy_keeps_config_and_trains_identically():
    model, opt, wrapper = build(
        coreset_size=4, selection="facility_location", similarity="l2", sketch_modules=["fc1", "fc2"]
    )
    _train(model, wrapper, 3, first_seed=0)
    twin = copy.deepcopy(wrapper)
    assert twin.config == wrapper.config and twin.config is not wrapper.config
    assert twin.selection == wrapper.selection and twin.selection is not wrapper.selection
    assert twin.num_steps == 3
    twin_params = set(map(id, twin.model.parameters()))
    assert all(id(p) in twin_params for g in twin.param_groups for p in g["params"])
    assert [t.name for t in twin.sketch_layers] == ["fc1", "fc2"]
    assert all(any(t.module is m for m in twin.model.modules()) for t in twin.sketch_layers)
    pa = _train(model, wrapper, 2, first_seed=50)
    pb = _train(twin.model, twin, 2, first_seed=50)
    for (ia, wa), (ib, wb) in zip(pa, pb):
        assert torch.equal(ia, ib) and torch.equal(wa, wb)
    for p, q in zip(model.parameters(), twin.model.parameters()):
        assert p is not q
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def test_repr_and_isinstance():
    model, opt, wrapper = build(coreset_size=4)
    text = repr(wrapper)
    assert text.startswith("CoresetOptimizer(coreset_size=4")
    assert "fc2" in text and "AdamW" in text
    assert isinstance(wrapper, torch.optim.Optimizer)
    _, _, by_ratio = build(coreset_size=None, coreset_ratio=0.25)
    assert "coreset_ratio=0.25" in repr(by_ratio)


@pytest.mark.parametrize("kind", ["step", "lambda"])
def test_lr_scheduler_on_wrapper(kind):
    model, opt, wrapper = build(coreset_size=4, opt_kwargs={"lr": 0.1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if kind == "step":
            sched = torch.optim.lr_scheduler.StepLR(wrapper, step_size=2, gamma=0.5)
            expected = [0.1 * 0.5 ** ((s + 1) // 2) for s in range(6)]
        else:
            sched = torch.optim.lr_scheduler.LambdaLR(wrapper, lambda s: 1.0 / (1 + s))
            expected = [0.1 / (s + 2) for s in range(6)]
        for s in range(6):
            before = [p.detach().clone() for p in model.parameters()]
            wrapper.select(make_batch(8, seed=s), regression_loss(model))
            wrapper.step()
            wrapper.zero_grad()
            sched.step()
            assert opt.param_groups[0]["lr"] == pytest.approx(expected[s])
            assert wrapper.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
            assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    # and the scheduler's checkpoint round-trips alongside the wrapper's
    sched_sd = _round_trip(sched.state_dict())
    assert sched_sd["last_epoch"] == 6


def test_step_with_closure_and_delegation():
    torch.manual_seed(0)
    model = TwoLayer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    wrapper = CoresetOptimizer(opt, model, coreset_size=2)
    batch = make_batch(6)

    def closure():
        wrapper.zero_grad()
        loss = regression_loss(model)(batch).mean()
        loss.backward()
        return loss

    loss = wrapper.step(closure)
    assert torch.is_tensor(loss) and wrapper.num_steps == 1
    assert wrapper.state is opt.state and wrapper.defaults is opt.defaults
    extra = torch.nn.Parameter(torch.zeros(3))
    wrapper.add_param_group({"params": [extra]})
    assert len(opt.param_groups) == 2
    wrapper.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_hooks_registered_on_wrapper_run():
    model, opt, wrapper = build(coreset_size=3)
    calls = []
    handles = [
        wrapper.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
        wrapper.register_step_post_hook(lambda o, a, k: calls.append("post")),
        wrapper.register_state_dict_pre_hook(lambda o: calls.append("sd_pre")),
        wrapper.register_load_state_dict_post_hook(lambda o: calls.append("load_post")),
    ]
    wrapper.select(make_batch(6), regression_loss(model))
    wrapper.step()
    assert calls == ["pre", "post"]
    wrapper.load_state_dict(wrapper.state_dict())
    assert calls == ["pre", "post", "sd_pre", "load_post"]
    for h in handles:
        h.remove()
    wrapper.step()
    wrapper.state_dict()
    assert calls == ["pre", "post", "sd_pre", "load_post"]


def test_other_attributes_of_the_wrapped_optimizer_are_reachable():
    """e.g. schedule-free optimizers' train()/eval(), which training loops call on the optimizer."""
    model = torch.nn.Linear(3, 2)
    wrapper = CoresetOptimizer(WithModes(model.parameters(), lr=0.1), model, coreset_size=2)
    wrapper.eval()
    assert wrapper.optimizer.mode == "eval" and wrapper.mode == "eval"
    assert not hasattr(wrapper, "no_such_attribute")
    twin = copy.deepcopy(wrapper)
    twin.train()  # reaches the twin's own copy of the wrapped optimizer
    assert twin.mode == "train" and wrapper.mode == "eval"
    assert isinstance(pickle.loads(pickle.dumps(wrapper)), CoresetOptimizer)


class WithModes(torch.optim.SGD):
    """Stands in for a schedule-free optimizer: it has an eval() mode switch."""

    mode = "train"

    def eval(self):
        self.mode = "eval"

    def train(self):
        self.mode = "train"


# --- checkpoints written before selection methods were objects -----------------------------------

V0 = torch.load(Path(__file__).parents[1] / "data" / "checkpoint_v0.pt", weights_only=False)


@pytest.mark.parametrize("name", ["target", "colm"])
def test_checkpoint_of_the_flat_format_loads_and_resumes(name):
    """benchmarks/equivalence.py saved one step of each at commit f7384e5, and the coreset chosen
    next; today's code, loading it into a default-built optimizer, chooses the same."""
    saved = V0[name]
    torch.manual_seed(0)
    model = TwoLayer(5, 6, 3)
    model.load_state_dict(saved["model"])
    wrapper = CoresetOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, coreset_size=6)
    if name == "target":
        wrapper = CoresetOptimizer(wrapper.optimizer, model, coreset_size=6, selection="target")
        wrapper.selection.set_target(make_batch(4, 5, 3, seed=99))
    wrapper.load_state_dict(saved["optimizer"])
    if name == "target":
        assert (wrapper.selection.curvature, wrapper.selection.refresh) == (0.5, 3)
        assert wrapper.selection.cache["computed_at"] == 0  # the cached target gradient came along
    else:
        assert wrapper.selection.name == "facility_location"
        assert (wrapper.selection.sketch, wrapper.selection.sketch_dim) == ("zeroth_order", 9)
    wrapper.zero_grad()
    chosen = wrapper.select(make_batch(16, 5, 3, seed=1), regression_loss(model), sources=SOURCES)
    assert chosen.indices.tolist() == saved["next_indices"].tolist()
    torch.testing.assert_close(chosen.weights, saved["next_weights"], rtol=0, atol=0)


def test_checkpoint_of_an_unregistered_method_is_refused_before_anything_changes():
    model, opt, wrapper = build(coreset_size=4)
    _train(model, wrapper, 1, first_seed=0)
    sd = copy.deepcopy(wrapper.state_dict())
    sd["coreset_optim"]["selection"]["name"] = "my_rule"
    fresh_model, fresh_opt, fresh = build(coreset_size=4)
    snap = Snapshot(fresh_model, fresh_opt)
    with pytest.raises(ValueError, match="'my_rule', which is not registered"):
        fresh.load_state_dict(sd)
    snap.assert_unchanged()
    assert fresh.num_steps == 0 and fresh.selection.name == "anchored_consensus"


def test_checkpoint_of_another_method_replaces_the_method():
    model, opt, wrapper = build(coreset_size=4, selection="gradient_matching", sketch_dim=33)
    _train(model, wrapper, 1, first_seed=0)
    _, _, other = build(coreset_size=4, selection="loss")
    other.load_state_dict(wrapper.state_dict())
    assert type(other.selection) is type(wrapper.selection) and other.selection.sketch_dim == 33
