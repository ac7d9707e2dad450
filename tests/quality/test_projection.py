import torch

from coreset_optim import CoresetOptimizer
from coreset_optim.sketch.projection import countsketch

from quality_helpers import make_loss_fn, tiny_batch, tiny_model


def test_deterministic_under_seed():
    x = torch.randn(6, 300, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(countsketch(x, 64, seed=5), countsketch(x, 64, seed=5))
    assert not torch.equal(countsketch(x, 64, seed=5), countsketch(x, 64, seed=6))


def test_matches_explicit_projection_matrix():
    x = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    from coreset_optim.sketch.projection import countsketch_hash

    buckets, signs = countsketch_hash(50, 8, seed=2)
    matrix = torch.zeros(50, 8)
    matrix[torch.arange(50), buckets] = signs
    torch.testing.assert_close(countsketch(x, 8, seed=2), x @ matrix)


def test_pairwise_distances_approximately_preserved():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(20, 4000, generator=g) * torch.rand(20, 1, generator=g)
    y = countsketch(x, 1024, seed=3)
    dx = torch.cdist(x, x)
    dy = torch.cdist(y, y)
    off = ~torch.eye(20, dtype=torch.bool)
    rel = (dy[off] / dx[off] - 1).abs()
    assert rel.max() < 0.25
    assert rel.median() < 0.08


def test_projection_mode_in_optimizer_uses_seed_from_state():
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = tiny_batch()
    wrapper = CoresetOptimizer(
        opt, model, coreset_size=6, sketch="projection", sketch_dim=4, seed=9, selection="gradient_matching"
    )
    result = wrapper.select(batch, make_loss_fn(model), sources=batch["source"])
    assert result.sketches.shape == (24, 4)
    state = wrapper.state_dict()
    assert state["coreset_optim"]["config"]["seed"] == 9
    assert state["coreset_optim"]["selection"]["options"]["sketch"] == "projection"
    torch.testing.assert_close(result.weights.sum(), torch.tensor(24.0))
