"""The seams of select()'s pipeline: the one-process layout, the stages, the all-selected stage."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import pytest
import torch

from coreset_optim.distributed import LocalBatch, batch_layout
from coreset_optim.methods.base import SelectionContext, SelectionMethod
from coreset_optim.mixture.choose import select_from_sketches, take_every_valid
from coreset_optim.sketch.capture import BatchPass
from coreset_optim.records import Sketches

from core_utils import build, make_batch, per_example_grads_loop, regression_loss, weighted_grad_reference


def test_one_process_layout_is_the_identity():
    codes = torch.tensor([0, 1, 0, 1, 1])
    layout = batch_layout(5, codes, ["a", "b"], "auto")
    assert isinstance(layout, LocalBatch)
    assert layout.total == 5 and layout.sizes == [5] and layout.names == ["a", "b"]
    assert layout.codes is codes and layout.local_codes is codes
    sketches = Sketches(torch.randn(5, 3), torch.rand(5), torch.ones(5, dtype=torch.bool))
    timings: dict[str, float] = {}
    assert layout.gather(sketches, 2, timings) is sketches and timings == {}

    def chooser(*args):
        return args

    assert layout.on_first_rank(chooser) is chooser


def test_one_process_backward_is_the_weighted_reference():
    model, _, _ = build()
    batch, loss_fn = make_batch(8), regression_loss(model)
    indices, weights = torch.tensor([1, 4, 6]), torch.tensor([2.0, 3.5, 2.5])
    layout = LocalBatch.of(8, torch.zeros(8, dtype=torch.long), ["all"])
    sub, local, local_w, loss = layout.backward(
        batch, indices, weights, loss_fn, 8.0, 2, model, torch.ones(8, dtype=torch.bool)
    )
    assert local is indices and local_w is weights
    torch.testing.assert_close(sub["x"], batch["x"][indices])
    for p, expected in weighted_grad_reference(model, batch, loss_fn, indices, weights, 8).items():
        torch.testing.assert_close(p.grad, expected)
    with torch.no_grad():
        torch.testing.assert_close(loss, (weights * loss_fn(sub)).sum() / 8.0)


def test_take_every_valid_keeps_valid_rows_with_weight_one():
    valid = torch.tensor([True, False, True, True, False])
    rows = torch.empty(5, 0)
    selection = take_every_valid(rows, valid, [2, 1])
    assert selection.indices.tolist() == [0, 2, 3]
    torch.testing.assert_close(selection.weights, torch.ones(3))
    assert selection.compressed is rows and selection.selected_per_source == [2, 1]


def test_stages_compose_to_select():
    """The method's pass and choose step, run by hand, give select()'s coreset and sketches."""
    model, _, wrapper = build(coreset_size=4, sketch_dim=1000, selection="gradient_matching")
    batch, loss_fn = make_batch(10), regression_loss(model)
    layout = LocalBatch.of(10, torch.zeros(10, dtype=torch.long), ["all"])
    batch_pass = BatchPass(model, wrapper.sketch_layers, batch, loss_fn, 10, 4)
    context = SelectionContext(batch_pass, wrapper.optimizer, torch.Generator(), 0, layout, model, 0)
    sketches = wrapper.selection.sketches(context)
    params = [p for t in wrapper.sketch_layers for p in t.params]
    # no optimizer state yet: Adam's normalization is the identity; 1000 > D keeps every column
    torch.testing.assert_close(sketches.rows, per_example_grads_loop(model, params, batch, loss_fn, 10))
    selection = select_from_sketches(
        sketches.rows, sketches.valid, layout.codes, 1, 4, [False], wrapper.selection, losses=sketches.losses
    )
    cs = wrapper.select(batch, loss_fn)
    assert cs.indices.tolist() == selection.indices.tolist()
    torch.testing.assert_close(cs.weights, selection.weights)
    torch.testing.assert_close(cs.sketches, sketches.rows)


def test_chooser_without_sketches_reports_no_sketch_columns():
    """random/loss read no sketch: zero columns, as when every example is selected."""
    for selection in ("random", "loss"):
        _, _, wrapper = build(coreset_size=3, selection=selection)
        model = wrapper.model
        cs = wrapper.select(make_batch(9), regression_loss(model))
        assert len(cs) == 3 and cs.sketches.shape == (9, 0)


@dataclasses.dataclass(kw_only=True)
class FirstRows(SelectionMethod):
    """Each group's first ``k`` rows (``extra``: return that many more), default weights."""

    name: ClassVar[str] = "first_rows_test"
    extra: int = 0

    def choose(self, x, k, context):
        assert 1 <= k < x.shape[0] and context.total == 10
        return torch.arange(k + self.extra), None


def test_default_weights_are_n_over_k_per_source():
    model, _, wrapper = build(coreset_size=4, selection=FirstRows())
    sources = ["a"] * 6 + ["b"] * 4  # budgets 2 and 2 of 6 and 4 rows
    cs = wrapper.select(make_batch(10), regression_loss(model), sources=sources)
    assert cs.indices.tolist() == [0, 1, 6, 7]
    torch.testing.assert_close(cs.weights, torch.tensor([3.0, 3.0, 2.0, 2.0]))


def test_a_choice_of_the_wrong_size_is_refused_before_the_backward():
    model, _, wrapper = build(coreset_size=4, selection=FirstRows(extra=1))
    with pytest.raises(ValueError, match="FirstRows.choose was asked for k=2"):
        wrapper.select(make_batch(10), regression_loss(model), sources=["a"] * 6 + ["b"] * 4)
    assert all(p.grad is None for p in model.parameters())
