"""selection="target" on 2 gloo ranks (DDP) against one process on the same global batch and target."""

from __future__ import annotations

import pytest
import torch

import distributed_helpers as h
import distributed_target as t
from coreset_optim import CoresetOptimizer

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp_target")
    h.launch(h.ROOT / "tests" / "distributed_target.py", out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def _one_process(name, before, step):
    """select() in one process on the global batch and target, from the ranks' state."""
    model = h.make_model()
    model.load_state_dict(before["model"])
    inner = torch.optim.AdamW(model.parameters(), lr=0.05)
    inner.load_state_dict(before["optimizer"])
    opt = CoresetOptimizer(inner, model, selection="target", **t.SCENARIOS[name]["options"])
    (x, y), src = t.batch(name, step)
    opt.selection.set_target(t.target(name))
    cs = opt.select((x, y), h.per_example_loss(model), sources=src)
    return model, cs, opt


@pytest.mark.parametrize("name", list(t.SCENARIOS))
def test_ranks_pick_the_same_coreset_as_one_process(ranks, name):
    for step in range(t.STEPS):
        r0, r1 = ranks[0][name][step], ranks[1][name][step]
        torch.testing.assert_close(r0["indices"], r1["indices"], rtol=0, atol=0)
        torch.testing.assert_close(r0["weights"], r1["weights"], rtol=0, atol=0)
        torch.testing.assert_close(r0["target_grad"], r1["target_grad"], rtol=0, atol=0)
        assert r0["source_counts"] == r1["source_counts"]
        assert float(r0["weights"].sum()) == pytest.approx(r0["num_valid"])
        model, cs, opt = _one_process(name, r0["before"], step)
        if r0["computed_at"] == step:  # refreshed this step: the one-process target gradient
            torch.testing.assert_close(r0["target_grad"], opt.selection.cache["grad"], rtol=1e-5, atol=1e-7)
            assert cs.indices.tolist() == r0["indices"].tolist()
            torch.testing.assert_close(cs.weights, r0["weights"])
        model.zero_grad()  # DDP's averaged gradient is the coreset's
        (x, y), _ = t.batch(name, step)
        losses = h.per_example_loss(model)((x[r0["indices"]], y[r0["indices"]]))
        ((r0["weights"] * losses).sum() / r0["num_valid"]).backward()
        for r in (r0, r1):
            for n, p in model.named_parameters():
                torch.testing.assert_close(r["grads"][n], p.grad, rtol=1e-6, atol=1e-6)


def test_refresh_schedule_is_shared(ranks):
    got = [ranks[0]["split_target"][s]["computed_at"] for s in range(t.STEPS)]
    assert got == [0, 0, 2]
    assert [ranks[1]["split_target"][s]["computed_at"] for s in range(t.STEPS)] == got


def test_non_finite_target_on_one_rank_fails_on_every_rank(ranks):
    for r in ranks:
        assert r["nan_target"] is not None and "non-finite" in r["nan_target"]
        assert all(g is None for g in r["nan_target_grads"])
