"""selection="trimmed_loss": highest loss without the high-loss cluster, against brute force."""

from __future__ import annotations

import torch

from coreset_optim import CoresetOptimizer
from coreset_optim.methods.trimmed_loss import high_loss_cluster, suspect_examples, trimmed_loss_coreset

from core_utils import TwoLayer


def brute_force_cluster(x: list[float], ratio: float = 3.0, min_examples: int = 6) -> set[int]:
    """Every cut of the sorted losses, scored gap / std(below), by plain Python."""
    n = len(x)
    if n < min_examples:
        return set()
    order = sorted(range(n), key=lambda i: x[i])
    s = [x[i] for i in order]
    best, best_cut = -1.0, None
    for c in range(min_examples // 2, n):
        if 2 * (n - c) > n:
            continue
        below = s[:c]
        mean = sum(below) / c
        std = (sum((v - mean) ** 2 for v in below) / c) ** 0.5
        score = (s[c] - s[c - 1]) / (std + 1e-12)
        if score > best:
            best, best_cut = score, c
    if best < ratio:
        return set()
    return {i for i in range(n) if x[i] >= s[best_cut]}


def test_cluster_matches_brute_force_on_random_mixtures():
    g = torch.Generator().manual_seed(0)
    for trial in range(60):
        n_clean = int(torch.randint(3, 30, (1,), generator=g))
        n_noisy = int(torch.randint(0, 10, (1,), generator=g))
        clean = torch.rand(n_clean, generator=g) * 0.8
        noisy = 1.5 + torch.rand(n_noisy, generator=g) * float(torch.rand(1, generator=g)) * 3
        x = torch.cat([clean, noisy])[torch.randperm(n_clean + n_noisy, generator=g)].double()
        got = set(torch.nonzero(high_loss_cluster(x)).flatten().tolist())
        assert got == brute_force_cluster(x.tolist()), (trial, x.tolist())


def test_separated_corrupted_rows_are_found_and_a_smooth_spread_is_left_alone():
    clean = torch.linspace(0.1, 1.0, 20)
    noisy = torch.tensor([3.0, 3.2, 2.9, 3.4])
    assert high_loss_cluster(torch.cat([clean, noisy])).tolist() == [False] * 20 + [True] * 4
    assert not high_loss_cluster(clean).any()
    assert not high_loss_cluster(torch.linspace(0, 5, 5)).any()  # too few to judge
    with_nan = torch.cat([clean, noisy, torch.tensor([float("nan")])])
    assert high_loss_cluster(with_nan).tolist() == [False] * 20 + [True] * 4 + [False]


def test_selector_takes_the_hardest_clean_examples_then_the_mildest_suspects():
    losses = torch.cat([torch.linspace(0.1, 1.0, 20), torch.tensor([3.0, 3.2, 2.9, 3.4])])
    chosen = trimmed_loss_coreset(losses, 5)
    assert chosen.tolist() == [19, 18, 17, 16, 15]
    chosen = trimmed_loss_coreset(losses, 22)
    assert chosen.tolist()[20:] == [22, 20]  # clean ones ran out: the suspects with the lowest loss


def test_select_backpropagates_the_trimmed_choice_and_reports_suspects():
    """A hand-made batch: rows 3, 8, 13, 17 get targets far off (unlearnable), the Coreset's
    suspects are exactly those rows, and none of them is trained on."""
    torch.manual_seed(0)
    model = TwoLayer(d_in=4, hidden=6, d_out=2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    wrapper = CoresetOptimizer(opt, model, coreset_size=6, selection="trimmed_loss")
    g = torch.Generator().manual_seed(1)
    x = torch.randn(20, 4, generator=g)
    with torch.no_grad():
        y = model(x) + 0.3 * torch.randn(20, 2, generator=g)
    corrupted = [3, 8, 13, 17]
    y[corrupted] += 25.0
    batch = {"x": x, "y": y}

    def loss_fn(b):
        return (model(b["x"]) - b["y"]).pow(2).mean(1)

    sources = ["a"] * 10 + ["b"] * 10
    coreset = wrapper.select(batch, loss_fn, sources=sources)
    assert torch.nonzero(coreset.suspects).flatten().tolist() == corrupted
    assert not set(coreset.indices.tolist()) & set(corrupted)
    per_source = {
        s: sorted(range(10 * i, 10 * i + 10), key=lambda j: -float(coreset.losses[j])) for i, s in enumerate("ab")
    }
    want = sorted(
        [j for j in per_source["a"] if j not in corrupted][:3] + [j for j in per_source["b"] if j not in corrupted][:3]
    )
    assert coreset.indices.tolist() == want
    assert torch.equal(
        suspect_examples(
            coreset.sketches, coreset.losses, torch.ones(20, dtype=torch.bool), torch.tensor([0] * 10 + [1] * 10), 2
        ),
        coreset.suspects,
    )


def test_selectors_that_do_not_judge_report_no_suspects():
    model = TwoLayer(d_in=4, hidden=6, d_out=2)
    wrapper = CoresetOptimizer(torch.optim.AdamW(model.parameters()), model, coreset_size=3, selection="loss")
    batch = {"x": torch.randn(8, 4), "y": torch.randn(8, 2)}
    coreset = wrapper.select(batch, lambda b: (model(b["x"]) - b["y"]).pow(2).mean(1))
    assert coreset.suspects is None
