"""anchored_consensus: the small-loss half votes, a loss gap gates; each stage against a plain
loop, and select() against a per-example reference."""

from __future__ import annotations

import math

import pytest
import torch

from coreset_optim import AnchoredConsensus, CoresetOptimizer
from coreset_optim.methods.anchored import (
    anchor_agreement,
    anchored_suspects,
    confident_suspects,
    high_loss_component,
)
from coreset_optim.precondition.normalize import normalize_sketches

from core_utils import FLIPPED, flipped_targets, per_example_grads_loop


def cosine(a, b):
    na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
    return 0.0 if na == 0 or nb == 0 else sum(p * q for p, q in zip(a, b)) / (na * nb)


def unit(v):
    n = math.sqrt(sum(t * t for t in v))
    return [t / n for t in v] if n else [0.0] * len(v)


def test_anchor_agreement_matches_a_loop():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 3, generator=g)
    voters = torch.tensor([True, False, True, True, False, False, True])
    rows = x.tolist()
    want = []
    for i, row in enumerate(rows):
        anchor = [0.0, 0.0, 0.0]
        for j, other in enumerate(rows):
            if voters[j] and j != i:
                anchor = [a + u for a, u in zip(anchor, unit(other))]
        want.append(cosine(row, anchor))
    torch.testing.assert_close(anchor_agreement(x, voters), torch.tensor(want, dtype=torch.float64))


def brute_force_split(losses, min_separation):
    """Every allowed cut, its separation computed from the two groups' lists."""
    n, s = len(losses), sorted(losses)
    best, best_cut = -1.0, None
    for cut in range(max(1, int(n * 0.4)), n):
        lo, hi = s[:cut], s[cut:]
        m_lo, m_hi = sum(lo) / len(lo), sum(hi) / len(hi)
        ss = sum((v - m_lo) ** 2 for v in lo) + sum((v - m_hi) ** 2 for v in hi)
        sep = (m_hi - m_lo) / (math.sqrt(ss / n) + 1e-6)
        if sep > best:
            best, best_cut = sep, cut
    if best < min_separation:
        return set()
    threshold = s[best_cut]
    return {i for i, v in enumerate(losses) if v >= threshold}


@pytest.mark.parametrize("seed", range(6))
def test_high_loss_component_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(4, 30, (1,), generator=g))
    losses = torch.rand(n, generator=g) ** 3 * 4  # distinct values
    if seed % 2:
        losses[: n // 3] += 3.0  # a separate high group
    got = set(torch.nonzero(high_loss_component(losses, 2.0)).flatten().tolist())
    assert got == brute_force_split(losses.tolist(), 2.0)
    assert not high_loss_component(losses[:3]).any()  # too few to split


def test_wrong_answers_are_flagged_and_hard_clean_ones_kept():
    """Six easy rows and three hard rows pull along +x; four wrong answers (a separate high-loss
    group, 31 % of the source) pull along -x. Only the wrong ones are suspects, and the coreset
    takes the hard clean rows first."""
    g = torch.Generator().manual_seed(2)
    easy = torch.tensor([[1.0, 0.0]]) + 0.3 * torch.randn(6, 2, generator=g)
    hard = torch.tensor([[3.0, 1.0]]) + 0.3 * torch.randn(3, 2, generator=g)
    wrong = torch.tensor([[-4.0, 0.5]]) + 0.3 * torch.randn(4, 2, generator=g)
    x = torch.cat([easy, hard, wrong])
    losses = torch.tensor([0.1, 0.2, 0.15, 0.05, 0.3, 0.25, 1.2, 1.5, 1.1, 4.0, 4.2, 3.9, 4.4])
    suspects = anchored_suspects(x, losses)
    assert torch.nonzero(suspects).flatten().tolist() == [9, 10, 11, 12]
    chosen, weights = AnchoredConsensus().choose(x, 4, _context(losses))
    assert chosen.tolist() == [7, 6, 8, 4] and weights is None  # hard clean, then the hardest easy one


def _context(losses):
    from coreset_optim import ChooseContext

    return ChooseContext(torch.arange(losses.numel()), losses, None, losses.numel(), None)


@pytest.mark.parametrize("steps", [0, 2])
def test_select_matches_a_per_example_reference(steps):
    """The suspects and the coreset of select(), against per-example gradients from a loop,
    normalized by hand, and the rule written out with lists."""
    model, opt, wrapper, batch, loss_fn = flipped_targets(steps, "anchored_consensus", shift=4.0)
    flipped = FLIPPED

    sources = [i % 2 for i in range(24)]
    params = [model.fc2.weight, model.fc2.bias]
    normalized = normalize_sketches(per_example_grads_loop(model, params, batch, loss_fn, 24), opt, params, "adam")
    with torch.no_grad():
        losses = loss_fn(batch)
    want_suspects, want = [], []
    for s in range(2):
        rows = [i for i in range(24) if sources[i] == s]
        flags = anchored_suspects(normalized[rows], losses[rows]).tolist()
        want_suspects += [j for j, f in zip(rows, flags) if f]
        ranked = sorted(rows, key=lambda j: (flags[rows.index(j)], -losses[j].item()))
        want += ranked[:3]
    coreset = wrapper.select(batch, loss_fn, sources=sources)
    assert sorted(want_suspects) == flipped
    assert torch.nonzero(coreset.suspects).flatten().tolist() == flipped
    assert coreset.indices.tolist() == sorted(want)
    assert coreset.suspect_shares() == {0: 2 / 12, 1: 2 / 12}  # rows 2, 20 of source 0; 9, 15 of source 1
    everything = CoresetOptimizer(opt, model, coreset_size=24, selection="anchored_consensus")
    assert everything.select(batch, loss_fn, sources=sources).suspect_shares() is None  # no sketch ran


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), "2", True])
def test_min_separation_is_checked(bad):
    with pytest.raises(ValueError, match="min_separation"):
        AnchoredConsensus(min_separation=bad)


def confident_by_hand(rows, losses, cosine_below, z_above):
    """The confident report written out with lists: the small-loss half's unit-vector anchor (own
    vote left out), the log-loss z against the small half's mean and the source's sample sd."""
    n = len(losses)
    median = sorted(losses)[(n - 1) // 2]  # torch.median: the lower middle value
    small = [v <= median for v in losses]
    logs = [math.log(max(v, 1e-12)) for v in losses]
    small_mean = sum(v for v, s in zip(logs, small) if s) / sum(small)
    mean = sum(logs) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in logs) / (n - 1))
    flags = []
    for i, row in enumerate(rows):
        anchor = [0.0] * len(row)
        for j, other in enumerate(rows):
            if small[j] and j != i:
                anchor = [a + u for a, u in zip(anchor, unit(other))]
        z = (logs[i] - small_mean) / (sd + 1e-9)
        flags.append(cosine(row, anchor) < cosine_below and z > z_above)
    return flags


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(("cosine_below", "z_above"), [(0.0, 1.5), (-0.1, 1.0), (0.2, 0.5)])
def test_confident_suspects_match_a_loop(seed, cosine_below, z_above):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(4, 20, (1,), generator=g))
    x = torch.randn(n, 5, generator=g)
    losses = torch.rand(n, generator=g) ** 2 * 3
    losses[: n // 4] += 4.0  # some far above the rest
    x[: n // 4] *= -1
    got = confident_suspects(x, losses, cosine_below, z_above).tolist()
    assert got == confident_by_hand(x.tolist(), losses.tolist(), cosine_below, z_above)
    assert not confident_suspects(x[:3], losses[:3]).any()  # too few rows to judge


@pytest.mark.parametrize(("shift", "confident_flags"), [(1.5, []), (4.0, FLIPPED)])
def test_the_report_is_an_option_and_the_choice_does_not_depend_on_it(shift, confident_flags):
    """'avoided' reports anchored_suspects per source, 'confident' confident_suspects, from the
    same normalized per-example gradients (a loop); the coreset is the same either way. With the
    flipped rows near the clean ones (shift 1.5) the confident report flags none where the avoided
    set holds two; far from them (4.0), both flag exactly the flipped rows."""
    coresets, sources = {}, [i % 2 for i in range(24)]
    for report in ("confident", "avoided"):
        model, opt, _, batch, loss_fn = flipped_targets(2, "anchored_consensus", shift=shift)
        wrapper = CoresetOptimizer(
            opt, model, coreset_size=6, sketch_modules=["fc2"], sketch_dim=10_000, suspect_report=report
        )
        params = [model.fc2.weight, model.fc2.bias]
        normalized = normalize_sketches(per_example_grads_loop(model, params, batch, loss_fn, 24), opt, params, "adam")
        with torch.no_grad():
            losses = loss_fn(batch)
        rule = confident_suspects if report == "confident" else anchored_suspects
        want = []
        for s in range(2):
            rows = [i for i in range(24) if sources[i] == s]
            want += [j for j, f in zip(rows, rule(normalized[rows], losses[rows]).tolist()) if f]
        coresets[report] = wrapper.select(batch, loss_fn, sources=sources)
        assert torch.nonzero(coresets[report].suspects).flatten().tolist() == sorted(want)
    assert torch.nonzero(coresets["confident"].suspects).flatten().tolist() == confident_flags
    assert coresets["avoided"].suspects.sum() > 0
    assert torch.equal(coresets["confident"].indices, coresets["avoided"].indices)
    torch.testing.assert_close(coresets["confident"].weights, coresets["avoided"].weights)


@pytest.mark.parametrize("bad", ["strict", None, 1])
def test_suspect_report_is_checked(bad):
    with pytest.raises(ValueError, match="suspect_report must be one of"):
        AnchoredConsensus(suspect_report=bad)
