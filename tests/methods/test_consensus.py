"""selection="consensus_loss": highest loss among the examples whose Adam-normalized gradient
agrees with their source's, against brute force (a batch-size-1 loop and plain Python cosines)."""

from __future__ import annotations

import math

import pytest
import torch

from coreset_optim.methods.consensus import agreement, consensus_loss_coreset, disagreeing
from coreset_optim.precondition.normalize import normalize_sketches

from core_utils import FLIPPED, flipped_targets, build, make_batch, per_example_grads_loop, regression_loss


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    na, nb = math.sqrt(sum(x * x for x in a)), math.sqrt(sum(y * y for y in b))
    return 0.0 if na == 0 or nb == 0 else dot / (na * nb)


def unit(v: list[float]) -> list[float]:
    n = math.sqrt(sum(a * a for a in v))
    return [a / n for a in v] if n else v


def vote_sum(rows: list[list[float]], j: int) -> list[float]:
    """The sum of the unit vectors of every row but j."""
    units = [unit(r) for i, r in enumerate(rows) if i != j]
    return [sum(u[c] for u in units) for c in range(len(rows[j]))]


def test_agreement_is_the_cosine_with_the_others_unit_vectors():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[3] *= 50  # a large row counts once, like any other
    rows = x.tolist()
    want = [cosine(rows[j], vote_sum(rows, j)) for j in range(7)]
    torch.testing.assert_close(agreement(x), torch.tensor(want, dtype=torch.float64))
    assert not disagreeing(x[:2]).any()  # too few for a consensus


def test_selector_prefers_agreeing_rows_by_loss_then_disagreeing_by_ascending_loss():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0], [0.9, -0.1], [-0.8, 0.2], [1.0, 0.2]])
    losses = torch.tensor([0.5, 2.0, 9.0, 1.0, 3.0, 0.1])
    # others' sum points along +x: rows 2 and 4 disagree
    assert disagreeing(x).tolist() == [False, False, True, False, True, False]
    chosen = consensus_loss_coreset(x, 3, losses)
    assert chosen.tolist() == [1, 3, 0]
    chosen = consensus_loss_coreset(x, 6, losses)
    assert chosen.tolist() == [1, 3, 0, 5, 4, 2]


@pytest.mark.parametrize("steps", [0, 2])
def test_select_matches_a_batch_size_one_reference(steps):
    """Rows whose targets were flipped pull against their source: they are the suspects, and the
    coreset is the highest-loss agreeing rows per source, as computed from a per-example loop."""
    model, opt, wrapper, batch, loss_fn = flipped_targets(steps, "consensus_loss", shift=2.5)
    flipped = FLIPPED

    sources = [i % 2 for i in range(24)]
    params = [model.fc2.weight, model.fc2.bias]
    grads = per_example_grads_loop(model, params, batch, loss_fn, 24)
    normalized = normalize_sketches(grads, opt, params, "adam").tolist()
    with torch.no_grad():
        losses = loss_fn(batch).tolist()
    want_suspects, want = [], []
    for s in range(2):
        rows = [i for i in range(24) if sources[i] == s]
        agree = {}
        for j in rows:
            agree[j] = cosine(normalized[j], vote_sum([normalized[i] for i in rows], rows.index(j))) > 0
        want_suspects += [j for j in rows if not agree[j]]
        want += sorted((j for j in rows if agree[j]), key=lambda j: -losses[j])[:3]
    coreset = wrapper.select(batch, loss_fn, sources=sources)
    assert sorted(want_suspects) == flipped
    assert torch.nonzero(coreset.suspects).flatten().tolist() == sorted(want_suspects)
    assert coreset.indices.tolist() == sorted(want)


def test_a_coherent_minority_of_large_rows_does_not_set_the_consensus():
    """Eight small rows along +x, two large ones along -x (another task's answers: coherent, high
    loss): one vote per row flags the two; a raw sum would have flagged the eight."""
    g = torch.Generator().manual_seed(1)
    small = torch.tensor([[1.0, 0.0]]) + 0.2 * torch.randn(8, 2, generator=g)
    large = torch.tensor([[-30.0, 1.0]]) + torch.randn(2, 2, generator=g)
    x = torch.cat([small, large])
    assert disagreeing(x).tolist() == [False] * 8 + [True] * 2
    raw = torch.nn.functional.cosine_similarity(x, x.sum(0, keepdim=True) - x, dim=1)
    assert (raw[:8] <= 0).all()  # what the raw sum would have said


@pytest.mark.parametrize("selection", ["consensus_loss", "trimmed_loss"])
def test_no_suspects_when_the_budget_takes_every_example(selection):
    """A budget covering the batch (a small last batch, k >= B) runs no sketch: nothing was
    compared, so nothing is flagged (it used to flag all 8 of 8 from empty sketches)."""
    model, _, wrapper = build(coreset_size=8, selection=selection)
    coreset = wrapper.select(make_batch(8), regression_loss(model), sources=["a"] * 8)
    assert len(coreset) == 8 and coreset.suspects is None
    model, _, wrapper = build(coreset_size=7, selection=selection)
    coreset = wrapper.select(make_batch(8), regression_loss(model), sources=["a"] * 8)
    assert coreset.suspects is not None and coreset.suspects.shape == (8,)
