"""select() under FSDP2 (fully_shard on a 2-rank CPU gloo mesh) against one process.

Parameters, gradients and Adam state are sharded DTensors: normalization reads the second moment
through ``full_tensor()``; the backward pass makes the same number of reduce-scattering calls on
every rank (FSDP2 modules have no ``no_sync``).
"""

from __future__ import annotations

import pytest
import torch

import distributed_helpers as h
from coreset_optim import CoresetOptimizer

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(
    not hasattr(fsdp, "fully_shard") or not torch.distributed.is_gloo_available(),
    reason="needs FSDP2 (torch.distributed.fsdp.fully_shard) and gloo",
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp")
    h.launch(h.ROOT / "tests" / "distributed_helpers.py", out, args=["fsdp"])
    return [torch.load(out / f"rank{r}.pt", weights_only=False)["fsdp"] for r in range(2)]


def test_fsdp_ranks_agree_and_gradient_matches_one_process_select(ranks):
    r0, r1 = ranks
    torch.testing.assert_close(r0["indices"], r1["indices"], rtol=0, atol=0)
    torch.testing.assert_close(r0["weights"], r1["weights"], rtol=0, atol=0)
    h.SCENARIOS.setdefault("fsdp", h.FSDP_SCENARIO)
    model = h.make_model()
    model.load_state_dict(r0["before"]["model"])
    inner = torch.optim.AdamW(model.parameters(), lr=0.05)
    inner.load_state_dict(r0["before"]["optimizer"])
    assert int(inner.state[model.head.weight]["step"]) == 1
    opt = CoresetOptimizer(inner, model, **h.FSDP_SCENARIO["options"])
    x, y, src = h.global_batch("fsdp", 1)
    c = opt.select((x, y), h.per_example_loss(model), sources=src)
    torch.testing.assert_close(c.indices, r0["indices"], rtol=0, atol=0)
    torch.testing.assert_close(c.weights, r0["weights"])
    for r in (r0, r1):
        for n, p in model.named_parameters():
            torch.testing.assert_close(r["grads"][n], p.grad, rtol=1e-6, atol=1e-6)
