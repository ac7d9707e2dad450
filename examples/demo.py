"""The demo: what select() does, then what a coreset buys on a data mixture.

Part 1: a tiny causal LM trained for a few steps on coresets of a 3-source token mixture. Each
step: a large batch of 32 sequences, select() picks 8 of them (weighted), backpropagates only
those, then step(). Prints what was selected, the weights, and the per-source counts.

Part 2: examples/compare.py, short: random k vs coreset k of B (default and preset="colm") vs
batch B, with a progress bar, a table and a PNG (demo_output/compare.png).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from coreset_optim import CoresetOptimizer

torch.manual_seed(0)
VOCAB, LENGTH, B, K, STEPS = 64, 16, 32, 8, 4


def make_batch(generator: torch.Generator) -> dict:
    """Three sources: counting up (60%), repeating a token (30%), alternating pairs (10%)."""
    names = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), B, replacement=True, generator=generator)
    rows = []
    for s in names.tolist():
        start = int(torch.randint(0, VOCAB, (1,), generator=generator))
        t = torch.arange(LENGTH)
        if s == 0:
            rows.append((start + t) % VOCAB)
        elif s == 1:
            rows.append(torch.full((LENGTH,), start))
        else:
            rows.append(torch.where(t % 2 == 0, start, (start * 7 + 3) % VOCAB))
    return {"input_ids": torch.stack(rows), "source": [("count", "repeat", "alternate")[s] for s in names.tolist()]}


model = LlamaForCausalLM(
    LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LENGTH)
)


def per_example_loss(batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy of each sequence."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits[:, :-1]
    tokens = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
    return tokens.view(ids.shape[0], -1).mean(1)


opt = CoresetOptimizer(
    torch.optim.AdamW(model.parameters(), lr=3e-3),
    model,
    coreset_size=K,
    source_key="source",
)
print(opt, "\n")
generator = torch.Generator().manual_seed(1)
for step in range(STEPS):
    batch = make_batch(generator)
    t0 = time.perf_counter()
    coreset = opt.select(batch, per_example_loss)
    opt.step()
    opt.zero_grad()
    seconds = time.perf_counter() - t0
    counts = ", ".join(f"{name} {c.selected}/{c.in_batch}{' (kept)' if c.kept_whole else ''}"
                       for name, c in coreset.source_counts.items())
    print(f"step {step}: batch loss {coreset.losses.mean():.3f}  coreset estimate {coreset.loss:.3f}  "
          f"({seconds * 1000:.0f} ms)")
    print(f"  selected {coreset.indices.tolist()}")
    print(f"  weights  {[round(w, 2) for w in coreset.weights.tolist()]} (sum {coreset.weights.sum():.0f} = N)")
    print(f"  per source (selected/in batch): {counts}")

print("\nPart 2: what a coreset buys on a 7-source mixture (examples/compare.py)\n")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import compare  # noqa: E402

out_dir = Path(__file__).resolve().parents[1] / "demo_output"
out_dir.mkdir(exist_ok=True)
compare(steps=int(os.environ.get("DEMO_COMPARE_STEPS", 120)), out=out_dir / "compare.png")
