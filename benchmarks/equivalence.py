"""Save the selection grid's coresets and gradients (``tests/selection_grid.py``) as the reference
that ``tests/optimizer/test_equivalence.py`` compares today's code with, bit for bit.

Run once on the commit before a refactor: ``python benchmarks/equivalence.py``. It also saves two
checkpoints of that code (``tests/data/checkpoint_v0.pt``: a target selection with its cached target
gradient, and CoLM's preset) with the coreset each chose next, which ``tests/optimizer/test_state.py``
loads into today's code. Both files were written at commit f7384e5.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from selection_grid import GRID, run_grid  # noqa: E402

OUT = ROOT / "tests" / "data" / "selection_grid_reference.pt"
CHECKPOINTS = ROOT / "tests" / "data" / "checkpoint_v0.pt"
CHECKPOINTED = {
    "target": dict(selection="target", target_refresh=3, target_curvature=0.5),
    "colm": dict(preset="colm", sketch_dim=9),
}


def save_checkpoints(commit: str) -> None:
    """One step of each CHECKPOINTED configuration, its state dict, and the coreset it chose next."""
    from coreset_optim import CoresetOptimizer
    from core_utils import TwoLayer, make_batch, regression_loss
    from selection_grid import SOURCES

    out = {"commit": commit}
    for name, options in CHECKPOINTED.items():
        torch.manual_seed(0)
        model = TwoLayer(5, 6, 3)
        opt = CoresetOptimizer(torch.optim.Adam(model.parameters(), lr=1e-2), model, coreset_size=6, seed=3, **options)
        loss_fn = regression_loss(model)
        extra = {"target": make_batch(4, 5, 3, seed=99)} if name == "target" else {}
        opt.zero_grad()
        opt.select(make_batch(16, 5, 3, seed=0), loss_fn, sources=SOURCES, **extra)
        opt.step()
        state = opt.state_dict()
        model_state = {k: v.clone() for k, v in model.state_dict().items()}
        opt.zero_grad()
        chosen = opt.select(make_batch(16, 5, 3, seed=1), loss_fn, sources=SOURCES, **extra)
        out[name] = {
            "options": options,
            "model": model_state,
            "optimizer": state,
            "next_indices": chosen.indices.clone(),
            "next_weights": chosen.weights.clone(),
        }
    torch.save(out, CHECKPOINTS)


def main() -> None:
    torch.set_num_threads(1)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    results = run_grid()
    torch.save({"commit": commit, "grid": GRID, "results": results}, OUT)
    save_checkpoints(commit)
    print(f"{len(results)} configurations saved to {OUT.relative_to(ROOT)} (commit {commit[:7]})")


if __name__ == "__main__":
    main()
