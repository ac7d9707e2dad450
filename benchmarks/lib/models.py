"""Models made from a config (random init, no hub, no files): Llama and GPT-2 causal LMs, LoRA
adapters on them, and the per-example next-token loss the step benchmarks train with.

Every builder seeds torch first, so the same arguments give the same weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The tiny LoRA Llamas of the microbenchmarks and e2e.py: name -> (hidden, layers, heads, kv_heads, intermediate)
SIZES = {
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


def llama(
    vocab: int,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    positions: int | None = None,
    seed: int = 0,
    **config,
):
    """A random-init ``LlamaForCausalLM`` (``positions``: ``max_position_embeddings``, None for
    the config's default; ``config``: further ``LlamaConfig`` fields)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if positions is not None:
        config["max_position_embeddings"] = positions
    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            **config,
        )
    )


def gpt2(vocab: int, hidden: int, layers: int, heads: int, positions: int, seed: int = 0):
    """A random-init ``GPT2LMHeadModel``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=positions)
    )


def with_lora(model, r: int, modules: list[str], **options):
    """``model`` with LoRA adapters of rank ``r`` (alpha 2r) on ``modules`` (peft)."""
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=modules, **options))


def next_token_loss(model):
    """``loss_fn(batch)``: the mean next-token cross-entropy of each sequence of ``batch["input_ids"]``."""

    def loss_fn(batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits[:, :-1]
        tokens = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return tokens.view(ids.shape[0], -1).mean(1)

    return loss_fn


def tiny_lora_llama(size: str = "h256-l4", vocab: int = 256, seq_len: int = 64, lora_r: int = 8, seed: int = 0):
    """``(peft_model, loss_fn)``: LoRA r on q_proj/v_proj of a random tiny Llama of :data:`SIZES`."""
    hidden, layers, heads, kv, inter = SIZES[size]
    base = llama(vocab, hidden, layers, heads, kv, inter, positions=seq_len, seed=seed)
    model = with_lora(base, lora_r, ["q_proj", "v_proj"])
    return model, next_token_loss(model)


# The full fine-tuning models of sketch_memory.py, sketch_layers.py and target_memory.py:
# name -> (family, vocab, hidden, layers, heads, intermediate)
FULL_MODELS = {
    "gpt2-768": ("gpt2", 50257, 768, 2, 4, 3072),
    "llama-32k-512": ("llama", 32000, 512, 2, 8, 1376),
    "llama-32k-256": ("llama", 32000, 256, 2, 4, 688),
}


def full_model(name: str, seq_len: int, vocab: int | None = None, hidden: int | None = None):
    """``(model, loss_fn)``: one of :data:`FULL_MODELS` (seed 0), with another vocabulary or
    hidden size when given (a Llama's MLP then 2 x hidden), and :func:`next_token_loss`."""
    family, v, h, layers, heads, inter = FULL_MODELS[name]
    vocab, hidden = vocab or v, hidden or h
    if family == "gpt2":
        model = gpt2(vocab, hidden, layers, heads, positions=seq_len)
    else:
        inter = inter if hidden == h else 2 * hidden
        model = llama(vocab, hidden, layers, heads, max(1, heads // 2), inter, positions=seq_len)
    return model, next_token_loss(model)
