"""The pretrained base for the fine-tuning benchmark: a small Llama taught the pretraining tasks.

No model hub is reachable, so the base is made here: :func:`pretrain` (deterministic in its seed,
a few minutes on one CPU core) and saved with ``save_pretrained`` (safetensors). The result is
committed in ``base_model/`` next to this file, so the benchmark, the demo and CI only ever call
:func:`load_base` (``from_pretrained``), as a user loads their model. Rebuild it with
``python -m coreset_optim.datasets.base_model``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch

from ..integrations.causal_lm import causal_lm_per_example_loss
from .tasks import SEQ_LEN, VOCAB_SIZE, pretraining_batch

BASE_DIR = Path(__file__).resolve().parent / "base_model"
PRETRAIN = {"seed": 0, "steps": 2500, "batch": 128, "lr": 3e-3, "warmup": 100}


def base_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=SEQ_LEN + 8,
        tie_word_embeddings=False,
        use_cache=False,
    )


def pretrain(
    seed: int = PRETRAIN["seed"],
    steps: int = PRETRAIN["steps"],
    batch: int = PRETRAIN["batch"],
    lr: float = PRETRAIN["lr"],
    warmup: int = PRETRAIN["warmup"],
    log_every: int = 250,
):
    """A freshly initialised base trained on :func:`~.tasks.pretraining_batch` with AdamW, linear
    warm-up then cosine decay. Deterministic in ``seed`` (on one thread)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(base_config())
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    g = torch.Generator().manual_seed(seed + 1)
    start = time.perf_counter()
    for step in range(1, steps + 1):
        data = pretraining_batch(batch, g)
        loss = causal_lm_per_example_loss(model(input_ids=data["input_ids"]), data["labels"]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if log_every and step % log_every == 0:
            print(
                f"pretrain step {step}/{steps}: loss {loss.item():.3f} [{time.perf_counter() - start:.0f}s]",
                file=sys.stderr,
                flush=True,
            )
    model.eval()
    return model


def save_base(model, path: Path = BASE_DIR) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    return path


def load_base(path: Path = BASE_DIR):
    """The committed base, loaded with ``from_pretrained`` (float32, eval mode)."""
    from transformers import LlamaForCausalLM

    if not (Path(path) / "config.json").exists():
        raise FileNotFoundError(
            f"no pretrained base in {path}; build it with python -m coreset_optim.datasets.base_model"
        )
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    model.eval()
    return model


if __name__ == "__main__":
    torch.set_num_threads(1)
    save_base(pretrain())
    print(f"saved to {BASE_DIR}")
