"""A grid of selection configurations run on one tiny model: the bit-for-bit reference of a refactor.

``run_grid()`` runs every configuration for two steps (the second reads the Adam state the first
left) and returns, per configuration, the coresets chosen and the gradients backpropagated.
``benchmarks/equivalence.py`` saved its result before the selection methods became objects
(``tests/data/selection_grid_reference.pt``); ``tests/optimizer/test_equivalence.py`` checks that the
code of today gives the very same tensors.
"""

from __future__ import annotations

import torch

from coreset_optim import CoresetOptimizer
from coreset_optim.checkpoints import RENAMED
from core_utils import TwoLayer, make_batch, regression_loss

SOURCES = ["a"] * 9 + ["b"] * 5 + ["c"] * 2  # one large, one middle, one small source

# name -> CoresetOptimizer keyword options (coreset_size 6 of 16 unless given), as the reference
# commit spelled them (the target method's options have lost their "target_" prefix since: RENAMED)
GRID: dict[str, dict] = {
    "default": {},
    "colm": {"preset": "colm"},
    "colm_adam": {"preset": "colm", "normalize": "adam"},
    "fl_exact": {"selection": "facility_location", "sketch": "exact", "sketch_dim": 7},
    "fl_projection": {"selection": "facility_location", "sketch": "projection", "sketch_dim": 8},
    "fl_cosine_none": {"selection": "facility_location", "similarity": "cosine", "normalize": None},
    "fl_zo_probes": {"selection": "facility_location", "sketch": "zeroth_order", "zo_probes": 3, "zo_eps": 1e-2},
    "fl_keep_none": {"selection": "facility_location", "keep_sources": None},
    "fl_keep_list": {"selection": "facility_location", "keep_sources": ["b"]},
    "fl_temperature": {"selection": "facility_location", "temperature": 2.0},
    "gm": {"selection": "gradient_matching"},
    "gm_projection": {"selection": "gradient_matching", "sketch": "projection", "sketch_dim": 16},
    "random": {"selection": "random"},
    "loss": {"selection": "loss"},
    "trimmed_loss": {"selection": "trimmed_loss"},
    "consensus_loss": {"selection": "consensus_loss", "sketch": "exact"},
    "consensus_small_blocks": {"selection": "consensus_loss", "sketch_block_bytes": 256},
    "consensus_ratio": {"selection": "consensus_loss", "coreset_size": None, "coreset_ratio": 0.3},
    "take_all": {"coreset_size": 16},
    "micro_batches": {"selection": "facility_location", "micro_batch_size": 2, "sketch_batch_size": 3},
    "target": {"selection": "target"},
    "target_curvature": {"selection": "target", "target_curvature": 0.5, "sketch_dim": 5},
    "target_per_source": {"selection": "target", "target_per_source": True, "target_refresh": 2},
    "target_sgd": {"selection": "target", "normalize": None},
}


def select_with_target(opt, batch, loss_fn, sources, target):
    """One selection; ``target``: held-out examples for the target method (None otherwise)."""
    if target is not None:
        opt.selection.set_target(target)
    return opt.select(batch, loss_fn, sources=sources)


def run_one(options: dict, steps: int = 2) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = TwoLayer(5, 6, 3)
    inner = torch.optim.Adam(model.parameters(), lr=1e-2)
    kwargs = {"coreset_size": 6, **{RENAMED.get(k, k): v for k, v in options.items()}}
    opt = CoresetOptimizer(inner, model, seed=3, **kwargs)
    loss_fn = regression_loss(model)
    target = make_batch(4, 5, 3, seed=99) if "target" in str(options.get("selection")) else None
    out: dict[str, torch.Tensor] = {}
    for step in range(steps):
        batch = make_batch(16, 5, 3, seed=step)
        opt.zero_grad()
        coreset = select_with_target(opt, batch, loss_fn, SOURCES, target)
        out[f"{step}/indices"] = coreset.indices.clone()
        out[f"{step}/weights"] = coreset.weights.clone()
        out[f"{step}/loss"] = torch.as_tensor(coreset.loss).detach().clone()
        if coreset.losses_computed:  # no pass, no losses ("random")
            out[f"{step}/losses"] = coreset.losses.detach().clone()
        if coreset.suspects is not None:
            out[f"{step}/suspects"] = torch.as_tensor(coreset.suspects).clone()
        for name, p in model.named_parameters():
            out[f"{step}/grad/{name}"] = p.grad.clone()
        opt.step()
    for name, p in model.named_parameters():
        out[f"param/{name}"] = p.detach().clone()
    return out


def run_grid() -> dict[str, dict[str, torch.Tensor]]:
    return {name: run_one(options) for name, options in GRID.items()}
