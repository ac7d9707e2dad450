"""The pure pieces of coreset_optim.distributed, in one process."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coreset_optim import CoresetOptimizer
from coreset_optim.sketch.compress import compress_per_source
from coreset_optim.distributed import (
    global_source_names,
    process_group,
    rows_on_coordinates,
    shutdown,
    source_abs_sums,
    split_selection,
)


def test_global_source_names_follow_first_appearance_in_rank_order():
    names, maps = global_source_names([["b", "a"], ["c", "b"], []])
    assert names == ["b", "a", "c"]
    assert maps == [[0, 1], [2, 0], []]


def test_split_selection_gives_local_indices_of_each_rank():
    indices = torch.tensor([0, 3, 4, 9])
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    local, w = split_selection(indices, weights, 3, 9)
    torch.testing.assert_close(local, torch.tensor([0, 1]))
    torch.testing.assert_close(w, torch.tensor([2.0, 3.0]))
    local, w = split_selection(indices, weights, 5, 9)
    assert local.numel() == 0 and w.numel() == 0


def test_global_coordinates_reproduce_per_source_compression():
    """Summing |sketch| per source over shards, then top-k, equals one-process compression."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 12, generator=g)
    codes = torch.tensor([0, 1, 0, 0, 1, 2, 0, 1, 1, 0])
    valid = torch.ones(10, dtype=torch.bool)
    valid[3] = False
    expected = compress_per_source(x, valid, codes, 3, 4)
    sums = source_abs_sums(x[:6], valid[:6], codes[:6], 3) + source_abs_sums(x[6:], valid[6:], codes[6:], 3)
    coords = torch.stack([sums[s].topk(4).indices.sort().values for s in range(3)])
    got = torch.cat(
        [
            rows_on_coordinates(x[:6], valid[:6], codes[:6], coords),
            rows_on_coordinates(x[6:], valid[6:], codes[6:], coords),
        ]
    )
    torch.testing.assert_close(got, expected, equal_nan=True)


def test_process_group_modes_without_init():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    assert process_group("auto") is None
    assert process_group(False) is None
    with pytest.raises(ValueError, match="distributed=True"):
        process_group(True)


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_shutdown_destroys_the_group_and_is_a_no_op_without_one():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    shutdown()  # nothing to do
    store = torch.distributed.HashStore()
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        shutdown()
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def test_distributed_true_without_process_group_fails_before_any_change():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = CoresetOptimizer(torch.optim.AdamW(model.parameters()), model, coreset_size=2, distributed=True)
    before = [p.detach().clone() for p in model.parameters()]
    batch = (torch.randn(6, 4), torch.randint(0, 3, (6,)))
    with pytest.raises(ValueError, match="init_process_group"):
        opt.select(batch, lambda b: F.cross_entropy(model(b[0]), b[1], reduction="none"))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_distributed_option_is_checked(bad):
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="distributed must be"):
        CoresetOptimizer(torch.optim.AdamW(model.parameters()), model, coreset_size=2, distributed=bad)


def test_select_model_must_be_a_module():
    model = nn.Linear(4, 3)
    opt = CoresetOptimizer(torch.optim.AdamW(model.parameters()), model, coreset_size=2)
    batch = (torch.randn(6, 4), torch.randint(0, 3, (6,)))
    with pytest.raises(TypeError, match="model must be"):
        opt.select(batch, lambda b: F.cross_entropy(model(b[0]), b[1], reduction="none"), model="ddp")
    assert all(p.grad is None for p in model.parameters())
