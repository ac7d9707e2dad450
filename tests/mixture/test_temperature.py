"""temperature=: per-source budgets and total weights in proportion to n_s ** (1 / T)."""

import pytest
import torch

from core_utils import build, make_batch, regression_loss, take_steps, weighted_grad_reference
from coreset_optim.mixture.budget import tempered_split

SOURCES = ["a"] * 14 + ["b"] * 6 + ["c"] * 3 + ["d"]  # 24 examples


@pytest.mark.parametrize("temperature", [float("inf"), 2.0])
@pytest.mark.parametrize("selection", ["random", "gradient_matching"])
def test_budgets_weights_and_gradient(temperature, selection):
    model, opt, wrapper = build(coreset_size=8, selection=selection, temperature=temperature)
    take_steps(opt, model, 2)
    batch = make_batch(24)
    loss_fn = regression_loss(model)
    opt.zero_grad()
    cs = wrapper.select(batch, loss_fn, sources=SOURCES)
    counts = [14, 6, 3, 1]
    assert [cs.source_counts[s].selected for s in "abcd"] == tempered_split(counts, 8, temperature)
    # hand-computed totals: N * n_s^(1/T) / sum(n^(1/T))
    scores = [1.0] * 4 if temperature == float("inf") else [c**0.5 for c in counts]
    src = [SOURCES[i] for i in cs.indices.tolist()]
    for s, score in zip("abcd", scores):
        total = sum(w for w, t in zip(cs.weights.tolist(), src) if t == s)
        assert total == pytest.approx(24 * score / sum(scores), rel=1e-5)
    assert float(cs.weights.sum()) == pytest.approx(24.0, rel=1e-5)
    ref = weighted_grad_reference(model, batch, loss_fn, cs.indices, cs.weights, 24)
    for p, g in ref.items():
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_temperature_one_is_the_default_selection():
    batch = make_batch(24)
    picks = []
    for kwargs in ({}, {"temperature": 1.0}):
        model, opt, wrapper = build(coreset_size=8, **kwargs)
        take_steps(opt, model, 2)
        cs = wrapper.select(batch, regression_loss(model), sources=SOURCES)
        picks.append((cs.indices, cs.weights))
    torch.testing.assert_close(picks[0], picks[1], rtol=0, atol=0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), True, "inf"])
def test_bad_temperature_is_refused(bad):
    with pytest.raises(ValueError, match="temperature must be a float > 0"):
        build(temperature=bad)


def test_temperature_is_saved_in_the_state_dict():
    model, opt, wrapper = build(temperature=float("inf"))
    sd = wrapper.state_dict()
    assert sd["coreset_optim"]["config"]["temperature"] == float("inf")
    _, _, other = build()
    other.load_state_dict(sd)
    assert other.config.temperature == float("inf")
