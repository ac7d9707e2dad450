"""LoRA + bitsandbytes 8-bit AdamW + CoresetOptimizer, in a plain training loop (CPU).

A tiny random-init Llama learns short arithmetic sequences from a two-source mixture. Each step
draws a large batch of 64 and trains on a weighted coreset of 16 chosen by the default selection
(``consensus_loss``: per source, the highest-loss examples among those whose Adam-normalized
gradient of the last block's v_proj LoRA-B, the default sketch target for a LoRA model, agrees
with the rest of their source). Every 5 steps it prints the selection (how many examples per
source), the coreset and held-out losses; at the end, its run time.

    pip install "coreset_optim[bnb,peft,hf]"
    python examples/lora_8bit.py
"""

from __future__ import annotations

import time

import bitsandbytes as bnb
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from coreset_optim import CoresetOptimizer
from coreset_optim.integrations.causal_lm import causal_lm_loss_fn, causal_lm_per_example_loss

VOCAB, LENGTH = 256, 24


def make_batch(n: int, generator: torch.Generator) -> tuple[dict, list[str]]:
    """Sequences ``a, a+s, a+2s, ...`` (mod 32): "easy" steps 1-2 (3/4 of the data), "hard" steps 3-7."""
    hard = torch.rand(n, generator=generator) < 0.25
    step = torch.where(
        hard, torch.randint(3, 8, (n,), generator=generator), torch.randint(1, 3, (n,), generator=generator)
    )
    start = torch.randint(0, 32, (n,), generator=generator)
    ids = (start[:, None] + step[:, None] * torch.arange(LENGTH)) % 32
    labels = ids.clone()
    labels[:, :2] = -100  # no loss on the first two tokens (the "prompt")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return batch, ["hard" if h else "easy" for h in hard.tolist()]


def main() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    model.train()

    inner = bnb.optim.AdamW8bit(
        [p for p in model.parameters() if p.requires_grad],
        lr=3e-2,
        min_8bit_size=0,  # tiny LoRA matrices: use the 8-bit state anyway (default 4096 values)
    )
    optimizer = CoresetOptimizer(inner, model, coreset_size=16)
    print("sketching", [t.name for t in optimizer.sketch_layers])
    loss_fn = causal_lm_loss_fn(model)  # one loss per example: mean over its label tokens

    gen = torch.Generator().manual_seed(0)
    held_out, _ = make_batch(256, torch.Generator().manual_seed(1))
    start = time.perf_counter()
    for step in range(1, 31):
        batch, sources = make_batch(64, gen)
        optimizer.zero_grad()
        coreset = optimizer.select(batch, loss_fn, sources=sources)
        optimizer.step()
        if step % 5 == 0:
            with torch.no_grad():
                out = model(input_ids=held_out["input_ids"], attention_mask=held_out["attention_mask"])
                held = causal_lm_per_example_loss(out, held_out["labels"]).mean().item()
            picked = {s: (c.selected, c.in_batch) for s, c in coreset.source_counts.items()}
            print(
                f"step {step:3d}  coreset loss {coreset.loss.item():.3f}  held-out loss {held:.3f}  "
                f"selected/in batch {picked}  select {1000 * coreset.timings['total']:.0f} ms"
            )
    state = inner.state[optimizer.sketch_layers[0].module.weight]
    print(f"done in {time.perf_counter() - start:.1f} s; the sketched layer's Adam state is {state['state2'].dtype}")


if __name__ == "__main__":
    main()
