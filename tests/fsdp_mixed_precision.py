"""One process of a 1-rank gloo group: select() on a model sharded by fully_shard with a bf16
MixedPrecisionPolicy (fp32 reduce); saves the coreset and the fp32 sharded gradients
(tests/distributed/test_fsdp_mixed_precision.py)."""

import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from coreset_optim import CoresetOptimizer


def model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.ReLU()), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(12, 6, generator=g), torch.randn(12, 3, generator=g)


def main(store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", world_size=1, rank=0)
    model, x, y = model_and_batch()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    fully_shard(model[2], mp_policy=policy)  # a group with no sketched parameter
    fully_shard(model, mp_policy=policy)
    opt = CoresetOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, coreset_size=4, sketch_modules=["3"])

    def loss_fn(b):
        return (model(b[0]).float() - b[1]).pow(2).mean(1)

    coreset = opt.select((x, y), loss_fn)
    grads = {n: p.grad.full_tensor().clone() for n, p in model.named_parameters()}
    torch.save({"before": before, "indices": coreset.indices, "weights": coreset.weights, "grads": grads}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
