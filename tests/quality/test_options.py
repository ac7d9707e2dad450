import pytest
import torch

from coreset_optim import CoresetOptimizer
from coreset_optim import AnchoredConsensus
from coreset_optim.presets import PRESETS

from quality_helpers import make_loss_fn, tiny_batch, tiny_model


def _parts():
    model = tiny_model()
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"sketch": "spsa"}, "sketch"),
        ({"selection": "craig"}, "selection"),
        ({"zo_eps": 0.0}, "zo_eps"),
        ({"zo_eps": float("nan")}, "zo_eps"),
        ({"zo_probes": 0}, "zo_probes"),
        ({"zo_fixed_direction": True, "zo_probes": 4}, "zo_probes"),
        ({"preset": "fast"}, "preset"),
    ],
)
def test_bad_options_name_the_option(kwargs, name):
    model, opt = _parts()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=name):
        CoresetOptimizer(opt, model, coreset_size=4, **kwargs)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert not opt.state


def test_zo_fixed_direction_must_be_bool():
    model, opt = _parts()
    with pytest.raises(TypeError, match="zo_fixed_direction"):
        CoresetOptimizer(opt, model, coreset_size=4, zo_fixed_direction=1)


def test_colm_preset_and_explicit_override():
    model, opt = _parts()
    colm = CoresetOptimizer(opt, model, coreset_size=4, preset="colm")
    for key, value in PRESETS["colm"].items():
        assert (colm.selection.name if key == "selection" else getattr(colm.selection, key)) == value
    override = CoresetOptimizer(opt, model, coreset_size=4, preset="colm", normalize=None, similarity="cosine")
    assert override.selection.normalize is None and override.selection.similarity == "cosine"
    assert override.selection.sketch == "zeroth_order"
    default = CoresetOptimizer(opt, model, coreset_size=4)
    assert PRESETS["default"] == {"selection": "anchored_consensus"}  # the rest: the method's own defaults
    assert default.selection == AnchoredConsensus()


def test_colm_preset_runs_and_restores_from_state_dict():
    model, opt = _parts()
    batch = tiny_batch()
    wrapper = CoresetOptimizer(opt, model, coreset_size=6, preset="colm")
    result = wrapper.select(batch, make_loss_fn(model), sources=batch["source"])
    torch.testing.assert_close(result.weights.sum(), torch.tensor(24.0))
    opt.step()
    state = wrapper.state_dict()
    model2, opt2 = _parts()
    other = CoresetOptimizer(opt2, model2, coreset_size=6)
    other.load_state_dict(state)
    assert other.config == wrapper.config
