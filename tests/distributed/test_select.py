"""select() on 2 gloo ranks (DDP) against one process on the same global batch.

The ranks run every scenario of ``distributed_helpers.SCENARIOS`` in one launch (module fixture).
Reference: one process with the same model and Adam state computes
``sum_j w_j grad(loss_j) / N`` over the global batch for the reported selection, and also runs
``select()`` on the global batch itself.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distributed_helpers as h
from coreset_optim import AnchoredConsensus, CoresetOptimizer

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    h.launch(h.ROOT / "tests" / "distributed_helpers.py", out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


def reference(name: str, before: dict):
    """One process: the model and AdamW state the ranks had before the compared step."""
    model = h.make_model()
    model.load_state_dict(before["model"])
    inner = torch.optim.AdamW(model.parameters(), lr=0.05)
    inner.load_state_dict(before["optimizer"])
    return model, inner


def coreset_gradient(model: nn.Module, x, y, indices, weights, num_valid):
    model.zero_grad()
    losses = h.per_example_loss(model)((x[indices], y[indices]))
    ((weights * losses).sum() / num_valid).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", h.GLOBAL_SCENARIOS)
def test_ranks_agree_on_the_selection(ranks, name):
    r0, r1 = ranks[0][name], ranks[1][name]
    torch.testing.assert_close(r0["indices"], r1["indices"], rtol=0, atol=0)
    torch.testing.assert_close(r0["weights"], r1["weights"], rtol=0, atol=0)
    assert r0["source_counts"] == r1["source_counts"]
    assert r0["rank_sizes"] == r1["rank_sizes"] == h.SCENARIOS[name]["sizes"]
    torch.testing.assert_close(r0["loss"], r1["loss"])
    # Local indices are the global ones split at the shard boundary.
    n0 = r0["rank_sizes"][0]
    glob = r0["indices"]
    torch.testing.assert_close(r0["local_indices"], glob[glob < n0])
    torch.testing.assert_close(r1["local_indices"], glob[glob >= n0] - n0)
    torch.testing.assert_close(torch.cat([r0["local_weights"], r1["local_weights"]]), r0["weights"])
    # Each rank's sub-batch is its own selected examples.
    (x, y), _ = h.shard(name, 1, 1)
    torch.testing.assert_close(r1["sub_batch"][0], x[r1["local_indices"]])


@pytest.mark.parametrize("name", h.GLOBAL_SCENARIOS)
def test_gradient_matches_one_process(ranks, name):
    r0, r1 = ranks[0][name], ranks[1][name]
    model, _ = reference(name, r0["before"])
    x, y, _ = h.global_batch(name, 1)
    expected = coreset_gradient(model, x, y, r0["indices"], r0["weights"], r0["num_valid"])
    for r in (r0, r1):  # DDP leaves the same averaged gradient on both ranks
        for n, g in expected.items():
            torch.testing.assert_close(r["grads"][n], g, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", h.GLOBAL_SCENARIOS)
def test_selection_matches_one_process_select(ranks, name):
    """select() on the concatenated batch in one process picks the same coreset, same weights."""
    r0 = ranks[0][name]
    model, inner = reference(name, r0["before"])
    opt = CoresetOptimizer(inner, model, **h.SCENARIOS[name]["options"])
    opt.generator.set_state(r0["before"]["generator"])  # as the ranks had it ("random" draws with it)
    x, y, src = h.global_batch(name, 1)
    c = opt.select((x, y), h.per_example_loss(model), sources=src)
    torch.testing.assert_close(c.indices, r0["indices"], rtol=0, atol=0)
    torch.testing.assert_close(c.weights, r0["weights"])
    assert {k: tuple(v) for k, v in c.source_counts.items()} == r0["source_counts"]
    torch.testing.assert_close(c.loss, r0["loss"])
    for n, p in model.named_parameters():
        torch.testing.assert_close(r0["grads"][n], p.grad, rtol=1e-6, atol=1e-6)


def test_the_reference_is_gathered_and_the_ranks_keep_the_same_running_share(ranks):
    """Both ranks' running share of implausible rows equals one process's over the same two global
    batches, and the gathered reference changed the choice (the rule without it picks otherwise)."""
    r0, r1 = ranks[0]["reference"], ranks[1]["reference"]
    method = h.FeatureReference(sketch_dim=10, noise_gate=0.0)
    model = h.make_model()
    opt = CoresetOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), model, coreset_size=5, selection=method)
    for step in (0, 1):
        x, y, src = h.global_batch("reference", step)
        opt.zero_grad()
        c = opt.select((x, y), h.per_example_loss(model), sources=src)
        opt.step()
    assert r0["implausible_share"] == r1["implausible_share"] == pytest.approx(method.implausible_share)
    assert c.indices.tolist() == r0["indices"].tolist()
    model, inner = reference("reference", r0["before"])
    plain = CoresetOptimizer(inner, model, coreset_size=5, selection=AnchoredConsensus(sketch_dim=10, reference=None))
    assert plain.select((x, y), h.per_example_loss(model), sources=src).indices.tolist() != r0["indices"].tolist()


def test_a_rank_without_selected_examples_still_contributes(ranks):
    r1 = ranks[1]["rank1_empty"]
    assert r1["local_indices"].numel() == 0
    assert r1["source_counts"]["c"] == (2, 0, False)
    assert all(g.abs().sum() > 0 for g in r1["grads"].values())  # rank 0's gradient reached rank 1


def test_uneven_scenario_splits_the_work(ranks):
    r0, r1 = ranks[0]["uneven"], ranks[1]["uneven"]
    assert r0["local_indices"].numel() == 2  # one backward call of 2 on rank 0
    torch.testing.assert_close(r1["local_indices"], torch.arange(3))  # two calls (2 + 1) on rank 1


def test_inner_model_scenario_pads_backward_calls(ranks):
    r0, r1 = ranks[0]["inner_model"], ranks[1]["inner_model"]
    assert r0["local_indices"].numel() == 6  # 3 micro-batches of 2
    torch.testing.assert_close(r1["local_indices"], torch.arange(3))  # 2 micro-batches, padded to 3


def test_distributed_false_selects_per_rank(ranks):
    """Each rank's coreset is one-process select() on its own shard; DDP averages the gradients."""
    expected = None
    for rank in (0, 1):
        r = ranks[rank]["per_rank"]
        model, inner = reference("per_rank", r["before"])
        opt = CoresetOptimizer(inner, model, **h.SCENARIOS["per_rank"]["options"])
        (x, y), src = h.shard("per_rank", 1, rank)
        c = opt.select((x, y), h.per_example_loss(model), sources=src)
        torch.testing.assert_close(c.indices, r["indices"], rtol=0, atol=0)
        torch.testing.assert_close(c.weights, r["weights"])
        assert r["rank_sizes"] == [6]
        grads = {n: p.grad / 2 for n, p in model.named_parameters()}
        expected = grads if expected is None else {n: expected[n] + g for n, g in grads.items()}
    for rank in (0, 1):
        for n, g in expected.items():
            torch.testing.assert_close(ranks[rank]["per_rank"]["grads"][n], g, rtol=1e-6, atol=1e-6)
