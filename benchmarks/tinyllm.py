"""A tiny random-init Llama with LoRA on q/v, token data made in code, and a per-example loss.

Shared by the microbenchmarks and the end-to-end benchmark (no model hub, no files).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIZES = {
    # name: (hidden, layers, heads, kv_heads, intermediate)
    "h32-l1": (32, 1, 2, 1, 64),
    "h64-l1": (64, 1, 4, 2, 128),
    "h64-l2": (64, 2, 4, 2, 128),
    "h128-l2": (128, 2, 4, 2, 256),
    "h128-l4": (128, 4, 4, 2, 384),
    "h128-l8": (128, 8, 4, 2, 384),
    "h192-l4": (192, 4, 6, 2, 512),
    "h256-l4": (256, 4, 8, 4, 688),
    "h384-l6": (384, 6, 8, 4, 1024),
}


def build(size: str = "h256-l4", vocab: int = 256, seq_len: int = 64, lora_r: int = 8, seed: int = 0):
    """``(peft_model, loss_fn)``: LoRA r on q_proj/v_proj of a random tiny Llama."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter = SIZES[size]
    torch.manual_seed(seed)
    base = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=inter,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv,
            max_position_embeddings=seq_len,
        )
    )
    model = get_peft_model(base, LoraConfig(r=lora_r, lora_alpha=2 * lora_r, target_modules=["q_proj", "v_proj"]))

    def loss_fn(batch: dict) -> torch.Tensor:
        """Mean next-token cross-entropy of each sequence."""
        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits[:, :-1]
        tokens = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return tokens.view(ids.shape[0], -1).mean(1)

    return model, loss_fn


def make_batch(size: int, seq_len: int = 64, vocab: int = 256, seed: int = 0) -> dict:
    """Three kinds of sequences (counting, repeating, alternating) with a ``source`` list."""
    g = torch.Generator().manual_seed(seed)
    kinds = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), size, replacement=True, generator=g)
    start = torch.randint(0, vocab, (size, 1), generator=g)
    t = torch.arange(seq_len)
    count = (start + t) % vocab
    repeat = start.expand(size, seq_len)
    alternate = torch.where(t % 2 == 0, start, (start * 7 + 3) % vocab)
    noise = torch.randint(0, vocab, (size, seq_len), generator=g)
    ids = torch.where(kinds[:, None] == 0, count, torch.where(kinds[:, None] == 1, repeat, alternate))
    ids = torch.where(torch.rand(size, seq_len, generator=g) < 0.1, noise, ids)
    return {"input_ids": ids, "source": [("count", "repeat", "alternate")[k] for k in kinds.tolist()]}
