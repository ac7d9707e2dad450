"""coreset_size = B (or ratio 1.0): the wrapper is plain Adam/AdamW, step for step."""

import copy

import pytest
import torch

from coreset_optim import CoresetOptimizer
from core_utils import TwoLayer, make_batch, regression_loss

CASES = [
    (torch.optim.Adam, {"lr": 1e-2}),
    (torch.optim.AdamW, {"lr": 1e-2, "weight_decay": 0.1}),
    (torch.optim.Adam, {"lr": 1e-2, "amsgrad": True}),
    (torch.optim.AdamW, {"lr": 1e-2, "amsgrad": True}),
]


@pytest.mark.parametrize("size_kw", [{"coreset_size": 10}, {"coreset_ratio": 1.0}])
@pytest.mark.parametrize("opt_cls,kwargs", CASES)
def test_full_coreset_equals_plain_optimizer(opt_cls, kwargs, size_kw):
    torch.manual_seed(0)
    model = TwoLayer()
    ref_model = copy.deepcopy(model)
    wrapper = CoresetOptimizer(opt_cls(model.parameters(), **kwargs), model, **size_kw)
    ref_opt = opt_cls(ref_model.parameters(), **kwargs)
    for step in range(20):
        batch = make_batch(10, seed=step)
        cs = wrapper.select(batch, regression_loss(model))
        assert len(cs) == 10 and bool((cs.weights == 1).all())
        wrapper.step()
        wrapper.zero_grad()
        regression_loss(ref_model)(batch).mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p, q, msg=f"step {step}")
    assert wrapper.num_steps == 20
