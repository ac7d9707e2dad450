"""CoresetTrainer with selection="target": the held-out set reaches the optimizer, the coreset is
the one select() picks for it, resume is exact, and mismatched options fail before training."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from _integrations_models import (  # noqa: E402,F401
    lora,
    make_args,
    make_dataset,
    one_thread,
    selection_recorder,
    tiny_llama,
)

from coreset_optim.integrations.transformers import CoresetTrainer  # noqa: E402


def _run(tmp_path, max_steps, resume=None, model=None, **kwargs):
    args = make_args(
        tmp_path,
        per_device_train_batch_size=8,
        coreset_size=3,
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        source_column="source",
        selection="target",
        target_refresh=3,
        target_curvature=10.0,
        **kwargs,
    )
    recorder = selection_recorder()
    trainer = CoresetTrainer(
        model=lora(tiny_llama()) if model is None else model,
        args=args,
        train_dataset=make_dataset(n=32),
        target_dataset=make_dataset(n=4, seed=9),
        callbacks=[recorder],
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


def test_target_reaches_the_optimizer_and_is_timed(tmp_path):
    trainer, _ = _run(tmp_path, 3)
    opt = trainer.coreset_optimizer
    assert opt.selection.name == "target" and opt.selection.refresh == 3
    assert opt.selection.target["input_ids"].shape[0] == 4 and "source" not in opt.selection.target
    logs = [h for h in trainer.state.log_history if "loss" in h]
    times = [log["coreset/time_prepare"] for log in logs]
    # step 1 computes the target's gradient (a sketch pass), steps 2-3 reuse it (a cache check)
    assert len(times) == 3 and times[0] > 0 and max(times[1:]) < times[0]
    assert opt.selection.cache["computed_at"] == 0  # refreshed at selection 0, reused at 1 and 2


def test_resume_is_exact(tmp_path):
    full, full_selections = _run(tmp_path / "a", 5)
    model = lora(tiny_llama())
    resumed, resumed_selections = _run(
        tmp_path / "b", 5, resume=str(tmp_path / "a" / "out" / "checkpoint-2"), model=model
    )
    assert len(resumed_selections.coresets) == 3
    for c_res, c_full in zip(resumed_selections.coresets, full_selections.coresets[2:]):
        assert c_res.indices.tolist() == c_full.indices.tolist()
        assert torch.equal(c_res.weights, c_full.weights)
    pa = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, pa[name]), name


def test_target_options_must_agree(tmp_path):
    with pytest.raises(ValueError, match="target_dataset"):
        CoresetTrainer(
            model=lora(tiny_llama()), args=make_args(tmp_path, selection="target"), train_dataset=make_dataset()
        )
    with pytest.raises(ValueError, match="target_dataset"):
        CoresetTrainer(
            model=lora(tiny_llama()),
            args=make_args(tmp_path),
            train_dataset=make_dataset(),
            target_dataset=make_dataset(n=4),
        )
    with pytest.raises(ValueError, match="curvature"):
        make_args(tmp_path, selection="target", target_curvature=-1.0)
