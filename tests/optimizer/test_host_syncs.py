"""Host synchronizations per select(): a small constant, whatever the number of sketch blocks,
chunks of examples and sources.

On a GPU every read of a tensor's value by the host (``.item()``, ``.tolist()``, ``bool(t)``, a
``nonzero``, a boolean-mask index, ...) waits for the device to finish its queue. These tests
count such calls during ``select()`` on the CPU with a ``TorchFunctionMode`` and check that the
count does not grow with the work: many tiny blocks and one-example chunks over four sources
make exactly as many as one block, one chunk and one source.
"""

from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from coreset_optim.methods.registry import METHODS
from coreset_optim.presets import PRESETS
from core_utils import build, make_batch, regression_loss, take_steps

# Calls that read a device tensor's values on the host (or need its data to size their output).
SYNCING = {
    "item",
    "tolist",
    "__bool__",
    "__int__",
    "__float__",
    "__index__",
    "nonzero",
    "argwhere",
    "bincount",
    "unique",
    "masked_select",
    "cpu",
}  # not numpy(): it refuses device tensors, the cpu() before it is the sync


class HostSyncCounter(TorchFunctionMode):
    """Counts syncing calls (by name) made while the mode is active."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in SYNCING or (name in ("__getitem__", "__setitem__") and _bool_index(args)):
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def count_syncs(options: dict, *, num_sources: int, block_bytes: int, chunk: int, target: bool = False) -> list[str]:
    """The syncing calls of one select() (after a first one, which fills caches)."""
    accepted = METHODS[options.get("selection", PRESETS["default"]["selection"])].option_names()
    blocks = {"sketch_block_bytes": block_bytes} if "sketch_block_bytes" in accepted else {}
    model, opt, wrapper = build(
        seed=0, coreset_size=4, sketch_modules=["fc1", "fc2"], sketch_batch_size=chunk, **blocks, **options
    )
    take_steps(opt, model, 2)
    loss_fn = regression_loss(model)
    batch = make_batch(16, tokens=3, seed=5)
    sources = [i % num_sources for i in range(16)]
    if target:
        wrapper.selection.set_target(make_batch(6, tokens=3, seed=9))
    wrapper.select(batch, loss_fn, sources=sources)
    wrapper.zero_grad()
    with HostSyncCounter() as counter:
        wrapper.select(make_batch(16, tokens=3, seed=6), loss_fn, sources=sources)
    return counter.calls


CONFIGS = {
    # sketch="auto" picks by the hold's size, which these configurations change: pin each mode
    "default (anchored_consensus), top coordinates": {"sketch": "exact"},
    "default (anchored_consensus), projection": {"sketch": "projection"},
    "loss": {"selection": "loss"},
    "trimmed_loss": {"selection": "trimmed_loss"},
    "random": {"selection": "random"},
    "gradient_matching, top coordinates": {"selection": "gradient_matching", "sketch": "exact"},
    "gradient_matching, projection": {"selection": "gradient_matching", "sketch": "projection"},
    "target": {"selection": "target"},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_host_syncs_do_not_grow_with_blocks_chunks_or_sources(name):
    options = CONFIGS[name]
    target = options.get("selection") == "target"
    small = count_syncs(options, num_sources=1, block_bytes=2**30, chunk=16, target=target)
    large = count_syncs(options, num_sources=4, block_bytes=64, chunk=1, target=target)
    assert sorted(large) == sorted(small), (small, large)
    assert len(small) == SYNCS_PER_SELECT[name], small


# The constants, stated in docs/performance.md (this 4-parameter sketch). Every selection: the
# sources' ids, the valid-row check, valid counts per source (budget, chooser, Coreset: bincount +
# tolist each, one copy of the validity mask). Sketch-based ones add one read of the optimizer's
# step count per sketched parameter (a host tensor for torch's Adam) and the sketch's own checks
# (top coordinates: building its source masks once, one redo check); suspect-flagging selectors
# one more per-source split of the rows (for Coreset.suspects); the target its cache check.
SYNCS_PER_SELECT = {
    "default (anchored_consensus), top coordinates": 19,
    "default (anchored_consensus), projection": 15,
    "loss": 9,
    "trimmed_loss": 11,
    "random": 9,
    "gradient_matching, top coordinates": 18,
    "gradient_matching, projection": 14,
    "target": 21,
}


def test_counter_sees_a_sync_per_block_where_there_is_one():
    """The counter is not blind: a loop that reads a flag per block is counted per block."""
    blocks = [torch.randn(3, 4) for _ in range(5)]
    with HostSyncCounter() as counter:
        for b in blocks:
            if bool(torch.isfinite(b).all()):
                b[b > 0] = 0.0
    assert counter.calls.count("__bool__") == 5
    assert counter.calls.count("__setitem__") == 5
