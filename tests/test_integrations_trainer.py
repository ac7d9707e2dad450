"""CoresetTrainer: training, statistics, loss scaling against a hand-written loop, resume, bad input."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from _integrations_models import lora, one_thread, pattern_batch, tiny_gpt2, tiny_llama  # noqa: E402,F401
from transformers import TrainerCallback  # noqa: E402

from coreset_optim import CoresetOptimizer  # noqa: E402
from coreset_optim.integrations.causal_lm import causal_lm_loss_fn, causal_lm_per_example_loss  # noqa: E402
from coreset_optim.integrations.transformers import (  # noqa: E402
    CoresetTrainer,
    CoresetTrainingArguments,
    unwrap_coreset_optimizer,
)
from coreset_optim.moments import read_adam_moments  # noqa: E402


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows):
        self.rows = rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def make_dataset(n=64, length=16, seed=0, sources=("web", "code", "math")):
    batch = pattern_batch(n, length, seed=seed, pad_last=2)
    rows = []
    for i in range(n):
        row = {k: v[i].tolist() for k, v in batch.items()}
        if sources:
            # an uneven mixture: "math" is rare
            row["source"] = sources[0] if i % 8 < 5 else sources[1] if i % 8 < 7 else sources[2]
        rows.append(row)
    return ListDataset(rows)


def make_args(tmp_path, **kwargs):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=16,
        coreset_size=4,
        max_steps=6,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    defaults.update(kwargs)
    return CoresetTrainingArguments(**defaults)


def eval_loss(model, seed=123):
    batch = pattern_batch(32, 16, seed=seed, pad_last=2)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.train()
    return causal_lm_per_example_loss(out, batch["labels"]).mean().item()


def train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_bnb_8bit"])
def test_llama_lora_trains_with_sources(tmp_path, optim):
    model = lora(tiny_llama())
    before = eval_loss(model)
    args = make_args(tmp_path, optim=optim, source_column="source", max_steps=10, logging_steps=5)
    trainer = CoresetTrainer(model=model, args=args, train_dataset=make_dataset())
    trainer.train()
    after = eval_loss(model)
    assert after < before - 0.05, (before, after)
    opt = unwrap_coreset_optimizer(trainer.optimizer)
    assert isinstance(opt, CoresetOptimizer)
    assert [t.name for t in opt.sketch_targets] == ["base_model.model.model.layers.1.self_attn.v_proj.lora_B.default"]
    logs = train_logs(trainer)
    assert len(logs) == 2
    for log in logs:
        assert log["coreset/selections"] == 5
        assert log["coreset/selected"] == 5 * 4
        assert log["coreset/invalid"] == 0
        assert log["coreset/selected/web"] + log["coreset/selected/code"] + log["coreset/selected/math"] == 20
        assert log["coreset/in_batch/web"] + log["coreset/in_batch/code"] + log["coreset/in_batch/math"] == 80
        assert log["coreset/time_sketch"] > 0 and log["coreset/time_backward"] > 0
        assert math.isfinite(log["loss"])


@pytest.mark.parametrize("optim", ["adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_gpt2_lora_bnb_optims_are_read(tmp_path, optim):
    bnb = pytest.importorskip("bitsandbytes")
    model = lora(tiny_gpt2(), targets=("c_attn",))
    args = make_args(tmp_path, optim=optim, max_steps=3, logging_steps=3)
    trainer = CoresetTrainer(model=model, args=args, train_dataset=make_dataset(sources=None))
    trainer.train()
    opt = unwrap_coreset_optimizer(trainer.optimizer)
    assert isinstance(opt.optimizer, bnb.optim.optimizer.Optimizer8bit)
    for target in opt.sketch_targets:
        moments = read_adam_moments(opt.optimizer, target.module.weight)
        assert moments is not None and moments.step == 3
        assert torch.count_nonzero(moments.exp_avg_sq) > 0
    assert "coreset/selected/all" not in train_logs(trainer)[0]
