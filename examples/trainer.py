"""The Hugging Face Trainer on coresets: change the Trainer class and its arguments, keep the rest.

A tiny random-init GPT-2 with LoRA learns short arithmetic sequences from a three-source mixture
(CPU). The micro-batch of 32 is the large batch; each micro-batch trains on a weighted
coreset of 8. The selection statistics join the Trainer's logs every ``logging_steps``; the run
saves a checkpoint and resumes from it (the selector's state travels in optimizer.pt).

    pip install "coreset_optim[bnb,peft,hf]"
    python examples/trainer.py [--optim paged_adamw_8bit]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from peft import LoraConfig, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel

from coreset_optim.integrations.transformers import CoresetTrainer, CoresetTrainingArguments

LENGTH = 24


class Mixture(torch.utils.data.Dataset):
    """Rows ``{"input_ids", "attention_mask", "labels", "source"}``: sequences ``a, a+s, ...`` mod 32."""

    def __init__(self, n: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        kind = torch.randint(0, 10, (n,), generator=g)  # about 7/10 "chat", 2/10 "code", 1/10 "math"
        step = torch.where(kind < 7, 1, torch.where(kind < 9, 2, 5))
        start = torch.randint(0, 32, (n,), generator=g)
        self.ids = (start[:, None] + step[:, None] * torch.arange(LENGTH)) % 32
        self.sources = ["chat" if k < 7 else "code" if k < 9 else "math" for k in kind.tolist()]

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i].tolist()
        return {"input_ids": ids, "attention_mask": [1] * LENGTH, "labels": ids, "source": self.sources[i]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--optim", default="adamw_torch", help="any TrainingArguments optim, e.g. paged_adamw_8bit")
    cli = parser.parse_args()

    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0)
    )
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["c_attn"], lora_dropout=0.0))

    with tempfile.TemporaryDirectory() as out:

        def arguments(max_steps: int) -> CoresetTrainingArguments:
            return CoresetTrainingArguments(
                output_dir=out,
                per_device_train_batch_size=32,  # the large batch
                coreset_size=8,  # trained on per micro-batch (or coreset_ratio=0.25)
                source_column="source",  # selection per source; small sources kept whole
                gradient_accumulation_steps=2,
                optim=cli.optim,
                learning_rate=3e-2,
                lr_scheduler_type="constant",
                max_steps=max_steps,
                logging_steps=3,
                save_steps=6,
                report_to="none",
                use_cpu=True,
                disable_tqdm=True,
            )

        data = Mixture(2048)
        trainer = CoresetTrainer(model=model, args=arguments(6), train_dataset=data)
        trainer.train()
        # Resume from the checkpoint and go on: the next selections are those of an uninterrupted run.
        trainer = CoresetTrainer(model=model, args=arguments(12), train_dataset=data)
        trainer.train(resume_from_checkpoint=f"{out}/checkpoint-6")

        print("\nstep  loss   selected per source / in batch (6 micro-batches)   ms per selection")
        for log in trainer.state.log_history:
            if "loss" not in log:
                continue
            per_source = ", ".join(
                f"{s} {log[f'coreset/selected/{s}']}/{log[f'coreset/in_batch/{s}']}" for s in ("chat", "code", "math")
            )
            print(f"{log['step']:4d}  {log['loss']:.3f}  {per_source:45s}  {1000 * log['coreset/time_total']:.0f}")


if __name__ == "__main__":
    main()
