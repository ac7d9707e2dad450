"""CoresetSFTTrainer logs SFT's training metrics (num_tokens, entropy, mean_token_accuracy) on the large batch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("trl")
pytestmark = pytest.mark.usefixtures("one_thread")

from _integrations_models import lora, one_thread, selection_recorder, tiny_llama  # noqa: E402,F401
from _integrations_models import sft_args, sft_dataset, tiny_tokenizer  # noqa: E402

from coreset_optim.integrations.causal_lm import causal_lm_loss_fn  # noqa: E402
from coreset_optim.integrations.trl import CoresetSFTTrainer  # noqa: E402

METRICS = ("num_tokens", "entropy", "mean_token_accuracy")


def train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def sft_fused_metrics():
    """A CoresetCallback that computes, at every selection (before the step, with the parameters the
    selection saw), SFT's own metrics of the micro-batch with SFT's fused LM head: what the stock
    SFTTrainer's compute_loss would have logged for it."""
    from coreset_optim.integrations.transformers import CoresetCallback

    class FusedMetrics(CoresetCallback):
        def __init__(self):
            self.values = []  # (entropy, accuracy, attention-mask tokens) per micro-batch

        def on_selection(self, args, state, control, coreset=None, inputs=None, model=None, **kwargs):
            batch = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels")}
            with torch.no_grad():
                out = model(**batch, fused_lm_head=True)
            tokens = out.label_mask.sum()
            self.values.append(
                (
                    (out.entropy.sum() / tokens).item(),
                    (out.is_top1.sum() / tokens).item(),
                    int(batch["attention_mask"].sum()),
                )
            )

    return FusedMetrics()


def test_first_step_metrics_equal_the_stock_sft_trainer(tmp_path):
    """One optimizer step of 2 micro-batches of 8 from the same model and data: the coreset trainer
    logs SFT's num_tokens, entropy and mean_token_accuracy of the whole micro-batches (not of the
    3 examples chosen), as the stock SFTTrainer does."""
    from trl import SFTConfig, SFTTrainer

    tokenizer, data = tiny_tokenizer(), sft_dataset(n=32)
    common = dict(gradient_accumulation_steps=2, max_steps=1, logging_steps=1, gradient_checkpointing=False)
    stock_args = dict(  # sft_args' defaults, without the coreset options
        output_dir=str(tmp_path / "stock"),
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        seed=0,
        disable_tqdm=True,
        dataset_num_proc=None,
        **common,
    )
    stock = SFTTrainer(
        model=lora(tiny_llama()), args=SFTConfig(**stock_args), train_dataset=data, processing_class=tokenizer
    )
    stock.train()
    coreset = CoresetSFTTrainer(
        model=lora(tiny_llama()),
        args=sft_args(tmp_path / "coreset", coreset_size=3, **common),
        train_dataset=data,
        processing_class=tokenizer,
    )
    coreset.train()
    (want,), (got,) = train_logs(stock), train_logs(coreset)
    assert got["num_tokens"] == want["num_tokens"] > 0
    for key in ("entropy", "mean_token_accuracy"):
        assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    assert got["loss"] == pytest.approx(want["loss"], rel=0.05)  # examples weighted, not tokens: near, not equal


def test_metrics_of_every_logging_window_are_sfts_of_its_large_batches(tmp_path):
    """4 steps of 2 micro-batches, logged every 2 steps: entropy and accuracy are the means of SFT's
    own values (its fused LM head) over the window's 4 micro-batches, with the parameters each
    selection saw; num_tokens counts every attention-mask token so far."""
    fused = sft_fused_metrics()
    trainer = CoresetSFTTrainer(
        model=lora(tiny_llama()),
        args=sft_args(tmp_path, gradient_accumulation_steps=2, max_steps=4, logging_steps=2),
        train_dataset=sft_dataset(n=64),
        processing_class=tiny_tokenizer(),
        callbacks=[fused],
    )
    trainer.train()
    logs = train_logs(trainer)
    assert len(logs) == 2 and len(fused.values) == 8
    for window, log in enumerate(logs):
        values = fused.values[4 * window : 4 * window + 4]
        assert log["entropy"] == pytest.approx(sum(v[0] for v in values) / 4, rel=1e-5)
        assert log["mean_token_accuracy"] == pytest.approx(sum(v[1] for v in values) / 4, rel=1e-5, abs=1e-7)
        assert log["num_tokens"] == sum(v[2] for v in fused.values[: 4 * window + 4])


def test_with_your_own_per_example_loss_only_num_tokens_is_logged(tmp_path):
    """A custom per_example_loss gives no logits to read: entropy and mean_token_accuracy are left
    out rather than made up; num_tokens needs none."""
    trainer = CoresetSFTTrainer(
        model=lora(tiny_llama()),
        args=sft_args(tmp_path, max_steps=2, logging_steps=1, gradient_checkpointing=False),
        train_dataset=sft_dataset(n=16),
        processing_class=tiny_tokenizer(),
        per_example_loss=lambda model, inputs: causal_lm_loss_fn(model)(inputs),
    )
    trainer.train()
    for log in train_logs(trainer):
        assert log["num_tokens"] > 0
        assert "entropy" not in log and "mean_token_accuracy" not in log


def test_metrics_do_not_change_the_training(tmp_path):
    """The statistics are read from the selection pass's logits without a gradient: the parameters
    after 2 steps are those of a run whose per-example loss is the default one passed explicitly
    (which records no statistics)."""
    args = dict(max_steps=2, logging_steps=1, gradient_checkpointing=False)
    runs = []
    for custom in (False, True):
        extra = dict(per_example_loss=lambda model, inputs: causal_lm_loss_fn(model)(inputs)) if custom else {}
        trainer = CoresetSFTTrainer(
            model=lora(tiny_llama()),
            args=sft_args(tmp_path / str(custom), **args),
            train_dataset=sft_dataset(n=16),
            processing_class=tiny_tokenizer(),
            **extra,
        )
        trainer.train()
        runs.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})
    for name, value in runs[0].items():
        assert torch.equal(value, runs[1][name]), name
