import pytest
import torch

from coreset_optim import CoresetOptimizer
from coreset_optim.methods.registry import METHODS as REGISTRY

from quality_helpers import make_loss_fn, per_example_grads, tiny_batch, tiny_model

METHODS = ["facility_location", "gradient_matching", "random", "loss"]


def _wrapper(selection, **kw):
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt, CoresetOptimizer(opt, model, selection=selection, keep_sources=None, **kw)


@pytest.mark.parametrize("selection", METHODS)
def test_gradient_is_the_weighted_sum_of_the_coreset(selection):
    model, opt, wrapper = _wrapper(selection, coreset_size=9)
    batch = tiny_batch(24, num_sources=3)
    result = wrapper.select(batch, make_loss_fn(model), sources=batch["source"])
    assert len(result) == 9 and result.indices.unique().numel() == 9
    assert (result.weights >= 0).all()
    torch.testing.assert_close(result.weights.sum(), torch.tensor(24.0))
    # Sources: 8 examples each, 3 selected each (proportional budget).
    assert [c.selected for c in result.source_counts.values()] == [3, 3, 3]
    assert torch.bincount(batch["source"][result.indices], minlength=3).tolist() == [3, 3, 3]
    params = list(model.parameters())
    grads = per_example_grads(model, batch, params)
    expected = (result.weights[:, None] * grads[result.indices]).sum(0) / 24
    got = torch.cat([p.grad.reshape(-1) for p in params])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_random_weights_and_replay_after_state_dict():
    model, opt, wrapper = _wrapper("random", coreset_size=6)
    batch = tiny_batch(24, num_sources=3)
    loss_fn = make_loss_fn(model)
    state = wrapper.state_dict()
    first = wrapper.select(batch, loss_fn, sources=batch["source"])
    torch.testing.assert_close(first.weights, torch.full((6,), 4.0))
    second = wrapper.select(batch, loss_fn, sources=batch["source"])
    assert not torch.equal(first.indices, second.indices)  # fresh draws each step
    wrapper.load_state_dict(state)
    again = wrapper.select(batch, loss_fn, sources=batch["source"])
    assert torch.equal(first.indices, again.indices)


def test_random_is_uniform():
    model, opt, wrapper = _wrapper("random", coreset_size=3)
    batch = tiny_batch(12, num_sources=1)
    hits = torch.zeros(12)
    for _ in range(400):
        hits[wrapper.select(batch, make_loss_fn(model)).indices] += 1
        opt.zero_grad()
    # Each example is picked with probability 1/4: 100 expected, sd about 8.7.
    assert (hits - 100).abs().max() < 40


def test_loss_picks_the_highest_losses_per_source():
    model, opt, wrapper = _wrapper("loss", coreset_size=6)
    batch = tiny_batch(24, num_sources=2)
    loss_fn = make_loss_fn(model)
    result = wrapper.select(batch, loss_fn, sources=batch["source"])
    with torch.no_grad():
        losses = loss_fn(batch)
    expected = []
    for s in range(2):
        rows = torch.nonzero(batch["source"] == s).flatten()
        expected += rows[losses[rows].argsort(descending=True)[:3]].tolist()
    assert sorted(expected) == result.indices.tolist()
    torch.testing.assert_close(result.weights, torch.full((6,), 4.0))


def test_small_sources_kept_whole_for_every_method():
    for selection in METHODS:
        model = tiny_model()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        wrapper = CoresetOptimizer(opt, model, coreset_size=8, selection=selection)
        batch = tiny_batch(40)
        batch["source"] = torch.tensor([0] * 37 + [1] * 3)
        result = wrapper.select(batch, make_loss_fn(model), sources=batch["source"])
        counts = result.source_counts
        assert counts[1].selected == 3 and counts[1].kept_whole, selection
        assert len(result) == 8
        torch.testing.assert_close(result.weights.sum(), torch.tensor(40.0))


def test_registry_holds_every_method():
    assert set(METHODS) <= set(REGISTRY)
    assert all(REGISTRY[name].name == name for name in REGISTRY)
