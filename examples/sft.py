"""TRL's SFTTrainer on coresets: change the trainer class and its config, keep the rest.

A tiny random-init Llama learns to answer "wA wB" with two words that follow wA, from
prompt-completion data of two sources. SFT tokenizes, masks the prompts (completion-only loss)
and pads; each micro-batch of 32 trains on a weighted coreset of 8. Full fine-tuning here (the
sketched layer is then the last trained Linear, ``lm_head``); ``--lora`` passes SFT a
``peft_config`` instead (sketched: the last ``v_proj``'s LoRA-B), which on this random-init
model learns little in 40 steps, with or without coresets. Offline: the word-level tokenizer is
built in code (CPU).

    pip install "coreset_optim[peft,trl]"
    python examples/sft.py [--lora]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from coreset_optim.integrations.causal_lm import causal_lm_per_example_loss
from coreset_optim.integrations.trl import CoresetSFTConfig, CoresetSFTTrainer

WORDS = 32


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": 3 + i for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def dataset(n: int, seed: int) -> Dataset:
    """Prompts "wA wB": "count" (3 in 4) answers wA+1 wA+2, "skip" (1 in 4) answers wA+3 wA+6."""
    g = torch.Generator().manual_seed(seed)
    rows = {"prompt": [], "completion": [], "source": []}
    for _ in range(n):
        a, b = torch.randint(0, WORDS, (2,), generator=g).tolist()
        skip = bool(torch.rand(1, generator=g) < 0.25)
        step = 3 if skip else 1
        rows["prompt"].append(f"w{a} w{b}")
        rows["completion"].append(f" w{(a + step) % WORDS} w{(a + 2 * step) % WORDS}")
        rows["source"].append("skip" if skip else "count")
    return Dataset.from_dict(rows)


def completion_loss(model, tok, data: Dataset) -> float:
    """Mean NLL of the completion tokens (and <eos>) of ``data``, one example at a time."""
    total = 0.0
    with torch.no_grad():
        for row in data:
            prompt = tok(row["prompt"])["input_ids"]
            ids = torch.tensor(tok(row["prompt"] + row["completion"] + tok.eos_token)["input_ids"])
            labels = ids.clone()
            labels[: len(prompt)] = -100
            total += causal_lm_per_example_loss(model(input_ids=ids[None]), labels[None]).item()
    return total / len(data)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lora", action="store_true", help="LoRA through SFT's peft_config")
    cli = parser.parse_args()
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=WORDS + 3,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )
    tok = tokenizer()
    held_out = dataset(64, seed=1)
    with tempfile.TemporaryDirectory() as out:
        args = CoresetSFTConfig(
            output_dir=out,
            per_device_train_batch_size=32,  # the large batch
            coreset_size=8,  # trained on per micro-batch (or coreset_ratio=0.25)
            source_column="source",  # selection per source
            learning_rate=5e-2 if cli.lora else 1e-2,
            lr_scheduler_type="constant",
            max_steps=40,
            logging_steps=10,
            save_strategy="no",
            report_to="none",
            use_cpu=True,
            bf16=False,
            disable_tqdm=True,
        )
        trainer = CoresetSFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset(2048, seed=0),
            processing_class=tok,
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
            if cli.lora
            else None,
        )
        model = trainer.model
        before = completion_loss(model, tok, held_out)
        trainer.train()
        after = completion_loss(model, tok, held_out)

    print("\nstep  loss   selected per source / in batch (10 micro-batches)   ms per selection")
    for log in trainer.state.log_history:
        if "loss" in log:
            per_source = ", ".join(
                f"{s} {log[f'coreset/selected/{s}']}/{log[f'coreset/in_batch/{s}']}" for s in ("count", "skip")
            )
            print(f"{log['step']:4d}  {log['loss']:.3f}  {per_source:45s}  {1000 * log['coreset/time_total']:.0f}")
    print(f"sketched: {[t.name for t in trainer.coreset_optimizer.sketch_layers]}")
    print(f"held-out completion loss: {before:.3f} -> {after:.3f}")


if __name__ == "__main__":
    main()
