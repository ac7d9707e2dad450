"""Tiny random-init language models and data for the integration tests (no hub, no files)."""

from __future__ import annotations

import pytest
import torch

VOCAB = 256


def tiny_llama(seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    return LlamaForCausalLM(config)


def tiny_gpt2(seed: int = 0, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=64,
        n_layer=layers,
        n_head=4,
        vocab_size=VOCAB,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def lora(model, targets=("q_proj", "v_proj"), seed: int = 0, r: int = 4, **kwargs):
    """LoRA with a non-zero B (a random init would leave LoRA-A's gradient exactly zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0, **kwargs)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.02)
    return peft_model


def pattern_batch(n: int, length: int = 16, seed: int = 0, pad_last: int = 0) -> dict:
    """Easily learned sequences: ``start, start + step, ...`` mod 16 (steps 1..2), in a vocab of 256."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, 16, (n, 1), generator=g)
    step = torch.randint(1, 3, (n, 1), generator=g)
    ids = (start + step * torch.arange(length)) % 16
    labels = ids.clone()
    mask = torch.ones_like(ids)
    if pad_last:
        labels[:, -pad_last:] = -100
        mask[:, -pad_last:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.fixture(autouse=False)
def one_thread():
    """One intra-op thread: on a shared 2-core machine, oversubscribed threads made these tiny
    models 5-20x slower (measured: a 10-step Trainer run 0.7 s with 1 thread, 4-17 s with 2)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def make_dataset(n=64, length=16, seed=0, sources=("web", "code", "math")):
    """Rows of :func:`pattern_batch` as lists, with an uneven "source" column unless sources=None."""
    batch = pattern_batch(n, length, seed=seed, pad_last=2)
    rows = []
    for i in range(n):
        row = {k: v[i].tolist() for k, v in batch.items()}
        if sources:
            # an uneven mixture: "math" is rare
            row["source"] = sources[0] if i % 8 < 5 else sources[1] if i % 8 < 7 else sources[2]
        rows.append(row)
    return ListDataset(rows)


def short_cpu_run(tmp_path, **kwargs) -> dict:
    """The arguments every Trainer test shares: a short constant-LR run on the CPU, no saving or
    reporting; ``kwargs`` override."""
    return {
        "output_dir": str(tmp_path / "out"),
        "learning_rate": 1e-2,
        "lr_scheduler_type": "constant",
        "logging_steps": 2,
        "save_strategy": "no",
        "report_to": "none",
        "use_cpu": True,
        "seed": 0,
        "disable_tqdm": True,
        **kwargs,
    }


def make_args(tmp_path, **kwargs):
    """CoresetTrainingArguments for fast CPU tests; ``kwargs`` override."""
    defaults = short_cpu_run(
        tmp_path, **{"per_device_train_batch_size": 16, "coreset_size": 4, "max_steps": 6, **kwargs}
    )
    from coreset_optim.integrations.transformers import CoresetTrainingArguments

    return CoresetTrainingArguments(**defaults)


def selection_recorder():
    """A CoresetCallback whose ``seen`` holds every micro-batch a selection was made from (the
    ``inputs`` of ``on_selection``, copied), ``coresets`` every Coreset and ``steps`` the
    ``state.global_step`` at each selection, for the reference checks."""
    from coreset_optim.integrations.transformers import CoresetCallback

    class SelectionRecorder(CoresetCallback):
        def __init__(self):
            self.seen, self.coresets, self.steps = [], [], []

        def on_selection(self, args, state, control, coreset=None, inputs=None, **kwargs):
            self.seen.append({k: v.clone() if torch.is_tensor(v) else list(v) for k, v in inputs.items()})
            self.coresets.append(coreset)
            self.steps.append(state.global_step)

    return SelectionRecorder()


def grad_capture():
    """A TrainerCallback whose ``grads`` holds every trained parameter's ``.grad`` before each step."""
    from transformers import TrainerCallback

    class GradCapture(TrainerCallback):
        def __init__(self):
            self.grads = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})

    return GradCapture()


# --- TRL's SFT: a word-level tokenizer, prompt-completion data, short-run arguments ---------------
WORDS = 40


def tiny_tokenizer():
    """A word-level tokenizer over ``w0 .. w39`` with <pad>, <eos>, <unk> (no files, no hub)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": 3 + i for i in range(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def sft_dataset(n: int = 32, seed: int = 0, sources=("qa", "math")):
    """Prompt-completion text: prompts of 2-5 words, completions of 1-4 words (a learnable rule)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    rows = {"prompt": [], "completion": [], "source": []}
    for i in range(n):
        words = torch.randint(0, WORDS, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g).tolist()
        answer = [(words[0] + k) % WORDS for k in range(1, int(torch.randint(1, 5, (1,), generator=g)) + 1)]
        rows["prompt"].append(" ".join(f"w{w}" for w in words))
        rows["completion"].append(" " + " ".join(f"w{w}" for w in answer))
        rows["source"].append(sources[0] if i % 4 else sources[1])
    return Dataset.from_dict(rows)


def sft_args(tmp_path, **kwargs):
    """CoresetSFTConfig of a short CPU run (coreset of 3 of 8), ``kwargs`` overriding."""
    defaults = short_cpu_run(
        tmp_path,
        **{
            "per_device_train_batch_size": 8,
            "coreset_size": 3,
            "max_steps": 4,
            "bf16": False,
            "dataset_num_proc": None,
            **kwargs,
        },
    )
    from coreset_optim.integrations.trl import CoresetSFTConfig

    return CoresetSFTConfig(**defaults)
