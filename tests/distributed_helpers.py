"""Shared by tests/distributed/test_*.py: a tiny model, the global batches, and a 2-process launcher.

Run as a script (``python distributed_helpers.py OUT_DIR``) it is one rank of a gloo group
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the environment): it runs every scenario of
SCENARIOS and saves what each rank saw to ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script by torchrun: the package from this checkout

from coreset_optim import AnchoredConsensus, SketchedMethod  # noqa: E402


@dataclasses.dataclass(kw_only=True)
class FeatureReference(AnchoredConsensus):
    """The anchored default with a reference each rank computes for its own rows, ten times the
    square of the first input feature: what select() gathers besides the sketches (the base
    model's losses need a peft model; the gather is the same)."""

    def sketches(self, context):
        rows = SketchedMethod.sketches(self, context)
        return dataclasses.replace(rows, reference_losses=10 * context.batch_pass.batch[0][:, 0] ** 2)


# name: per-rank batch sizes and CoresetOptimizer options. Sources: "a", "b", "c" (see global_batch).
SCENARIOS = {
    # Even shards, compression active (D = 27 > sketch_dim = 10), string source ids.
    "even": dict(sizes=[8, 8], options=dict(coreset_size=5, sketch_dim=10)),
    # Uneven shards, sketch and backward micro-batches of 2: rank 0 makes 5 sketch calls and 1
    # backward call (2 of its "a"/"b" examples), rank 1 2 sketch calls and 2 backward calls (its 3
    # examples of the kept source "c").
    "uneven": dict(
        sizes=[9, 3],
        rank_sources=[["a", "b"], ["c"]],
        options=dict(coreset_size=5, sketch_dim=10, sketch_batch_size=2, micro_batch_size=2, keep_sources=["c"]),
    ),
    # Rank 0 holds 6 examples of source "a", rank 1 2 of "c": the proportional split of 2 gives
    # "c" nothing, so rank 1 selects nothing and must still join DDP's all-reduce.
    "rank1_empty": dict(
        sizes=[6, 2], rank_sources=[["a"], ["c"]], options=dict(coreset_size=2, sketch_dim=10, keep_sources=None)
    ),
    # The optimizer sees the inner model (no ``no_sync`` to use), loss_fn the DDP wrapper: every
    # rank makes as many backward calls as the busiest one (rank 0: 3 calls for 6 examples; rank 1:
    # 2 calls for its 3 kept "c" examples, then one zero-weight call).
    # DDP then broadcasts buffers at every forward, so the sketch pass must make the same number of
    # forwards on every rank: one, with sketch_batch_size >= the largest shard.
    "inner_model": dict(
        sizes=[9, 3],
        rank_sources=[["a", "b"], ["c"]],
        inner=True,
        options=dict(coreset_size=9, sketch_dim=10, sketch_batch_size=16, micro_batch_size=2, keep_sources=["c"]),
    ),
    # As "uneven", but the optimizer was built on the inner model (as Trainer and Accelerate do)
    # and select() is given the DDP wrapper: uneven sketch forwards are fine again.
    "select_model": dict(
        sizes=[9, 3],
        rank_sources=[["a", "b"], ["c"]],
        inner=True,
        select_model=True,
        options=dict(coreset_size=9, sketch_dim=10, sketch_batch_size=2, micro_batch_size=2, keep_sources=["c"]),
    ),
    # As "uneven" with one output row per sketch block: the ranks sum every block's per-source
    # scores (one all-reduce per block, as many blocks on both ranks although their shards differ).
    "row_blocks": dict(
        sizes=[9, 3],
        rank_sources=[["a", "b"], ["c", "a"]],
        options=dict(
            coreset_size=5,
            sketch_dim=4,
            sketch_batch_size=2,
            micro_batch_size=2,
            sketch_block_bytes=1,
            sketch_modules=r"(module[.])?(hidden|head)",
        ),
    ),
    # As "uneven" with selection="random": no pass over the batch at all, no gather (every rank
    # builds the same unjudged rows), rank 0 draws and broadcasts, each rank backpropagates its share.
    "random": dict(
        sizes=[9, 3],
        rank_sources=[["a", "b"], ["c"]],
        options=dict(coreset_size=5, micro_batch_size=2, keep_sources=["c"], selection="random"),
    ),
    # The anchored default with a reference gathered from both ranks, its gate always open.
    "reference": dict(
        sizes=[9, 7],
        rank_sources=[["a", "b"], ["a", "b"]],
        options=dict(coreset_size=5, selection=FeatureReference(sketch_dim=10, noise_gate=0.0)),
    ),
    # coreset_size >= global batch: every valid example, no sketch pass.
    "all": dict(sizes=[5, 2], options=dict(coreset_size=100, micro_batch_size=2)),
    # ratio budget on the global batch, no compression (sketch_dim >= D).
    "ratio": dict(
        sizes=[7, 5], options=dict(coreset_ratio=0.5, sketch_dim=64, selection="facility_location", similarity="cosine")
    ),
    # distributed=False: each rank selects 3 of its own 6; DDP averages the two coreset gradients.
    "per_rank": dict(sizes=[6, 6], options=dict(coreset_size=3, sketch_dim=10, distributed=False)),
}
GLOBAL_SCENARIOS = [n for n, spec in SCENARIOS.items() if spec["options"].get("distributed", "auto") is not False]


class TinyNet(nn.Module):
    """Linear -> tanh -> Linear, with a buffer so DDP has buffers to broadcast."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(5, 8)
        self.head = nn.Linear(8, 3)
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.hidden(x) * self.scale))


def make_model() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet()


def per_example_loss(model: nn.Module):
    return lambda batch: F.cross_entropy(model(batch[0]), batch[1], reduction="none")


def global_batch(name: str, step: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The whole batch of a scenario's step (rank 0's rows first), deterministic."""
    spec = SCENARIOS[name]
    sizes = spec["sizes"]
    total = sum(sizes)
    g = torch.Generator().manual_seed(1000 * step + len(name))
    x = torch.randn(total, 5, generator=g)
    y = torch.randint(0, 3, (total,), generator=g)
    choices = spec.get("rank_sources", [["a", "b", "c"]] * len(sizes))
    src = [names[int(i)] for names, n in zip(choices, sizes) for i in torch.randint(0, len(names), (n,), generator=g)]
    return x, y, src


def shard(name: str, step: int, rank: int):
    x, y, src = global_batch(name, step)
    sizes = SCENARIOS[name]["sizes"]
    a = sum(sizes[:rank])
    b = a + sizes[rank]
    return (x[a:b], y[a:b]), src[a:b]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    script: Path, out_dir: Path, world_size: int = 2, timeout: float = 120.0, args: list[str] | None = None
) -> list[str]:
    """Run ``script`` as ``world_size`` ranks of a local gloo group; returns each rank's output."""
    port = free_port()
    procs = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            OMP_NUM_THREADS="1",
        )
        cmd = [sys.executable, str(script), str(out_dir), *(args or [])]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, out) in enumerate(zip(procs, outputs)):
        if p.returncode != 0:
            raise AssertionError(f"rank {rank} exited with {p.returncode}:\n{out}")
    return outputs


def torchrun(script: Path, *args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 script args`` at one thread,
    the repository and tests/ on PYTHONPATH (``env``: more variables); asserts it exited 0 (the
    output's tail in the message) and returns it."""
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    done = subprocess.run(
        [*cmd, *args],
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def run_rank(out_dir: Path) -> None:
    import torch.distributed as dist

    from coreset_optim import CoresetOptimizer
    from coreset_optim.distributed import shutdown

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results = {}
    for name, spec in SCENARIOS.items():
        model = make_model()
        ddp = nn.parallel.DistributedDataParallel(model)
        wrapped = model if spec.get("inner") else ddp
        opt = CoresetOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), wrapped, **spec["options"])
        loss_fn = per_example_loss(ddp)
        extra = dict(model=ddp) if spec.get("select_model") else {}
        # Step 0 makes Adam's state non-trivial; step 1 is the one compared with one process.
        batch, src = shard(name, 0, rank)
        opt.zero_grad()
        opt.select(batch, loss_fn, sources=src, **extra)
        opt.step()
        before = {
            "model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": opt.optimizer.state_dict(),
            "generator": opt.generator.get_state(),  # "random" draws with it
        }
        batch, src = shard(name, 1, rank)
        opt.zero_grad()
        c = opt.select(batch, loss_fn, sources=src, **extra)
        results[name] = dict(
            before=before,
            grads={n: p.grad.clone() for n, p in model.named_parameters()},
            indices=c.indices.clone(),
            weights=c.weights.clone(),
            local_indices=c.local_indices.clone(),
            local_weights=c.local_weights.clone(),
            rank_sizes=list(c.rank_sizes),
            source_counts={k: tuple(v) for k, v in c.source_counts.items()},
            num_valid=c.num_valid,
            loss=c.loss.clone(),
            sub_batch=c.batch,
            implausible_share=getattr(opt.selection, "implausible_share", None),
        )
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    shutdown()


FSDP_SCENARIO = dict(
    sizes=[6, 6], options=dict(coreset_size=5, sketch_dim=10, micro_batch_size=2, selection="gradient_matching")
)


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def run_fsdp_rank(out_dir: Path) -> None:
    """FSDP2 (fully_shard) on a CPU mesh: sharded params, grads and Adam state (DTensors)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from coreset_optim import CoresetOptimizer

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = make_model()
    fully_shard(model.head, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = CoresetOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), model, **FSDP_SCENARIO["options"])
    loss_fn = per_example_loss(model)
    SCENARIOS["fsdp"] = FSDP_SCENARIO
    batch, src = shard("fsdp", 0, rank)
    opt.zero_grad()
    opt.select(batch, loss_fn, sources=src)
    opt.step()
    state = opt.optimizer.state_dict()
    before = {
        "model": {k: _full(v).clone() for k, v in model.state_dict().items()},
        "optimizer": {
            "state": {i: {k: _full(v).clone() for k, v in s.items()} for i, s in state["state"].items()},
            "param_groups": state["param_groups"],
        },
    }
    batch, src = shard("fsdp", 1, rank)
    opt.zero_grad()
    c = opt.select(batch, loss_fn, sources=src)
    result = dict(
        before=before,
        grads={n: _full(p.grad).clone() for n, p in model.named_parameters()},
        indices=c.indices.clone(),
        weights=c.weights.clone(),
        local_indices=c.local_indices.clone(),
        num_valid=c.num_valid,
    )
    torch.save({"fsdp": result}, Path(out_dir) / f"rank{rank}.pt")
    dist.barrier()
    # FSDP2 on gloo sometimes aborts in the interpreter's shutdown ("terminate called without an
    # active exception") after everything is done; leave without tearing down.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    if sys.argv[2:] == ["fsdp"]:
        run_fsdp_rank(Path(sys.argv[1]))
    else:
        run_rank(Path(sys.argv[1]))


# --- the sharded Trainer tests (FSDP2, DeepSpeed): one process as the reference, exact resume --


def max_difference(a: dict, b: dict) -> float:
    """The largest absolute difference between two ``{name: tensor}`` dicts with the same names."""
    assert a.keys() == b.keys()
    return max((a[n] - b[n]).abs().max().item() for n in a)


def assert_resumed_exactly(resumed: dict, full: dict) -> None:
    """A run resumed from step 2's checkpoint continues the uninterrupted 4-step run exactly: the
    same steps, coresets, counters, generator state and parameters (difference 0)."""
    assert resumed["steps"] == full["steps"][2:] == [2, 3]
    assert resumed["indices"] == full["indices"][2:]
    for a, b in zip(resumed["weights"], full["weights"][2:]):
        assert torch.equal(a, b)
    assert resumed["counters"] == full["counters"] == (4, 4)
    assert torch.equal(resumed["generator"], full["generator"])
    assert max_difference(resumed["params"], full["params"]) == 0.0
