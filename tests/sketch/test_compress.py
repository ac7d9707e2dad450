"""Compression to sketch_dim coordinates per source, and the ratio budget."""

import math

import pytest
import torch

from coreset_optim.sketch.compress import compress_per_source
from coreset_optim.config import CoresetConfig
from core_utils import build, make_batch, regression_loss


def _reference(sketches, valid, codes, num_sources, dim):
    B, D = sketches.shape
    out = torch.full((B, min(dim, D)), float("nan"))
    for s in range(num_sources):
        rows = [i for i in range(B) if valid[i] and codes[i] == s]
        if not rows:
            continue
        score = [sum(abs(float(sketches[i, c])) for i in rows) / len(rows) for c in range(D)]
        cols = sorted(sorted(range(D), key=lambda c: -score[c])[: min(dim, D)])
        for i in rows:
            out[i] = sketches[i, cols]
    return out


@pytest.mark.parametrize("dim", [1, 3, 7, 50])
def test_compress_per_source_matches_loop(dim):
    g = torch.Generator().manual_seed(dim)
    sketches = torch.randn(10, 7, generator=g) * torch.linspace(0.1, 3, 7)
    codes = torch.tensor([0, 1, 0, 2, 1, 0, 0, 1, 2, 0])
    valid = torch.ones(10, dtype=torch.bool)
    valid[[3, 8]] = False  # source 2 has no valid example
    sketches[3] = float("nan")
    got = compress_per_source(sketches, valid, codes, 3, dim)
    torch.testing.assert_close(got, _reference(sketches, valid, codes, 3, dim), equal_nan=True)


def test_select_sketch_dim_shapes():
    model, opt, wrapper = build(coreset_size=3, sketch_dim=4, selection="gradient_matching")
    cs = wrapper.select(make_batch(9), regression_loss(model))
    assert cs.sketches.shape == (9, 4)
    model, opt, wrapper = build(coreset_size=30)
    cs = wrapper.select(make_batch(9), regression_loss(model))
    assert cs.sketches.shape == (9, 0)  # no sketch pass when everything is selected


@pytest.mark.parametrize(
    "ratio,B,expected", [(0.25, 12, 3), (0.3, 10, 3), (0.01, 10, 1), (1 / 3, 9, 3), (0.34, 9, 4), (1.0, 7, 7)]
)
def test_ratio_budget(ratio, B, expected):
    assert CoresetConfig(coreset_ratio=ratio).budget(B) == expected == max(1, math.ceil(round(ratio * B, 9)))
    model, opt, wrapper = build(coreset_size=None, coreset_ratio=ratio)
    cs = wrapper.select(make_batch(B), regression_loss(model))
    assert len(cs) == expected
