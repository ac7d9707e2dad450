"""CoresetSFTTrainer: TRL's SFTTrainer with the coreset step (tiny model and tokenizer, built offline)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytest.importorskip("trl")
pytestmark = pytest.mark.usefixtures("one_thread")

from _integrations_models import (  # noqa: E402,F401
    grad_capture,
    lora,
    one_thread,
    selection_recorder,
    sft_args,
    sft_dataset,
    tiny_llama,
    tiny_tokenizer,
    WORDS,
)

from coreset_optim.integrations.causal_lm import causal_lm_per_example_loss  # noqa: E402
from coreset_optim.integrations.transformers import CoresetTrainingArguments  # noqa: E402
from coreset_optim.integrations.trl import CoresetSFTConfig, CoresetSFTTrainer  # noqa: E402,F401


def test_sft_trains_on_coresets_and_logs_selection_stats(tmp_path):
    args = sft_args(tmp_path, source_column="source", max_steps=4, logging_steps=2)
    trainer = CoresetSFTTrainer(
        model=lora(tiny_llama()), args=args, train_dataset=sft_dataset(), processing_class=tiny_tokenizer()
    )
    assert trainer.args.gradient_checkpointing  # SFT's default, kept: the sketch pass switches it off
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for log in logs:
        assert log["coreset/selections"] == 2 and log["coreset/selected"] == 2 * 3
        assert log["coreset/in_batch/qa"] + log["coreset/in_batch/math"] == 16
        assert log["coreset/selected/qa"] + log["coreset/selected/math"] == 6
        assert log["coreset/invalid"] == 0
        assert log["coreset/time_sketch"] > 0 and log["coreset/time_backward"] > 0
        assert math.isfinite(log["loss"])
    assert [t.name for t in trainer.coreset_optimizer.sketch_layers] == [
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default"
    ]


def completion_masks(tokenizer, dataset) -> dict:
    """Unpadded token ids -> which tokens carry loss (the completion and <eos>), from the raw text."""
    masks = {}
    for row in dataset:
        prompt_ids = tokenizer(row["prompt"])["input_ids"]
        full_ids = tokenizer(row["prompt"] + row["completion"] + tokenizer.eos_token)["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids
        masks[tuple(full_ids)] = [False] * len(prompt_ids) + [True] * (len(full_ids) - len(prompt_ids))
    return masks


def _reference_step_gradient(model, masks, micro_batches, coresets, accumulation):
    """sum over micro-batches of (1/GA) sum_j w_j grad(loss_j) / N, one unpadded example at a time,
    loss_j the mean NLL of the tokens ``masks`` marks (found from the raw data, not from SFT's labels)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    model.train()
    for batch, coreset in zip(micro_batches, coresets):
        num_valid, weights = coreset.num_valid, coreset.weights
        assert num_valid == batch["input_ids"].shape[0]  # every example has tokens that carry loss
        for j, i in enumerate(coreset.indices.tolist()):
            ids = batch["input_ids"][i][batch["attention_mask"][i].bool()]
            carries = torch.tensor(masks[tuple(ids.tolist())][1:])  # token t is predicted at t - 1
            logits = model(input_ids=ids[None]).logits[0, :-1]
            nll = torch.nn.functional.cross_entropy(logits.float(), ids[1:], reduction="none")
            loss = nll[carries].mean() * weights[j] / num_valid / accumulation
            for n, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
                total[n] += g
    return total


@pytest.mark.parametrize("size", [dict(coreset_size=3), dict(coreset_size=None, coreset_ratio=1.0)])
def test_step_gradient_is_the_weighted_completion_only_reference(tmp_path, size):
    model = lora(tiny_llama())
    initial = copy.deepcopy(model)
    tokenizer, data = tiny_tokenizer(), sft_dataset(n=16)
    args = sft_args(
        tmp_path,
        gradient_accumulation_steps=2,
        max_steps=1,
        max_grad_norm=0.0,
        logging_steps=1,
        gradient_checkpointing=False,
        **size,
    )
    capture, recorder = grad_capture(), selection_recorder()
    trainer = CoresetSFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[capture, recorder]
    )
    assert trainer.completion_only_loss  # SFT's default for prompt-completion data
    trainer.train()
    assert len(recorder.seen) == 2 and len(capture.grads) == 1
    # the prompt tokens carry no label: the per-example losses the coreset saw are completion-only
    for batch in recorder.seen:
        assert bool((batch["labels"] == -100).any(1).all())
    ref = _reference_step_gradient(initial, completion_masks(tokenizer, data), recorder.seen, recorder.coresets, 2)
    for name, grad in capture.grads[0].items():
        torch.testing.assert_close(grad, ref[name], rtol=1e-4, atol=1e-7, msg=name)


CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{{ eos_token }}"
    "{% endgeneration %}{% else %}{{ m['content'] }} {% endif %}{% endfor %}"
)


def chat_dataset(n: int = 16, seed: int = 0):
    """Two-turn conversations of random words (the user turns carry no loss under assistant_only_loss)."""
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)

    def words():
        count = int(torch.randint(1, 4, (1,), generator=g))
        return " ".join(f"w{w}" for w in torch.randint(0, WORDS, (count,), generator=g).tolist())

    turns = [[{"role": r, "content": words()} for r in ("user", "assistant", "user", "assistant")] for _ in range(n)]
    return Dataset.from_dict({"messages": turns})


def assistant_masks(tokenizer, dataset) -> dict:
    """Unpadded token ids -> which tokens carry loss (assistant words and their <eos>), from the messages."""
    masks = {}
    for row in dataset:
        ids, carries = [], []
        for m in row["messages"]:
            part = tokenizer(m["content"])["input_ids"] + ([tokenizer.eos_token_id] if m["role"] == "assistant" else [])
            ids += part
            carries += [m["role"] == "assistant"] * len(part)
        masks[tuple(ids)] = carries
    return masks


def test_step_gradient_is_the_weighted_assistant_only_reference(tmp_path):
    model = lora(tiny_llama())
    initial = copy.deepcopy(model)
    tokenizer, data = tiny_tokenizer(), chat_dataset()
    tokenizer.chat_template = CHAT_TEMPLATE
    args = sft_args(
        tmp_path,
        assistant_only_loss=True,
        gradient_accumulation_steps=2,
        max_steps=1,
        max_grad_norm=0.0,
        logging_steps=1,
        gradient_checkpointing=False,
    )
    capture, recorder = grad_capture(), selection_recorder()
    trainer = CoresetSFTTrainer(
        model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[capture, recorder]
    )
    trainer.train()
    assert len(recorder.seen) == 2 and len(capture.grads) == 1
    ref = _reference_step_gradient(initial, assistant_masks(tokenizer, data), recorder.seen, recorder.coresets, 2)
    for name, grad in capture.grads[0].items():
        torch.testing.assert_close(grad, ref[name], rtol=1e-4, atol=1e-7, msg=name)


def test_per_example_losses_follow_the_labels_sft_built(tmp_path):
    """completion_only_loss=False: every token but padding counts (the mask is SFT's, not ours).
    The losses a selection was made on (on_selection's coreset.losses, before the first step) are
    those of the untrained model on the labels of the batch it chose from."""
    tokenizer, data = tiny_tokenizer(), sft_dataset(n=8)
    for completion_only in (True, False):
        model = lora(tiny_llama())
        initial = copy.deepcopy(model).eval()
        args = sft_args(tmp_path, completion_only_loss=completion_only, max_steps=1, gradient_checkpointing=False)
        recorder = selection_recorder()
        trainer = CoresetSFTTrainer(
            model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[recorder]
        )
        trainer.train()
        (batch,), (coreset,) = recorder.seen, recorder.coresets
        labelled = (batch["labels"] != -100).sum(1)
        tokens = batch["attention_mask"].sum(1)
        if completion_only:
            assert bool((labelled < tokens).all())
        else:
            assert torch.equal(labelled, tokens)
        with torch.no_grad():
            out = initial(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        torch.testing.assert_close(coreset.losses, causal_lm_per_example_loss(out, batch["labels"]))


def _run(tmp_path, model, max_steps, resume=None):
    args = sft_args(
        tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=2, logging_steps=1, source_column="source"
    )
    recorder = selection_recorder()
    trainer = CoresetSFTTrainer(
        model=model, args=args, train_dataset=sft_dataset(), processing_class=tiny_tokenizer(), callbacks=[recorder]
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


def test_resume_from_checkpoint_is_exact(tmp_path):
    full, full_selections = _run(tmp_path / "a", lora(tiny_llama()), 4)
    checkpoint = tmp_path / "a" / "out" / "checkpoint-2"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["coreset_optim"]["num_selections"] == 2 and saved["coreset_optim"]["num_steps"] == 2
    model = lora(tiny_llama())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()
    resumed, resumed_selections = _run(tmp_path / "b", model, 4, resume=str(checkpoint))
    assert resumed_selections.steps == full_selections.steps[2:] == [2, 3]
    assert len(resumed_selections.coresets) == 2
    for c_res, c_full in zip(resumed_selections.coresets, full_selections.coresets[2:]):
        assert c_res.indices.tolist() == c_full.indices.tolist()
        assert torch.equal(c_res.weights, c_full.weights)
    assert torch.equal(full.coreset_optimizer.generator.get_state(), resumed.coreset_optimizer.generator.get_state())
    pa = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, pa[name]), name


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(packing=True), "set packing=False"),
        (dict(padding_free=True), "set padding_free=False"),
        (dict(loss_type="dft"), "per_example_loss=...|loss_type='nll'"),
        (dict(activation_offloading=True), "set activation_offloading=False"),
        (dict(label_smoothing_factor=0.1), "label_smoothing_factor"),
    ],
)
def test_unsupported_sft_options_fail_at_construction(tmp_path, options, match):
    model = lora(tiny_llama())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        CoresetSFTTrainer(
            model=model,
            args=sft_args(tmp_path, **options),
            train_dataset=sft_dataset(n=8),
            processing_class=tiny_tokenizer(),
        )
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_other_arguments_are_refused(tmp_path):
    from trl import SFTConfig

    model, data, tok = lora(tiny_llama()), sft_dataset(n=8), tiny_tokenizer()
    plain = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, bf16=False)
    with pytest.raises(TypeError, match="CoresetSFTConfig"):
        CoresetSFTTrainer(model=model, args=plain, train_dataset=data, processing_class=tok)
    trainer_args = CoresetTrainingArguments(output_dir=str(tmp_path), coreset_size=2, report_to="none", use_cpu=True)
    with pytest.raises(TypeError, match="CoresetSFTConfig"):
        CoresetSFTTrainer(model=model, args=trainer_args, train_dataset=data, processing_class=tok)
    with pytest.raises(TypeError, match="CoresetSFTConfig"):
        CoresetSFTTrainer(model=model, train_dataset=data, processing_class=tok)
