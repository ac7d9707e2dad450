"""Reading Adam's moments of a DeepSpeed-ZeRO-partitioned parameter, against a stand-in.

DeepSpeed is not installed here: a stand-in ``deepspeed.utils.safe_get_full_optimizer_state``
returns the whole state, as DeepSpeed's documents it to (stage 1/2 params carry ``_hp_mapping``
with ``param_group_index``; the groups hold flat fp32 partitions whose state has ``step``). This
checks our plumbing only; the real library is untested (docs/distributed.md says what to check).
"""

from __future__ import annotations

import sys
import types

import torch

from coreset_optim.precondition.moments import read_adam_moments
from coreset_optim.precondition.normalize import adam_normalize, normalize_sketches


def test_zero_partitioned_param_reads_full_state(monkeypatch):
    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(3, 4))
    full = {"exp_avg": torch.randn(3, 4), "exp_avg_sq": torch.rand(3, 4)}
    param._hp_mapping = types.SimpleNamespace(param_group_index=1)
    calls = []

    def safe_get_full_optimizer_state(p, key):
        calls.append(key)
        assert p is param
        return full.get(key)

    utils = types.ModuleType("deepspeed.utils")
    utils.safe_get_full_optimizer_state = safe_get_full_optimizer_state
    ds = types.ModuleType("deepspeed")
    ds.utils = utils
    monkeypatch.setitem(sys.modules, "deepspeed", ds)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", utils)

    flat0, flat1 = torch.nn.Parameter(torch.zeros(5)), torch.nn.Parameter(torch.zeros(12))
    inner = torch.optim.AdamW(
        [{"params": [flat0], "betas": (0.8, 0.9)}, {"params": [flat1], "betas": (0.5, 0.75), "eps": 1e-6}]
    )
    inner.state[flat1] = {"step": torch.tensor(7.0), "exp_avg": torch.zeros(12), "exp_avg_sq": torch.zeros(12)}

    moments = read_adam_moments(inner, param)
    assert calls[:2] == ["exp_avg_sq", "exp_avg"]
    assert (moments.step, moments.beta1, moments.beta2, moments.eps) == (7, 0.5, 0.75, 1e-6)
    torch.testing.assert_close(moments.exp_avg_sq, full["exp_avg_sq"])
    torch.testing.assert_close(moments.exp_avg, full["exp_avg"])

    sketches = torch.randn(2, 12)
    expected = adam_normalize(sketches, full["exp_avg_sq"], 7, 0.75, 1e-6)
    torch.testing.assert_close(normalize_sketches(sketches, inner, [param], "adam"), expected)
