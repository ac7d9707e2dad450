"""CoresetTrainer under torchrun: one coreset per micro-batch step from the batches of all ranks.

    torchrun --nproc_per_node 2 examples/trainer_ddp.py --output-dir /tmp/coreset_ddp

Each rank's per-device batch of 16 is its share of a global batch of 32; select() chooses 8 of
the 32 (the whole global batch, not per rank) and each rank backpropagates the chosen examples it
holds. Rank 0 prints the logged global per-source counts. CPU (gloo) or GPU (nccl) alike.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from coreset_optim.distributed import shutdown
from coreset_optim.integrations.transformers import CoresetTrainer, CoresetTrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trainer import LENGTH, Mixture  # noqa: E402  (examples/trainer.py: a 3-source mixture)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--steps", type=int, default=6)
    cli = parser.parse_args()
    torch.manual_seed(0)  # the same initial model on every rank
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=LENGTH,
        )
    )
    args = CoresetTrainingArguments(
        output_dir=cli.output_dir,
        per_device_train_batch_size=16,  # each rank's share of the large batch
        coreset_size=8,  # chosen from the global batch of 16 * world_size
        source_column="source",
        learning_rate=3e-3,
        max_steps=cli.steps,
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
        ddp_backend="gloo" if not torch.cuda.is_available() else None,
    )
    trainer = CoresetTrainer(model=model, args=args, train_dataset=Mixture(1024))
    trainer.train()
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    sums = [None] * torch.distributed.get_world_size() if torch.distributed.is_initialized() else [checksum]
    if torch.distributed.is_initialized():
        torch.distributed.all_gather_object(sums, checksum)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"parameters identical on all {len(sums)} ranks: {len(set(sums)) == 1}")
        for log in trainer.state.log_history:
            if "loss" in log:
                counts = ", ".join(
                    f"{s} {log.get(f'coreset/selected/{s}', 0)}/{log.get(f'coreset/in_batch/{s}', 0)}"
                    for s in ("chat", "code", "math")
                )
                print(f"step {log['step']} loss {log['loss']:.3f} selected/in global batch: {counts}")
    shutdown()  # barrier, pause, destroy_process_group: gloo can hang or abort at exit without it


if __name__ == "__main__":
    main()
