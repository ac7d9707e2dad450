"""One rank of a 2-process gloo group running selection="target" (see tests/distributed/test_distributed_target.py).

Run as ``python distributed_target.py OUT_DIR``; saves what the rank saw to ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import copy
import sys
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import distributed_helpers as h  # noqa: E402

# name: per-rank batch sizes, how the target is spread, options.
SCENARIOS = {
    # The same target on every rank; first-order gains; one greedy over all sources.
    "same_target": dict(sizes=[8, 8], target="same", options=dict(coreset_size=5, per_source=False)),
    # Each rank holds part of the target; second-order term on CountSketched updates (D = 27 >
    # sketch_dim = 10); uneven shards and chunks; the cached target gradient reused once.
    "split_target": dict(
        sizes=[9, 3],
        target="split",
        options=dict(
            coreset_size=4,
            sketch_dim=10,
            sketch_batch_size=2,
            micro_batch_size=2,
            curvature=200.0,
            refresh=2,
            per_source=False,
        ),
    ),
    # Per-source budgets.
    "per_source": dict(sizes=[7, 5], target="same", options=dict(coreset_size=6, per_source=True)),
}
STEPS = 3


def batch(name: str, step: int, rank: int | None = None):
    """The global batch of ``step`` (or ``rank``'s shard of it), with sources."""
    sizes = SCENARIOS[name]["sizes"]
    g = torch.Generator().manual_seed(100 * step + len(name))
    total = sum(sizes)
    x, y = torch.randn(total, 5, generator=g), torch.randint(0, 3, (total,), generator=g)
    src = [["a", "b", "c"][int(i)] for i in torch.randint(0, 3, (total,), generator=g)]
    if rank is None:
        return (x, y), src
    a = sum(sizes[:rank])
    b = a + sizes[rank]
    return (x[a:b], y[a:b]), src[a:b]


def target(name: str, rank: int | None = None):
    """The global target (3 examples); under "split" rank 0 holds 2 and rank 1 holds 1."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(3, 5, generator=g), torch.randint(0, 3, (3,), generator=g)
    if rank is None or SCENARIOS[name]["target"] == "same":
        return (x, y)
    part = slice(0, 2) if rank == 0 else slice(2, 3)
    return (x[part], y[part])


def run_rank(out_dir: Path) -> None:
    import torch.distributed as dist

    from coreset_optim import CoresetOptimizer
    from coreset_optim.distributed import shutdown

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results = {}
    for name, spec in SCENARIOS.items():
        model = h.make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = CoresetOptimizer(
            torch.optim.AdamW(model.parameters(), lr=0.05), ddp, selection="target", **spec["options"]
        )
        opt.selection.set_target(target(name, rank))
        loss_fn = h.per_example_loss(ddp)
        steps = []
        for step in range(STEPS):
            before = {
                "model": {k: v.clone() for k, v in model.state_dict().items()},
                "optimizer": copy.deepcopy(opt.optimizer.state_dict()),
            }  # step() works in place
            (x, y), src = batch(name, step, rank)
            opt.zero_grad()
            c = opt.select((x, y), loss_fn, sources=src)
            steps.append(
                dict(
                    before=before,
                    grads={n: p.grad.clone() for n, p in model.named_parameters()},
                    indices=c.indices.clone(),
                    weights=c.weights.clone(),
                    num_valid=c.num_valid,
                    source_counts={k: tuple(v) for k, v in c.source_counts.items()},
                    target_grad=opt.selection.cache["grad"].clone(),
                    computed_at=opt.selection.cache["computed_at"],
                )
            )
            opt.step()
        results[name] = steps
    # A non-finite target loss on one rank only: every rank raises, none hangs.
    model = h.make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = CoresetOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), ddp, coreset_size=4, selection="target")
    x, y = target("split_target", rank)
    if rank == 1:
        x = x.clone()
        x[0, 0] = float("nan")
    (bx, by), _ = batch("same_target", 0, rank)
    try:
        opt.selection.set_target((x, y))
        opt.select((bx, by), h.per_example_loss(ddp))
        results["nan_target"] = None
    except ValueError as exc:
        results["nan_target"] = str(exc)
    results["nan_target_grads"] = [p.grad for p in model.parameters()]
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    shutdown()


if __name__ == "__main__":
    run_rank(Path(sys.argv[1]))
