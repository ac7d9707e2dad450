"""Coreset training across processes: one coreset per step from the batches of all ranks.

    torchrun --nproc_per_node 2 examples/distributed_train.py              # plain torch DDP
    torchrun --nproc_per_node 2 examples/distributed_train.py --accelerate # the same via Accelerate
    accelerate launch --num_processes 2 --cpu examples/distributed_train.py --accelerate

Each rank draws its own 32 examples of a 3-source mixture; select() picks 16 of the global 64 and
each rank backpropagates the ones it holds. Rank 0 prints the global per-source counts.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from coreset_optim import CoresetOptimizer
from coreset_optim.distributed import shutdown

SOURCES = ("code", "math", "chat")


def make_batch(step: int, rank: int, size: int):
    g = torch.Generator().manual_seed(1000 * step + rank)
    source = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), size, replacement=True, generator=g)
    x = torch.randn(size, 16, generator=g) + source[:, None].float()
    y = (x.sum(1) > 2 * source.float()).long() + 2 * (source == 2).long()
    return {"x": x, "y": y, "source": [SOURCES[i] for i in source.tolist()]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--accelerate", action="store_true", help="set up with accelerate.Accelerator")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4))
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    if args.accelerate:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())  # cpu=True: gloo across CPU processes
        model, inner = accelerator.prepare(model, inner)  # DDP-wrapped model, AcceleratedOptimizer
        rank, device = accelerator.process_index, accelerator.device
    else:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank = dist.get_rank()
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if backend == "nccl" else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model = nn.parallel.DistributedDataParallel(model.to(device))
        inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    # Give the DDP-wrapped model: select() then keeps DDP's gradient sync to one all-reduce per step.
    opt = CoresetOptimizer(inner, model, coreset_size=16, source_key="source")

    def loss_fn(batch):
        return F.cross_entropy(model(batch["x"].to(device)), batch["y"].to(device), reduction="none")

    for step in range(args.steps):
        batch = make_batch(step, rank, 32)
        opt.zero_grad()
        coreset = opt.select(batch, loss_fn)  # the same indices/weights on every rank
        opt.step()
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            counts = {s: f"{c.selected}/{c.in_batch}" for s, c in coreset.source_counts.items()}
            print(
                f"step {step:3d}  loss {coreset.loss.item():.4f}  global batch {sum(coreset.rank_sizes)}  "
                f"selected here {len(coreset.local_indices)}/{len(coreset)}  per source {counts}",
                flush=True,
            )
    shutdown()  # barrier, pause, destroy_process_group: gloo can hang at exit without it


if __name__ == "__main__":
    main()
