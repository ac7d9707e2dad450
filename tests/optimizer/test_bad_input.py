"""Every bad input: a ValueError/TypeError naming the argument, and nothing changed."""

import numpy as np
import pytest
import torch
from torch import nn

from coreset_optim import CoresetOptimizer
from core_utils import Snapshot, TwoLayer, build, make_batch, regression_loss, take_steps


@pytest.fixture
def trained():
    """A model with optimizer state and accumulated .grad, so 'unchanged' means something."""
    model, opt, wrapper = build(coreset_size=4, opt_kwargs={"amsgrad": True})
    take_steps(opt, model, 2)
    wrapper.select(make_batch(10, seed=9), regression_loss(model))
    return model, opt, wrapper


CONSTRUCTOR_CASES = [
    ({"coreset_size": 0}, ValueError, "coreset_size"),
    ({"coreset_size": -3}, ValueError, "coreset_size"),
    ({"coreset_size": 2.5}, TypeError, "coreset_size"),
    ({"coreset_size": 4.0}, TypeError, "coreset_size"),
    ({"coreset_size": True}, TypeError, "coreset_size"),
    ({"coreset_size": "4"}, TypeError, "coreset_size"),
    ({"coreset_size": None, "coreset_ratio": 0.0}, ValueError, "coreset_ratio"),
    ({"coreset_size": None, "coreset_ratio": -0.5}, ValueError, "coreset_ratio"),
    ({"coreset_size": None, "coreset_ratio": 1.5}, ValueError, "coreset_ratio"),
    ({"coreset_size": None, "coreset_ratio": float("nan")}, ValueError, "coreset_ratio"),
    ({"coreset_size": None, "coreset_ratio": True}, TypeError, "coreset_ratio"),
    ({"coreset_size": None, "coreset_ratio": "0.5"}, TypeError, "coreset_ratio"),
    ({"coreset_size": 4, "coreset_ratio": 0.5}, ValueError, "coreset_size.*coreset_ratio"),
    ({"coreset_size": None}, ValueError, "coreset_size.*coreset_ratio"),
    ({"sketch_modules": "nope"}, ValueError, "sketch_modules"),
    ({"sketch_modules": ["fc2", "fc9"]}, ValueError, "sketch_modules"),
    ({"sketch_modules": 3}, TypeError, "sketch_modules"),
    ({"sketch_modules": []}, ValueError, "sketch_modules"),
    ({"sketch_modules": [3]}, TypeError, "sketch_modules"),
    ({"sketch_modules": nn.Linear(2, 2)}, ValueError, "sketch_modules"),
    ({"sketch_modules": "("}, ValueError, "sketch_modules"),
    ({"normalize": "adamw"}, ValueError, "normalize"),
    ({"normalize": "Adam"}, ValueError, "normalize"),
    ({"selection": "facility_location", "similarity": "dot"}, ValueError, "similarity"),
    ({"selection": "facility_location", "similarity": None}, ValueError, "similarity"),
    ({"similarity": "l1"}, TypeError, "anchored_consensus.* takes no option .'similarity'"),  # facility location's
    ({"selection": "loss", "sketch_dim": 64}, TypeError, "'loss' takes no option .'sketch_dim'"),
    ({"selection": "lossy"}, ValueError, "selection must be"),
    ({"selection": 3}, ValueError, "selection must be"),
    ({"sketch_dim": 0}, ValueError, "sketch_dim"),
    ({"sketch_dim": 2.0}, ValueError, "sketch_dim"),
    ({"sketch_batch_size": 0}, ValueError, "sketch_batch_size"),
    ({"sketch_block_bytes": 0}, ValueError, "sketch_block_bytes"),
    ({"sketch_block_bytes": 1.5e6}, ValueError, "sketch_block_bytes"),
    ({"sketch_block_bytes": None}, ValueError, "sketch_block_bytes"),
    ({"micro_batch_size": -1}, ValueError, "micro_batch_size"),
    ({"micro_batch_size": 1.5}, ValueError, "micro_batch_size"),
    ({"keep_sources": "code"}, ValueError, "keep_sources"),
    ({"keep_sources": 3}, ValueError, "keep_sources"),
    ({"source_key": 3}, TypeError, "source_key"),
    ({"seed": "x"}, TypeError, "seed"),
]


@pytest.mark.parametrize("kwargs,exc,name", CONSTRUCTOR_CASES, ids=[repr(c[0]) for c in CONSTRUCTOR_CASES])
def test_bad_constructor_arguments(trained, kwargs, exc, name):
    model, opt, _ = trained
    snap = Snapshot(model, opt)
    kwargs = {"coreset_size": 4} | kwargs
    with pytest.raises(exc, match=name):
        CoresetOptimizer(opt, model, **kwargs)
    snap.assert_unchanged()


def test_untrained_sketch_module(trained):
    model, _, _ = trained
    opt = torch.optim.AdamW(model.fc1.parameters())
    snap = Snapshot(model, opt)
    with pytest.raises(ValueError, match="sketch_modules.*fc2.*not trained"):
        CoresetOptimizer(opt, model, coreset_size=2, sketch_modules="fc2")
    model.fc1.weight.requires_grad_(False)
    snap = Snapshot(model, opt)
    with pytest.raises(ValueError, match="sketch_modules.*fc1"):
        CoresetOptimizer(opt, model, coreset_size=2, sketch_modules=["fc1"])
    with pytest.raises(ValueError, match="sketch_modules"):  # the default finds no trained Linear
        CoresetOptimizer(opt, model, coreset_size=2)
    snap.assert_unchanged()


def test_non_linear_sketch_module():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters())
    snap = Snapshot(model, opt)
    with pytest.raises(TypeError, match="sketch_modules.*'1'.*LayerNorm"):
        CoresetOptimizer(opt, model, coreset_size=2, sketch_modules="1")
    with pytest.raises(TypeError, match="sketch_modules.*LayerNorm"):
        CoresetOptimizer(opt, model, coreset_size=2, sketch_modules=model[1])
    snap.assert_unchanged()


@pytest.mark.parametrize("bad", ["adam", None, [torch.zeros(2)], object()])
def test_wrapping_a_non_optimizer(bad):
    model = TwoLayer()
    with pytest.raises(TypeError, match="optimizer"):
        CoresetOptimizer(bad, model, coreset_size=2)


def test_wrapping_twice_and_bad_model():
    model, opt, wrapper = build()
    with pytest.raises(TypeError, match="optimizer"):
        CoresetOptimizer(wrapper, model, coreset_size=2)
    with pytest.raises(TypeError, match="model"):
        CoresetOptimizer(opt, [model], coreset_size=2)


def _loss(model):
    return regression_loss(model)


SELECT_CASES = {
    "empty dict batch": (
        lambda m: {"x": torch.zeros(0, 5), "y": torch.zeros(0, 3)},
        _loss,
        {},
        ValueError,
        "batch.*empty",
    ),
    "empty tensor batch": (
        lambda m: torch.zeros(0, 5),
        lambda m: lambda b: m(b).sum(1),
        {},
        ValueError,
        "batch.*empty",
    ),
    "no fields": (lambda m: {}, _loss, {}, ValueError, "batch"),
    "scalar field": (lambda m: {"x": torch.zeros(8, 5), "y": torch.tensor(1.0)}, _loss, {}, ValueError, "batch"),
    "odd field type": (lambda m: {"x": torch.zeros(8, 5), "y": 3}, _loss, {}, TypeError, "batch"),
    "dims disagree": (
        lambda m: {"x": torch.zeros(8, 5), "y": torch.zeros(7, 3)},
        _loss,
        {},
        ValueError,
        "batch.*disagree",
    ),
    "list field disagrees": (
        lambda m: {"x": torch.zeros(8, 5), "y": torch.zeros(8, 3), "ids": [1, 2]},
        _loss,
        {},
        ValueError,
        "batch.*disagree",
    ),
    "tuple dims disagree": (
        lambda m: (torch.zeros(8, 5), np.zeros((9, 3))),
        lambda m: lambda b: None,
        {},
        ValueError,
        "batch.*disagree",
    ),
    "sources wrong length": (lambda m: make_batch(8), _loss, {"sources": [0] * 7}, ValueError, "sources"),
    "sources tensor wrong length": (lambda m: make_batch(8), _loss, {"sources": torch.zeros(9)}, ValueError, "sources"),
    "sources a string": (lambda m: make_batch(8), _loss, {"sources": "abcdefgh"}, TypeError, "sources"),
    "sources an int": (lambda m: make_batch(8), _loss, {"sources": 3}, TypeError, "sources"),
    "loss scalar": (lambda m: make_batch(8), lambda m: lambda b: _loss(m)(b).mean(), {}, ValueError, "loss_fn"),
    "loss too short": (lambda m: make_batch(8), lambda m: lambda b: _loss(m)(b)[1:], {}, ValueError, "loss_fn"),
    "loss per token": (
        lambda m: make_batch(8),
        lambda m: lambda b: (m(b["x"]) - b["y"]) ** 2,
        {},
        ValueError,
        "loss_fn",
    ),
    "loss a list": (lambda m: make_batch(8), lambda m: lambda b: _loss(m)(b).tolist(), {}, TypeError, "loss_fn"),
    "loss a float": (lambda m: make_batch(8), lambda m: lambda b: 1.0, {}, TypeError, "loss_fn"),
    "loss integer": (
        lambda m: make_batch(8),
        lambda m: lambda b: torch.ones(len(b["x"]), dtype=torch.long),
        {},
        TypeError,
        "loss_fn",
    ),
    "loss under no_grad": (lambda m: make_batch(8), lambda m: torch.no_grad()(_loss(m)), {}, ValueError, "loss_fn"),
    "loss not callable": (lambda m: make_batch(8), lambda m: "mse", {}, TypeError, "loss_fn"),
    "loss_scale zero": (lambda m: make_batch(8), _loss, {"loss_scale": 0.0}, ValueError, "loss_scale"),
    "loss_scale nan": (lambda m: make_batch(8), _loss, {"loss_scale": float("nan")}, ValueError, "loss_scale"),
    "loss_scale str": (lambda m: make_batch(8), _loss, {"loss_scale": "2"}, TypeError, "loss_scale"),
}


@pytest.mark.parametrize("full", [False, True], ids=["sketch-path", "select-all-path"])
@pytest.mark.parametrize("case", list(SELECT_CASES))
def test_bad_select_arguments(trained, case, full):
    model, opt, wrapper = trained
    make, make_loss, kwargs, exc, name = SELECT_CASES[case]
    if full:
        wrapper = CoresetOptimizer(opt, model, coreset_size=64)
    snap = Snapshot(model, opt)
    with pytest.raises(exc, match=name):
        wrapper.select(make(model), make_loss(model), **kwargs)
    snap.assert_unchanged()


def test_source_key_missing(trained):
    model, opt, _ = trained
    wrapper = CoresetOptimizer(opt, model, coreset_size=3, source_key="src")
    snap = Snapshot(model, opt)
    with pytest.raises(ValueError, match="source_key.*'src'"):
        wrapper.select(make_batch(8), regression_loss(model))
    with pytest.raises(ValueError, match="source_key"):  # not a mapping at all
        wrapper.select(torch.zeros(8, 5), lambda b: regression_loss(model)({"x": b, "y": b[:, :3]}))
    snap.assert_unchanged()


def test_sketch_module_not_called(trained):
    model, opt, _ = trained
    wrapper = CoresetOptimizer(opt, model, coreset_size=3, sketch_modules="fc2", selection="gradient_matching")
    snap = Snapshot(model, opt)

    def loss_fn(b):  # never calls fc2
        return model.fc1(b["x"]).pow(2).mean(1)

    with pytest.raises(ValueError, match="sketch module"):
        wrapper.select(make_batch(8), loss_fn)
    snap.assert_unchanged()


@pytest.mark.parametrize("fail_on_call", [1, 2])
def test_loss_fn_raising_mid_sketch_cleans_up(trained, fail_on_call):
    """An exception from loss_fn inside the sketch pass: hooks removed, flags and modes restored."""
    model, opt, _ = trained
    wrapper = CoresetOptimizer(opt, model, coreset_size=3, sketch_batch_size=4, sketch_modules=["fc1", "fc2"])
    model.fc1.eval()
    snap = Snapshot(model, opt)
    calls = []

    def loss_fn(b):
        calls.append(1)
        if len(calls) == fail_on_call:
            raise RuntimeError("boom in user code")
        return regression_loss(model)(b)

    with pytest.raises(RuntimeError, match="boom"):
        wrapper.select(make_batch(10), loss_fn)
    snap.assert_unchanged()
    assert all(not m._forward_hooks for m in model.modules())
    cs = wrapper.select(make_batch(10), regression_loss(model))  # and it still works
    assert len(cs) == 3


def test_a_wrapped_optimizer_without_adam_moments_is_said_not_silent():
    """SGD keeps no second moment: the sketches are raw gradients, and the user is told so (the
    Trainer integrations say the same); normalize=None says raw gradients are meant: no warning."""
    import warnings

    model = torch.nn.Linear(3, 2)
    with pytest.warns(UserWarning, match="SGD keeps no Adam second moment"):
        CoresetOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, coreset_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CoresetOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, coreset_size=2, normalize=None)
        CoresetOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, coreset_size=2, selection="random")
        CoresetOptimizer(torch.optim.AdamW(model.parameters()), model, coreset_size=2)
