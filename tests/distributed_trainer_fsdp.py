"""CoresetTrainer under FSDP2 through the Trainer's own options, one rank of a 2-rank gloo CPU group.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_trainer_fsdp.py OUT NAME...

runs each named scenario of :data:`SCENARIOS` (``fsdp=True``, ``fsdp_config={"version": 2, ...}``)
and saves, from rank 0, ``OUT/NAME.pt``: the full parameters after training (``full_tensor()`` of
every sharded parameter), the first step's gradient, the global indices and weights of every
selection and the logged losses. ``tests/distributed/test_trainer_fsdp.py`` compares them with
the same scenario in one process without FSDP (:func:`one_process`).

**Accelerate does not take the FSDP path for CPU processes.** With ``use_cpu=True`` (or no GPU)
Accelerate 1.16 sets the distributed type to ``MULTI_CPU`` and drops the FSDP plugin without a
word: the stock Trainer then trains with DDP although ``fsdp=`` was given. :func:`fsdp_on_cpu`
puts the FSDP distributed type and the plugin back after Accelerate's state is built, so that
everything else is what a GPU job runs: Accelerate's ``fully_shard`` of the model (FSDP2, gloo
collectives on CPU tensors), its switch of the optimizer's parameters to the sharded ones, the
Trainer's FSDP checkpointing (``torch.distributed.checkpoint``). It is a test shim, not library code.
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
SHARDED = dict(state_dict_type="SHARDED_STATE_DICT")
FULL = dict(state_dict_type="FULL_STATE_DICT")

# name: the model and the TrainingArguments that differ from COMMON. The data order is the same
# in one process (batch 16) and on 2 ranks (8 each): sequential, rank 0's rows first.
SCENARIOS = {
    # full fine-tuning: every parameter sharded; the default sketch target lm_head is in the root group
    "full": dict(model="full", args=dict(max_steps=10)),
    # LoRA on q/v (the sketch target: the last v_proj's LoRA-B); 2 micro-batches per step
    "lora": dict(model="lora", args=dict(max_steps=10, gradient_accumulation_steps=2)),
    # bf16 compute and bf16 gradient reduction: what bf16=True gives through the Trainer
    "bf16": dict(model="full", args=dict(max_steps=6, bf16=True)),
    # bf16 compute, fp32 gradient reduction (a MixedPrecisionPolicy on Accelerate's plugin)
    "bf16_fp32_reduce": dict(model="full", args=dict(max_steps=6, bf16=True), reduce_fp32=True),
    # a sharded checkpoint (torch.distributed.checkpoint) every 2 of 4 steps ...
    "sharded_4": dict(model="lora", args=dict(max_steps=4, save_strategy="steps", save_steps=2), fsdp=SHARDED),
    # ... and a fresh model (other LoRA weights) resumed from its checkpoint-2
    "sharded_resumed": dict(
        model="lora",
        args=dict(max_steps=4, save_strategy="steps", save_steps=2),
        fsdp=SHARDED,
        resume="sharded_4/out/checkpoint-2",
        lora_seed=7,
    ),
    # the same with full fine-tuning and FULL_STATE_DICT checkpoints (gathered to rank 0)
    "full_state_4": dict(model="full", args=dict(max_steps=4, save_strategy="steps", save_steps=2), fsdp=FULL),
    "full_state_resumed": dict(
        model="full",
        args=dict(max_steps=4, save_strategy="steps", save_steps=2),
        fsdp=FULL,
        resume="full_state_4/out/checkpoint-2",
        model_seed=7,
    ),
    # CoresetSFTTrainer (TRL), LoRA, SFT's default gradient checkpointing
    "sft": dict(model="lora", trainer="sft", args=dict(max_steps=6)),
    # FSDP1 is refused at construction
    "fsdp1": dict(model="full", args=dict(max_steps=1), fsdp=dict(version=1, sync_module_states=False), refused=True),
}
ONE_PROCESS = [n for n, s in SCENARIOS.items() if not s.get("refused")]


def build_model(spec: dict):
    model = tiny_llama(seed=spec.get("model_seed", 0))
    if spec["model"] == "lora":
        model = lora(model, seed=spec.get("lora_seed", 0))
    return model


def trainer_args(out: Path, name: str, world: int):
    """The scenario's arguments: FSDP2 over ``world`` ranks, or (world 1) one process on the whole batch.

    The one-process reference of a bf16 scenario runs in fp32."""
    spec = SCENARIOS[name]
    kwargs = dict(COMMON, per_device_train_batch_size=GLOBAL_BATCH // world, **spec["args"])
    if world > 1:
        config = {"version": 2, "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"], **spec.get("fsdp", {})}
        kwargs.update(fsdp=True, fsdp_config=config, ddp_backend="gloo")
    else:
        kwargs.pop("bf16", None)
    if spec.get("trainer") == "sft":
        from _integrations_models import sft_args

        kwargs.pop("source_column")
        return sft_args(out / name, **kwargs)
    return make_args(out / name, **kwargs)


# Whether the next Accelerator's FSDP plugin gets bf16 parameters with fp32 gradient reduction.
REDUCE_FP32 = {"on": False}


def fsdp_on_cpu() -> None:
    """Make Accelerate keep the FSDP plugin for CPU processes (see the module docstring)."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    if getattr(state.AcceleratorState.__init__, "fsdp_on_cpu", False):
        return
    original = state.AcceleratorState.__init__

    def init(self, mixed_precision=None, cpu=False, dynamo_plugin=None, deepspeed_plugin=None, fsdp_plugin=None, **kw):
        original(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin, **kw)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            if REDUCE_FP32["on"] and self._mixed_precision == "bf16":
                from torch.distributed.fsdp import MixedPrecisionPolicy

                fsdp_plugin.mixed_precision_policy = MixedPrecisionPolicy(
                    param_dtype=torch.bfloat16, reduce_dtype=torch.float32
                )
            elif self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.distributed_type = DistributedType.FSDP
            state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    init.fsdp_on_cpu = True
    state.AcceleratorState.__init__ = init


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def first_step_grads():
    """A TrainerCallback keeping the first optimizer step's whole gradient (gathered when sharded)."""
    from transformers import TrainerCallback

    class FirstGrads(TrainerCallback):
        grads: dict = {}

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0:
                self.grads = {
                    n: _full(p.grad).float().clone() for n, p in model.named_parameters() if p.grad is not None
                }

    return FirstGrads()


def mixed_precision_dtypes(model) -> set:
    """(original, compute, reduce) dtypes of every FSDP2 parameter group that trains something, as
    FSDP2 recorded them (its internals; None: no cast, the reduction runs in the compute dtype)."""
    from torch.distributed.fsdp import FSDPModule

    found = set()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                trained = [p for p in group.fsdp_params if p.sharded_param.requires_grad]
                for p in trained:
                    found.add((str(group._orig_dtype), str(p.param_dtype), str(group._reduce_dtype)))
    return found


def build_trainer(out: Path, name: str, world: int, callbacks: list):
    spec = SCENARIOS[name]
    args = trainer_args(out, name, world)
    if spec.get("trainer") == "sft":
        from _integrations_models import sft_dataset, tiny_tokenizer

        from coreset_optim.integrations.trl import CoresetSFTTrainer

        data = sft_dataset(n=64)
        return CoresetSFTTrainer(
            model=build_model(spec),
            args=args,
            train_dataset=data,
            processing_class=tiny_tokenizer(),
            callbacks=callbacks,
        )
    from coreset_optim.integrations.transformers import CoresetTrainer

    return CoresetTrainer(model=build_model(spec), args=args, train_dataset=make_dataset(n=64), callbacks=callbacks)


def train(out: Path, name: str, world: int) -> dict:
    """One scenario's run (sharded over the process group when world > 1); what the test compares."""
    spec = SCENARIOS[name]
    recorder, grads = selection_recorder(), first_step_grads()
    if spec.get("refused"):
        try:
            build_trainer(out, name, world, [recorder, grads])
        except ValueError as exc:
            return dict(refused=str(exc))
        return dict(refused=None)
    trainer = build_trainer(out, name, world, [recorder, grads])
    resume = spec.get("resume")
    trainer.train(resume_from_checkpoint=None if resume is None else str(out / resume))
    params = {n: _full(p.detach()).float().clone() for n, p in trainer.model.named_parameters()}
    opt = trainer.coreset_optimizer
    return dict(
        params=params,
        grads=grads.grads,
        trained=[n for n, p in trainer.model.named_parameters() if p.requires_grad],
        indices=[c.indices.tolist() for c in recorder.coresets],
        weights=[c.weights.clone() for c in recorder.coresets],
        steps=list(recorder.steps),
        losses=[h["loss"] for h in trainer.state.log_history if "loss" in h],
        sft_metrics=[
            [h[k] for k in ("num_tokens", "entropy", "mean_token_accuracy")]
            for h in trainer.state.log_history
            if "loss" in h and "entropy" in h
        ],
        counters=(opt.num_selections, opt.num_steps),
        generator=opt.generator.get_state(),
        fsdp=bool(trainer.is_fsdp_enabled),
        param_types=sorted({type(p).__name__ for p in trainer.model.parameters()}),
        dtypes=mixed_precision_dtypes(trainer.model) if world > 1 else set(),
    )


def one_process(out: Path, name: str) -> dict:
    """The reference: the same scenario in this process, without FSDP, on the global batch of 16."""
    return train(out, name, world=1)


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    fsdp_on_cpu()
    for name in sys.argv[2:]:
        REDUCE_FP32["on"] = SCENARIOS[name].get("reduce_fp32", False)
        result = train(out, name, world=int(os.environ["WORLD_SIZE"]))
        if torch.distributed.get_rank() == 0:
            torch.save(result, out / f"{name}.pt")
            print(json.dumps({"scenario": name, "losses": result.get("losses")}), flush=True)
        torch.distributed.barrier()
    sys.stdout.flush()
    # FSDP2 on gloo sometimes aborts in the interpreter's shutdown ("terminate called without an
    # active exception") after everything is done (tests/distributed_helpers.py does the same).
    os._exit(0)


if __name__ == "__main__":
    main()
