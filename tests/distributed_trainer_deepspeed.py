"""CoresetTrainer under DeepSpeed ZeRO 1-3 through the Trainer's ``deepspeed=`` option, one rank of a
2-rank gloo CPU group (DeepSpeed's CPU accelerator).

    DS_ACCELERATOR=cpu python -m torch.distributed.run --standalone --nproc_per_node 2 \\
        tests/distributed_trainer_deepspeed.py OUT NAME...

runs each named scenario of :data:`SCENARIOS` and saves, from rank 0, ``OUT/NAME.pt``: the full
fp32 trained parameters after training (``deepspeed.utils.safe_get_full_fp32_param``), the
global indices and weights of every selection and the logged losses.
``tests/distributed/test_trainer_deepspeed.py`` compares them with the same scenario in one process
without DeepSpeed (:func:`one_process`).

**Accelerate counts one process per CPU rank under DeepSpeed.** Without a GPU, Accelerate 1.16
finds no distributed backend of its own and sets ``num_processes = 1`` on every rank although
DeepSpeed initialized a 2-rank group: the stock Trainer then feeds every rank the whole dataset
(the ranks' batches are not shards of one global batch). :func:`deepspeed_on_cpu` sets the
process count and index from the initialized group, which is what Accelerate reports on GPUs; the
engine, ZeRO's partitioning and the Trainer's DeepSpeed checkpointing are DeepSpeed's own. It is a
test shim, not library code.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from _integrations_models import lora, make_args, make_dataset, selection_recorder, tiny_llama  # noqa: E402

GLOBAL_BATCH = 16
COMMON = dict(coreset_size=5, train_sampling_strategy="sequential", logging_steps=1, source_column="source")
# The tiny Llama's base weights hold 2048-16384 values, LoRA's 128-256: at 1000, ZeRO-3 partitions
# every base weight and keeps the LoRA weights whole (the sketch reads them outside the forward).
LORA_PERSISTENCE = 1000
# Full fine-tuning sketching the last v_proj (2048 values): every larger weight is partitioned.
V_PROJ = "model.layers.1.self_attn.v_proj"


def zero(stage: int, **extra) -> dict:
    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "bf16": {"enabled": "auto"},
        "zero_optimization": {"stage": stage, **extra},
    }
    return config


SAVE = dict(max_steps=4, save_strategy="steps", save_steps=2)

# name: the model, the DeepSpeed config and the TrainingArguments that differ from COMMON. The data
# order is the same in one process (batch 16) and on 2 ranks (8 each): rank 0's rows first.
SCENARIOS = {
    "zero1_lora": dict(model="lora", ds=zero(1), args=dict(max_steps=6, gradient_accumulation_steps=2)),
    "zero2_full": dict(model="full", ds=zero(2), args=dict(max_steps=6)),
    # the coreset's backward in micro-batches of 2: several backward passes before each engine step
    "zero2_lora_micro": dict(
        model="lora", ds=zero(2), args=dict(max_steps=6, gradient_accumulation_steps=2, coreset_micro_batch_size=2)
    ),
    "zero3_lora": dict(
        model="lora",
        ds=zero(3, stage3_param_persistence_threshold=LORA_PERSISTENCE),
        args=dict(max_steps=6, gradient_accumulation_steps=2),
    ),
    "zero3_full": dict(
        model="full",
        ds=zero(3, stage3_param_persistence_threshold=3000),
        args=dict(max_steps=6, sketch_modules=[V_PROJ]),
    ),
    # a DeepSpeed checkpoint every 2 of 4 steps, and a fresh model resumed from its checkpoint-2
    "zero2_4": dict(model="lora", ds=zero(2), args=SAVE),
    "zero2_resumed": dict(model="lora", ds=zero(2), args=SAVE, resume="zero2_4/out/checkpoint-2", lora_seed=7),
    "zero3_4": dict(model="lora", ds=zero(3, stage3_param_persistence_threshold=LORA_PERSISTENCE), args=SAVE),
    "zero3_resumed": dict(
        model="lora",
        ds=zero(3, stage3_param_persistence_threshold=LORA_PERSISTENCE),
        args=SAVE,
        resume="zero3_4/out/checkpoint-2",
        lora_seed=7,
    ),
    # refused: the sketched layer partitioned by ZeRO-3 (at the first step), an 'optimizer' section
    "zero3_partitioned_sketch": dict(
        model="lora", ds=zero(3, stage3_param_persistence_threshold=0), args=dict(max_steps=1), refused=True
    ),
    "optimizer_section": dict(
        model="lora",
        ds={**zero(2), "optimizer": {"type": "AdamW", "params": {"lr": "auto"}}},
        args=dict(max_steps=1),
        refused=True,
    ),
}


# A plain loop through deepspeed.initialize: CoresetOptimizer (around torch's AdamW) as DeepSpeed's
# client optimizer, tests/distributed_helpers.py's TinyNet and shards; the coreset's backward in
# micro-batches of 2, so ranks hold unequal shares and make several backward passes per step.
INITIALIZE = dict(coreset_size=5, sketch_dim=10, selection="gradient_matching", micro_batch_size=2)
INITIALIZE_STEPS = 3


def initialize_loop(stage: int) -> dict:
    """``deepspeed.initialize`` and ``select()`` by hand, as docs/distributed.md shows."""
    import deepspeed
    import distributed_helpers as h
    import torch.nn.functional as F

    from coreset_optim import CoresetOptimizer

    h.SCENARIOS.setdefault("fsdp", h.FSDP_SCENARIO)  # the 2 x 6 shards of the FSDP test
    model = h.make_model()
    opt = CoresetOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), model, **INITIALIZE)
    config = {"train_micro_batch_size_per_gpu": 6, "zero_optimization": {"stage": stage}, "gradient_clipping": 0.0}
    config["zero_allow_untested_optimizer"] = True
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)

    def loss_fn(batch):  # the sketch pass (eval mode) on the module, the coreset's backward through the engine
        net = engine if engine.module.training else engine.module
        return F.cross_entropy(net(batch[0]), batch[1], reduction="none")

    indices = []
    for step in range(INITIALIZE_STEPS):
        batch, sources = h.shard("fsdp", step, torch.distributed.get_rank())
        indices.append(opt.select(batch, loss_fn, sources=sources, model=engine).indices.tolist())
        engine.step()
    return dict(params=full_parameters(engine.module, 2), indices=indices)


def initialize_reference() -> dict:
    """The same loop in one process on the global batches, without DeepSpeed."""
    import distributed_helpers as h

    from coreset_optim import CoresetOptimizer

    h.SCENARIOS.setdefault("fsdp", h.FSDP_SCENARIO)
    model = h.make_model()
    opt = CoresetOptimizer(torch.optim.AdamW(model.parameters(), lr=0.05), model, **INITIALIZE)
    indices = []
    for step in range(INITIALIZE_STEPS):
        x, y, sources = h.global_batch("fsdp", step)
        opt.zero_grad()
        indices.append(opt.select((x, y), h.per_example_loss(model), sources=sources).indices.tolist())
        opt.step()
    return dict(params={n: p.detach().clone() for n, p in model.named_parameters()}, indices=indices)


def build_model(spec: dict):
    model = tiny_llama()
    if spec["model"] == "lora":
        model = lora(model, seed=spec.get("lora_seed", 0))
    return model


def trainer_args(out: Path, name: str, world: int):
    """DeepSpeed over ``world`` ranks, or (world 1) one process without DeepSpeed."""
    spec = SCENARIOS[name]
    kwargs = dict(COMMON, per_device_train_batch_size=GLOBAL_BATCH // world, **spec["args"])
    if world > 1:
        kwargs.update(deepspeed=spec["ds"], use_cpu=False)
    return make_args(out / name, **kwargs)


def deepspeed_on_cpu() -> None:
    """Make Accelerate count the ranks DeepSpeed initialized (see the module docstring)."""
    import accelerate.state as state
    import torch.distributed as dist
    from accelerate.utils import DistributedType

    if getattr(state.PartialState.__init__, "deepspeed_on_cpu", False):
        return
    original = state.PartialState.__init__

    def init(self, cpu=False, **kwargs):
        original(self, cpu, **kwargs)
        if (
            self.distributed_type == DistributedType.DEEPSPEED
            and self.num_processes == 1
            and dist.is_initialized()
            and dist.get_world_size() > 1
        ):
            self.num_processes = dist.get_world_size()
            self.process_index = dist.get_rank()
            self.local_process_index = int(os.environ.get("LOCAL_RANK", dist.get_rank()))

    init.deepspeed_on_cpu = True
    state.PartialState.__init__ = init


def full_parameters(model, world: int) -> dict:
    """Every trained parameter, whole and in fp32 (ZeRO's master copy when sharded: a collective)."""
    params = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            if world > 1:
                from deepspeed.utils import safe_get_full_fp32_param

                params[name] = safe_get_full_fp32_param(p).detach().float().clone()
            else:
                params[name] = p.detach().float().clone()
    return params


def train(out: Path, name: str, world: int) -> dict:
    """One scenario's run (DeepSpeed over the process group when world > 1); what the test compares."""
    from coreset_optim.integrations.transformers import CoresetTrainer

    spec = SCENARIOS[name]
    recorder = selection_recorder()
    try:
        trainer = CoresetTrainer(
            model=build_model(spec),
            args=trainer_args(out, name, world),
            train_dataset=make_dataset(n=64),
            callbacks=[recorder],
        )
        resume = spec.get("resume")
        trainer.train(resume_from_checkpoint=None if resume is None else str(out / resume))
    except ValueError as exc:
        if spec.get("refused"):
            return dict(refused=str(exc), steps=list(recorder.steps))
        raise
    if spec.get("refused"):
        return dict(refused=None)
    opt = trainer.coreset_optimizer
    return dict(
        params=full_parameters(trainer.model, world),
        indices=[c.indices.tolist() for c in recorder.coresets],
        weights=[c.weights.clone() for c in recorder.coresets],
        steps=list(recorder.steps),
        losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
        counters=(opt.num_selections, opt.num_steps),
        generator=opt.generator.get_state(),
        deepspeed=bool(trainer.is_deepspeed_enabled),
        stage=trainer.model_wrapped.zero_optimization_stage() if world > 1 else 0,
        partitioned=sorted(n for n, p in trainer.model.named_parameters() if getattr(p, "ds_persist", True) is False),
    )


def one_process(out: Path, name: str) -> dict:
    """The reference: the same scenario in this process, without DeepSpeed, on the global batch of 16."""
    return train(out, name, world=1)


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    deepspeed_on_cpu()
    for name in sys.argv[2:]:
        if name.startswith("initialize_zero"):
            result = initialize_loop(int(name[-1]))
        else:
            result = train(out, name, world=int(os.environ["WORLD_SIZE"]))
        if torch.distributed.get_rank() == 0:
            torch.save(result, out / f"{name}.pt")
            print(json.dumps({"scenario": name, "losses": result.get("losses")}), flush=True)
        torch.distributed.barrier()
    sys.stdout.flush()
    os._exit(0)  # as tests/distributed_trainer_fsdp.py: gloo may abort in the interpreter's shutdown


if __name__ == "__main__":
    main()
