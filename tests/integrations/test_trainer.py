"""CoresetTrainer: training, statistics, loss scaling against a hand-written loop, resume, bad input."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from _integrations_models import (  # noqa: E402,F401
    lora,
    make_args,
    make_dataset,
    grad_capture,
    one_thread,
    pattern_batch,
    selection_recorder,
    tiny_gpt2,
    tiny_llama,
)

from coreset_optim import CoresetOptimizer  # noqa: E402
from coreset_optim.integrations.causal_lm import causal_lm_loss_fn, causal_lm_per_example_loss  # noqa: E402
from coreset_optim.integrations.transformers import (  # noqa: E402
    CoresetCallback,
    CoresetTrainer,
    unwrap_coreset_optimizer,
)
from coreset_optim.precondition.moments import read_adam_moments  # noqa: E402


def eval_loss(model, seed=123):
    batch = pattern_batch(32, 16, seed=seed, pad_last=2)
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.train()
    return causal_lm_per_example_loss(out, batch["labels"]).mean().item()


def train_logs(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


MODELS = {
    "llama": (lambda: lora(tiny_llama()), "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default"),
    "gpt2": (
        lambda: lora(tiny_gpt2(), targets=("c_attn",)),
        "base_model.model.transformer.h.1.attn.c_attn.lora_B.default",
    ),
}


@pytest.mark.parametrize(
    "arch, optim",
    [("llama", "adamw_torch"), ("llama", "adamw_bnb_8bit"), ("gpt2", "adamw_torch"), ("gpt2", "paged_adamw_8bit")],
)
def test_lora_trains_with_sources(tmp_path, arch, optim):
    if "8bit" in optim:
        pytest.importorskip("bitsandbytes")
    build, target = MODELS[arch]
    model = build()
    before = eval_loss(model)
    args = make_args(tmp_path, optim=optim, source_column="source", max_steps=10, logging_steps=5)
    trainer = CoresetTrainer(model=model, args=args, train_dataset=make_dataset())
    trainer.train()
    after = eval_loss(model)
    assert after < before - 0.05, (before, after)
    opt = unwrap_coreset_optimizer(trainer.optimizer)
    assert isinstance(opt, CoresetOptimizer)
    assert [t.name for t in opt.sketch_layers] == [target]
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
    # r=32: c_attn's lora_B has 192 * 32 = 6144 >= 4096 (bnb's min_8bit_size) values: 8-bit state
    model = lora(tiny_gpt2(), targets=("c_attn",), r=32)
    args = make_args(tmp_path, optim=optim, max_steps=3, logging_steps=3)
    trainer = CoresetTrainer(model=model, args=args, train_dataset=make_dataset(sources=None))
    trainer.train()
    opt = unwrap_coreset_optimizer(trainer.optimizer)
    assert isinstance(opt.optimizer, bnb.optim.optimizer.Optimizer8bit)
    for target in opt.sketch_layers:
        state = opt.optimizer.state[target.module.weight]
        assert state["state2"].dtype == (torch.float32 if "32bit" in optim else torch.uint8)
        moments = read_adam_moments(opt.optimizer, target.module.weight)
        assert moments is not None and moments.step == 3
        assert torch.count_nonzero(moments.exp_avg_sq) > 0
    assert "coreset/selected/all" not in train_logs(trainer)[0]


def _reference_step_gradient(model, micro_batches, coresets, accumulation):
    """sum over micro-batches of (1/GA) * sum_j w_j grad(loss_j) / N_valid, one example at a time."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    loss_fn = causal_lm_loss_fn(model)
    model.train()
    for batch, coreset in zip(micro_batches, coresets):
        valid = int((batch["labels"][:, 1:] != -100).any(1).sum())
        for j, i in enumerate(coreset.indices.tolist()):
            one = {k: batch[k][i : i + 1] for k in ("input_ids", "attention_mask", "labels")}
            loss = loss_fn(one)[0] * coreset.weights[j] / valid / accumulation
            grads = torch.autograd.grad(loss, list(params.values()))
            for n, g in zip(params, grads):
                total[n] += g
    return total


@pytest.mark.parametrize("size", [dict(coreset_size=3), dict(coreset_ratio=1.0)])
def test_step_gradient_matches_hand_written_loop_under_accumulation(tmp_path, size):
    import copy

    model = lora(tiny_llama())
    initial = copy.deepcopy(model)
    data = make_dataset(n=16, sources=None)
    data.rows[5]["labels"] = [-100] * 16  # an example without label tokens: invalid, not counted
    args = make_args(
        tmp_path,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        max_steps=1,
        max_grad_norm=0.0,
        logging_steps=1,
        **{"coreset_size": None, **size},
    )
    capture, recorder = grad_capture(), selection_recorder()
    trainer = CoresetTrainer(model=model, args=args, train_dataset=data, callbacks=[capture, recorder])
    trainer.train()
    assert len(recorder.seen) == 2 and len(capture.grads) == 1
    assert sum(c.num_valid for c in recorder.coresets) == 15  # one invalid example in 16
    assert trainer.state.log_history[0]["coreset/invalid"] == 1
    ref = _reference_step_gradient(initial, recorder.seen, recorder.coresets, accumulation=2)
    for name, grad in capture.grads[0].items():
        torch.testing.assert_close(grad, ref[name], rtol=1e-4, atol=1e-7, msg=name)


def _run(tmp_path, model, max_steps, resume=None, optim="adamw_torch"):
    args = make_args(
        tmp_path,
        optim=optim,
        per_device_train_batch_size=8,
        coreset_size=3,
        max_steps=max_steps,
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        source_column="source",
    )
    recorder = selection_recorder()
    trainer = CoresetTrainer(model=model, args=args, train_dataset=make_dataset(n=32), callbacks=[recorder])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, recorder


@pytest.mark.parametrize(
    "arch, optim", [("llama", "adamw_torch"), ("llama", "paged_adamw_8bit"), ("gpt2", "adamw_bnb_8bit")]
)
def test_resume_from_checkpoint_is_exact(tmp_path, arch, optim):
    if "8bit" in optim:
        pytest.importorskip("bitsandbytes")
    build = MODELS[arch][0]
    full, full_selections = _run(tmp_path / "a", build(), 4, optim=optim)
    checkpoint = tmp_path / "a" / "out" / "checkpoint-2"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["coreset_optim"]["num_selections"] == 2 and saved["coreset_optim"]["num_steps"] == 2

    # the same base weights (as from_pretrained gives), other LoRA weights: the checkpoint's must win
    model = build()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_()
    resumed, resumed_selections = _run(tmp_path / "b", model, 4, resume=str(checkpoint), optim=optim)
    assert resumed_selections.steps == full_selections.steps[2:] == [2, 3]
    assert len(resumed_selections.coresets) == 2
    for c_res, c_full in zip(resumed_selections.coresets, full_selections.coresets[2:]):
        assert c_res.indices.tolist() == c_full.indices.tolist()
        assert torch.equal(c_res.weights, c_full.weights)
    a, b = full.coreset_optimizer, resumed.coreset_optimizer
    assert (a.num_selections, a.num_steps) == (b.num_selections, b.num_steps) == (4, 4)
    assert torch.equal(a.generator.get_state(), b.generator.get_state())
    pa = dict(full.model.named_parameters())
    for name, p in resumed.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, pa[name]), name


def test_on_selection_gets_each_coreset_select_returned_and_its_batch(tmp_path, monkeypatch):
    """on_selection fires once per micro-batch (optimizer steps x accumulation), after the coreset's
    backward and before the optimizer step, with the very Coreset select() returned and the batch it
    chose from (the source column included); a plain TrainerCallback and one that defines
    on_selection without deriving from CoresetCallback sit beside it."""
    from transformers import TrainerCallback

    produced = []  # (batch, sources, coreset) of every select() call
    select = CoresetOptimizer.select

    def recording_select(self, batch, loss_fn, **kwargs):
        coreset = select(self, batch, loss_fn, **kwargs)
        produced.append((dict(batch), kwargs["sources"], coreset))
        return coreset

    monkeypatch.setattr(CoresetOptimizer, "select", recording_select)

    class DuckTyped(TrainerCallback):  # on_selection, but not a CoresetCallback
        def __init__(self):
            self.grads, self.optimizers = [], []

        def on_selection(self, args, state, control, coreset=None, inputs=None, model=None, optimizer=None, **kw):
            self.grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
            self.optimizers.append(unwrap_coreset_optimizer(optimizer))

    args = make_args(
        tmp_path,
        per_device_train_batch_size=8,
        coreset_size=3,
        gradient_accumulation_steps=2,
        max_steps=3,
        max_grad_norm=0.0,
        source_column="source",
    )
    capture, recorder, duck = grad_capture(), selection_recorder(), DuckTyped()
    trainer = CoresetTrainer(
        model=lora(tiny_llama()),
        args=args,
        train_dataset=make_dataset(n=48),
        callbacks=[capture, recorder, duck, CoresetCallback()],
    )
    trainer.train()
    assert len(produced) == len(recorder.coresets) == len(duck.grads) == 3 * 2
    assert all(got is made for got, (_, _, made) in zip(recorder.coresets, produced))
    assert recorder.steps == [0, 0, 1, 1, 2, 2]  # global_step counts the optimizer steps before this one
    for inputs, (batch, sources, _) in zip(recorder.seen, produced):
        assert set(inputs) == set(batch) | {"source"} and inputs["source"] == sources
        for key, value in batch.items():
            assert torch.equal(inputs[key], value), key
    assert all(opt is trainer.coreset_optimizer for opt in duck.optimizers)
    # after the window's last micro-batch, .grad is what the optimizer steps with; after its first, not yet
    assert len(capture.grads) == 3
    for step, final in enumerate(capture.grads):
        first, last = duck.grads[2 * step], duck.grads[2 * step + 1]
        assert all(torch.equal(last[n], g) for n, g in final.items())
        assert not all(torch.equal(first[n], g) for n, g in final.items())


def test_on_selection_can_stop_training(tmp_path):
    """Like the Trainer's own events, on_selection may set flags on control."""

    class StopAfterThree(CoresetCallback):
        calls = 0

        def on_selection(self, args, state, control, **kwargs):
            self.calls += 1
            control.should_training_stop = self.calls == 3

    stop = StopAfterThree()
    trainer = CoresetTrainer(
        model=lora(tiny_llama()), args=make_args(tmp_path, max_steps=6), train_dataset=make_dataset(), callbacks=[stop]
    )
    trainer.train()
    assert stop.calls == 3 and trainer.state.global_step == 3


def test_a_non_callable_on_selection_is_refused(tmp_path):
    from transformers import TrainerCallback

    class Broken(TrainerCallback):
        on_selection = "log it"

    with pytest.raises(TypeError, match="Broken.on_selection must be a method"):
        CoresetTrainer(
            model=lora(tiny_llama()), args=make_args(tmp_path), train_dataset=make_dataset(), callbacks=[Broken()]
        )
    model = lora(tiny_llama())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = CoresetTrainer(model=model, args=make_args(tmp_path), train_dataset=make_dataset())
    trainer.add_callback(Broken)  # added after construction: refused at the first selection
    with pytest.raises(TypeError, match="Broken.on_selection must be a method"):
        trainer.train()
    assert trainer.state.global_step == 0
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def _lora_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_bad_arguments_fail_at_construction(tmp_path):
    with pytest.raises(ValueError, match="larger than per_device_train_batch_size"):
        make_args(tmp_path, coreset_size=32)
    with pytest.raises(ValueError, match="exactly one of coreset_size"):
        make_args(tmp_path, coreset_size=None)
    with pytest.raises(ValueError, match="coreset_ratio must be in"):
        make_args(tmp_path, coreset_size=None, coreset_ratio=1.5)
    with pytest.raises(ValueError, match="normalize must be one of"):
        make_args(tmp_path, normalize="rms")


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(optim="lomo"), "fuses the update"),
        (dict(label_smoothing_factor=0.1), "label_smoothing_factor"),
    ],
)
def test_unsupported_trainer_options_fail_at_construction(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        CoresetTrainer(model=lora(tiny_llama()), args=make_args(tmp_path, **options), train_dataset=make_dataset())


def test_keep_sources_from_the_arguments(tmp_path):
    args = make_args(tmp_path, source_column="source", keep_sources=["math"], max_steps=2, logging_steps=2)
    trainer = CoresetTrainer(model=lora(tiny_llama()), args=args, train_dataset=make_dataset())
    trainer.train()
    log = train_logs(trainer)[0]
    assert log["coreset/selected/math"] == log["coreset/in_batch/math"] > 0
    assert log["coreset/selected"] == 8


def test_missing_source_column_fails_before_training(tmp_path):
    model = lora(tiny_llama())
    args = make_args(tmp_path, source_column="domain")
    with pytest.raises(ValueError, match="source_column='domain' is not a column"):
        CoresetTrainer(model=model, args=args, train_dataset=make_dataset())


def test_plain_trainer_arguments_are_refused(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(TypeError, match="CoresetTrainingArguments"):
        CoresetTrainer(model=lora(tiny_llama()), args=args, train_dataset=make_dataset())


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(optim="sgd"), "keeps no Adam second moment"),
        (dict(optim="adafactor"), "keeps no Adam second moment"),
        (dict(sketch_modules=["base_model.model.model.layers.1.self_attn.k_proj.lora_B.default"]), "matches no module"),
    ],
)
def test_bad_setup_fails_before_any_parameter_changes(tmp_path, options, match):
    model = lora(tiny_llama())
    before = _lora_state(model)
    trainer = CoresetTrainer(model=model, args=make_args(tmp_path, **options), train_dataset=make_dataset())
    with pytest.raises(ValueError, match=match):
        trainer.train()
    for name, p in _lora_state(model).items():
        assert torch.equal(p, before[name])


def test_sgd_with_normalize_none_is_the_documented_fallback(tmp_path):
    model = lora(tiny_llama())
    before = eval_loss(model)
    args = make_args(tmp_path, optim="sgd", normalize=None, learning_rate=0.5, max_steps=6)
    CoresetTrainer(model=model, args=args, train_dataset=make_dataset(sources=None)).train()
    assert eval_loss(model) < before


def test_user_optimizer_is_wrapped_and_eval_runs_without_the_source_column(tmp_path):
    model = lora(tiny_llama())
    inner = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    args = make_args(tmp_path, source_column="source", max_steps=2, eval_strategy="no")
    trainer = CoresetTrainer(
        model=model,
        args=args,
        train_dataset=make_dataset(),
        eval_dataset=make_dataset(16, sources=None),
        optimizers=(inner, None),
    )
    trainer.train()
    assert trainer.coreset_optimizer.optimizer is inner and inner.state
    metrics = trainer.evaluate()
    assert math.isfinite(metrics["eval_loss"])


def test_per_example_loss_hook(tmp_path):
    calls = []

    def per_example_loss(model, inputs):
        calls.append(sorted(inputs))
        return causal_lm_loss_fn(model)(inputs)

    args = make_args(tmp_path, source_column="source", max_steps=1)
    CoresetTrainer(
        model=lora(tiny_llama()), args=args, train_dataset=make_dataset(), per_example_loss=per_example_loss
    ).train()
    assert calls and all(keys == ["attention_mask", "input_ids", "labels"] for keys in calls)


def test_gradient_checkpointing_through_the_trainer(tmp_path):
    model = lora(tiny_llama())
    before = eval_loss(model)
    args = make_args(tmp_path, gradient_checkpointing=True, max_steps=8, logging_steps=8)
    trainer = CoresetTrainer(model=model, args=args, train_dataset=make_dataset(sources=None))
    trainer.train()
    assert model.base_model.model.is_activation_checkpointing
    assert eval_loss(model) < before - 0.05


class OddAdam(torch.optim.SGD):
    """Has Adam's hyper-parameters but keeps its second moment under a name nobody reads."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        for group in self.param_groups:
            group.update(betas=(0.9, 0.999), eps=1e-8)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.state[p]["my_v"] = p.grad.square()
        return super().step(closure)


def test_unreadable_second_moment_is_reported_after_the_first_step(tmp_path):
    model = lora(tiny_llama())
    opt = OddAdam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    args = make_args(tmp_path, max_steps=3)
    trainer = CoresetTrainer(model=model, args=args, train_dataset=make_dataset(), optimizers=(opt, None))
    with pytest.raises(ValueError, match="no Adam second moment .* in a layout"):
        trainer.train()
    assert trainer.coreset_optimizer.num_steps == 1


def settings(config, method):
    """Every option's value: the shared config's and the selection method's."""
    return {**config.to_dict(), **method.options(), "selection": method.name}


def test_presets_and_selection_options_reach_the_optimizer(tmp_path):
    default = settings(*make_args(tmp_path).coreset_options())
    assert (default["sketch"], default["selection"], default["normalize"]) == ("auto", "anchored_consensus", "adam")
    colm = settings(*make_args(tmp_path, coreset_preset="colm").coreset_options())
    assert (colm["sketch"], colm["selection"], colm["normalize"], colm["zo_fixed_direction"]) == (
        "zeroth_order",
        "facility_location",
        "adam_update",
        True,
    )
    # an option given explicitly wins over the preset
    mixed = make_args(tmp_path, coreset_preset="colm", selection="gradient_matching", normalize=None)
    mixed = settings(*mixed.coreset_options())
    assert (mixed["sketch"], mixed["selection"], mixed["normalize"]) == ("zeroth_order", "gradient_matching", None)
    # ... also when the value given is the default preset's own (it was once dropped as "unset")
    given = settings(
        *make_args(tmp_path, coreset_preset="colm", selection="consensus_loss", sketch="exact").coreset_options()
    )
    assert (given["sketch"], given["selection"]) == ("exact", "consensus_loss")
    # a preset's option the chosen method does not take is left out; one given is refused
    assert "sketch" not in settings(*make_args(tmp_path, coreset_preset="colm", selection="loss").coreset_options())
    with pytest.raises(TypeError, match="'loss' takes no option .'sketch'"):
        make_args(tmp_path, selection="loss", sketch="exact")
    with pytest.raises(ValueError, match="preset"):
        make_args(tmp_path, coreset_preset="nope")
    args = make_args(tmp_path, selection="facility_location", similarity="cosine", max_steps=1)
    trainer = CoresetTrainer(model=lora(tiny_llama()), args=args, train_dataset=make_dataset())
    trainer.train()
    method = trainer.coreset_optimizer.selection
    assert (method.name, method.similarity) == ("facility_location", "cosine")


def test_causal_lm_loss_fn_builds_no_kv_cache():
    """The sketch pass runs in eval mode, where HF models build a KV cache unless told not to."""
    model = tiny_llama().eval()
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("use_cache")), with_kwargs=True)
    ids = torch.randint(0, 256, (2, 8))
    batch = {"input_ids": ids, "labels": ids}
    losses = causal_lm_loss_fn(model)(batch)
    causal_lm_loss_fn(model)({**batch, "use_cache": True})
    assert seen == [False, True]
    expected = torch.stack(
        [causal_lm_per_example_loss(model(input_ids=ids[i : i + 1]), ids[i : i + 1])[0] for i in range(2)]
    )
    torch.testing.assert_close(losses, expected)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_logged_loss_is_the_large_batch_mean_loss(tmp_path, accumulation):
    """The Trainer's 'loss' is the mean of the large batches' per-example losses (what plain
    training reports), recomputed here from the seen batches; 'coreset/loss' is the coreset's."""
    import copy

    model = lora(tiny_llama())
    initial = copy.deepcopy(model)
    args = make_args(tmp_path, max_steps=4, logging_steps=2, gradient_accumulation_steps=accumulation, selection="loss")
    recorder = selection_recorder()
    trainer = CoresetTrainer(model=model, args=args, train_dataset=make_dataset(sources=None), callbacks=[recorder])
    trainer.train()
    selections = [(c.losses, float(c.loss)) for c in recorder.coresets]
    logs = train_logs(trainer)
    assert len(logs) == 2
    per_window = 2 * accumulation
    for w, log in enumerate(logs):
        window = selections[w * per_window : (w + 1) * per_window]
        batch_means = [losses[torch.isfinite(losses)].mean().item() for losses, _ in window]
        # Trainer: the window's summed returns / optimizer steps; each return is the mean / GA.
        assert log["loss"] == pytest.approx(sum(batch_means) / per_window, rel=1e-3, abs=1e-4)
        assert log["coreset/loss"] == pytest.approx(sum(c for _, c in window) / per_window, rel=1e-4)
        assert log["coreset/loss"] > log["loss"]  # selection="loss" trains on the hardest examples
    # The recorded losses are the batch's own: a plain no-grad pass of the untrained model gives
    # the first batch's.
    initial.eval()
    with torch.no_grad():
        first = recorder.seen[0]
        out = initial(input_ids=first["input_ids"], attention_mask=first["attention_mask"])
        plain = causal_lm_per_example_loss(out, first["labels"])
    torch.testing.assert_close(plain, selections[0][0], equal_nan=True, rtol=1e-4, atol=1e-5)


# One non-default value and one equal to the default preset's (or the optimizer's) default per option.
OPTION_VALUES = {
    "keep_sources": (["web"], "auto", None),
    "sketch_dim": (64, 2560),
    "normalize": ("adam_update", "adam", None),
    "similarity": ("cosine", "l1"),
    "sketch_batch_size": (2, None),
    "sketch_block_bytes": (2**20, 32 * 2**20),
    "coreset_micro_batch_size": (2,),
    "coreset_seed": (5, 0),
    "sketch": ("projection", "auto", "exact"),
    "selection": ("gradient_matching", "loss"),
    "target_curvature": (0.5, 0.0),
    "target_refresh": (3, 1),
    "target_per_source": (True, False),
    "coreset_temperature": (2.0, 1.0),
    "suspect_report": ("avoided", "confident"),
}


@pytest.mark.parametrize("preset", ["default", "colm"])
@pytest.mark.parametrize("name", list(OPTION_VALUES))
def test_every_given_option_reaches_the_optimizer_config(tmp_path, preset, name):
    """An option given to the Trainer arguments always wins over the preset, even when it equals a
    default (keep_sources=None and normalize='adam' under colm were once dropped)."""
    from coreset_optim.integrations.transformers import OPTION_NAMES

    option = OPTION_NAMES[name]
    for value in OPTION_VALUES[name]:
        extra = {}
        if name.startswith("target_"):  # target options need selection="target" (and, under colm, its sketch)
            extra = {"selection": "target", "normalize": "adam", "sketch": "exact"}
        if name == "similarity":  # facility location's option
            extra = {"selection": "facility_location"}
        if name == "suspect_report":  # the default method's option (colm's method is facility location)
            extra = {"selection": "anchored_consensus"}
        given = settings(*make_args(tmp_path, coreset_preset=preset, **{name: value, **extra}).coreset_options())
        assert given[option] == value, (name, value, given[option])
        model = lora(tiny_llama())
        opt = CoresetOptimizer(
            torch.optim.AdamW(model.parameters()),
            model,
            **make_args(tmp_path, coreset_preset=preset, **{name: value, **extra}).coreset_kwargs(),
        )
        assert settings(opt.config, opt.selection)[option] == value


def test_options_not_given_take_the_optimizer_defaults(tmp_path):
    """Arguments with no coreset option give the same options as CoresetOptimizer(coreset_size=4)."""
    model = lora(tiny_llama())
    plain = CoresetOptimizer(torch.optim.AdamW(model.parameters()), model, coreset_size=4)
    assert settings(*make_args(tmp_path).coreset_options()) == settings(plain.config, plain.selection)
    colm = CoresetOptimizer(torch.optim.AdamW(model.parameters()), model, coreset_size=4, preset="colm")
    assert settings(*make_args(tmp_path, coreset_preset="colm").coreset_options()) == settings(
        colm.config, colm.selection
    )


@pytest.mark.parametrize("selection", ["anchored_consensus", "consensus_loss", "trimmed_loss"])
def test_suspects_file_counts_each_ids_flags_per_logging_window(tmp_path, selection):
    """The file has one line per logging window: its suspects are each id's count of flags in it,
    and its suspect_share each source's flagged share, both recomputed from the recorded coresets;
    the logs carry the same shares; the id column never reaches the model."""
    import json
    from collections import Counter

    dataset = make_dataset()
    for i, row in enumerate(dataset.rows):
        row["row_id"] = f"row{i}"
        if i % 5 == 0:  # scramble the labels of some rows so that some get flagged
            row["labels"] = [(t * 7 + 3) % 50 if t != -100 else t for t in row["labels"]]
    path = tmp_path / "suspects.jsonl"
    args = make_args(
        tmp_path,
        max_steps=4,
        logging_steps=2,
        selection=selection,
        source_column="source",
        id_column="row_id",
        suspects_file=str(path),
    )
    recorder = selection_recorder()
    trainer = CoresetTrainer(model=lora(tiny_llama()), args=args, train_dataset=dataset, callbacks=[recorder])
    trainer.train()
    step_ids = [batch["row_id"] for batch in recorder.seen]  # on_selection's inputs keep the id column
    step_suspects = [c.suspects.tolist() for c in recorder.coresets]
    step_sources = [batch["source"] for batch in recorder.seen]
    lines = {json.loads(line)["step"]: json.loads(line) for line in path.read_text().splitlines()}
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    for w in range(2):
        want, flagged, seen = Counter(), Counter(), Counter()
        window = slice(2 * w, 2 * w + 2)
        for ids, flags, sources in zip(step_ids[window], step_suspects[window], step_sources[window]):
            want.update(i for i, f in zip(ids, flags) if f)
            flagged.update(s for s, f in zip(sources, flags) if f)
            seen.update(sources)
        line = lines[2 * (w + 1)]
        assert dict(map(tuple, line["suspects"])) == dict(want)
        shares = {str(s): flagged[s] / seen[s] for s in seen}
        assert line["suspect_share"] == pytest.approx(shares)
        got = {
            k.removeprefix("coreset/suspect_share/"): v for k, v in logged[2 * (w + 1)].items() if "suspect_share" in k
        }
        assert got == pytest.approx(shares)
        assert all(isinstance(v, (int, float)) for v in logged[2 * (w + 1)].values())
    assert any(any(flags) for flags in step_suspects)  # the checks above compared something


def test_suspects_file_needs_an_id_column(tmp_path):
    with pytest.raises(ValueError, match="id_column"):
        make_args(tmp_path, suspects_file=str(tmp_path / "s.jsonl"))
    with pytest.raises(ValueError, match="id_column='nope' is not a column"):
        CoresetTrainer(
            model=lora(tiny_llama()), args=make_args(tmp_path, id_column="nope"), train_dataset=make_dataset()
        )


def test_the_running_implausible_share_is_logged_and_written(tmp_path):
    """With a peft model the default reads the base model: the log and suspects_file carry its
    running share of implausible rows as it stood after the window's last selection; with
    coreset_reference=None there is no reference and nothing is logged."""
    import json

    dataset = make_dataset()
    for i, row in enumerate(dataset.rows):
        row["row_id"] = i
    path = tmp_path / "suspects.jsonl"
    shares = []

    class ShareRecorder(CoresetCallback):
        def on_selection(self, args, state, control, **kwargs):
            shares.append(trainer.coreset_optimizer.selection.implausible_share)

    args = make_args(
        tmp_path,
        max_steps=4,
        logging_steps=2,
        source_column="source",
        id_column="row_id",
        suspects_file=str(path),
        noise_gate=0.0,  # the gate open from the first step
    )
    trainer = CoresetTrainer(model=lora(tiny_llama()), args=args, train_dataset=dataset, callbacks=[ShareRecorder()])
    trainer.train()
    assert trainer.coreset_optimizer.selection.noise_gate == 0.0 and trainer.coreset_optimizer.selection.gate_open
    logged = {h["step"]: h for h in trainer.state.log_history if "loss" in h}
    lines = {json.loads(line)["step"]: json.loads(line) for line in path.read_text().splitlines()}
    for step in (2, 4):
        assert logged[step]["coreset/implausible_share"] == pytest.approx(shares[step - 1])
        assert lines[step]["implausible_share"] == pytest.approx(shares[step - 1])
    assert len(set(shares)) > 1 and all(0 <= s <= 1 for s in shares)

    args = make_args(tmp_path / "off", max_steps=2, logging_steps=2, source_column="source", coreset_reference=None)
    trainer = CoresetTrainer(model=lora(tiny_llama()), args=args, train_dataset=make_dataset())
    trainer.train()
    assert trainer.coreset_optimizer.selection.reference is None
    assert all("coreset/implausible_share" not in h for h in trainer.state.log_history)
