"""The docs' worked example of a new selection method (examples/new_method.py): one module, one
registration, and every option, check, checkpoint and pipeline stage works through the public API."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from coreset_optim import CoresetOptimizer
from coreset_optim.methods.registry import METHODS
from core_utils import Snapshot, build, make_batch, regression_loss, weighted_grad_reference

sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
import new_method  # noqa: E402  (registers "largest_update")

SOURCES = ["a"] * 7 + ["b"] * 5


def test_registered_by_name_and_built_with_its_options():
    assert METHODS["largest_update"] is new_method.LargestUpdate
    _, _, wrapper = build(coreset_size=4, selection="largest_update", ord=1.0, sketch_dim=16)
    assert wrapper.selection == new_method.LargestUpdate(ord=1.0, sketch_dim=16)


@pytest.mark.parametrize("ord_", [1.0, 2.0])
def test_choice_is_the_brute_force_largest_sketches_per_source(ord_):
    model, _, wrapper = build(coreset_size=4, selection="largest_update", ord=ord_, keep_sources=None)
    batch, loss_fn = make_batch(12, seed=3), regression_loss(model)
    cs = wrapper.select(batch, loss_fn, sources=SOURCES)
    norms = torch.linalg.vector_norm(cs.sketches.double(), ord=ord_, dim=1)
    expected = []
    for lo, hi in ((0, 7), (7, 12)):  # budgets 7 -> 2 and 5 -> 2
        expected += (lo + torch.argsort(norms[lo:hi], descending=True, stable=True)[:2]).tolist()
    assert cs.indices.tolist() == sorted(expected)
    torch.testing.assert_close(cs.weights, torch.tensor([3.5, 3.5, 2.5, 2.5]))
    for p, g in weighted_grad_reference(model, batch, loss_fn, cs.indices, cs.weights, 12).items():
        torch.testing.assert_close(p.grad, g)


def test_bad_option_is_refused_before_anything_changes():
    model, opt, _ = build(coreset_size=4)
    snap = Snapshot(model, opt)
    with pytest.raises(ValueError, match="ord must be a number > 0"):
        CoresetOptimizer(opt, model, coreset_size=4, selection="largest_update", ord=0)
    with pytest.raises(TypeError, match="takes no option .'similarity'"):
        CoresetOptimizer(opt, model, coreset_size=4, selection="largest_update", similarity="l1")
    with pytest.raises(TypeError, match="pass them to its constructor"):
        CoresetOptimizer(opt, model, coreset_size=4, selection=new_method.LargestUpdate(), ord=3.0)
    snap.assert_unchanged()


def test_object_and_name_choose_alike_and_checkpoints_keep_the_options():
    a_model, _, by_name = build(seed=1, coreset_size=4, selection="largest_update", ord=3.0)
    b_model, _, by_object = build(seed=1, coreset_size=4, selection=new_method.LargestUpdate(ord=3.0))
    batch = make_batch(12, seed=4)
    one = by_name.select(batch, regression_loss(a_model), sources=SOURCES)
    two = by_object.select(batch, regression_loss(b_model), sources=SOURCES)
    assert one.indices.tolist() == two.indices.tolist()
    _, _, fresh = build(seed=1, coreset_size=4)  # the default method, replaced by the checkpoint's
    fresh.load_state_dict(by_name.state_dict())
    assert fresh.selection == new_method.LargestUpdate(ord=3.0)
