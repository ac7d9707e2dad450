"""bitsandbytes 8-bit optimizers and QLoRA under CoresetOptimizer, in plain training loops."""

from __future__ import annotations

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("peft")
pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from _integrations_models import lora, one_thread, pattern_batch, tiny_llama  # noqa: E402,F401

from coreset_optim import CoresetOptimizer  # noqa: E402
from coreset_optim.integrations.causal_lm import causal_lm_loss_fn, causal_lm_per_example_loss  # noqa: E402
from coreset_optim.integrations.peft import lora_sketch_modules  # noqa: E402
from coreset_optim.precondition.normalize import normalize_sketches  # noqa: E402
from coreset_optim.sketch.capture import exact_sketches  # noqa: E402

OPTIMIZERS = {
    "Adam8bit": lambda ps: bnb.optim.Adam8bit(ps, lr=1e-2, min_8bit_size=0),
    "AdamW8bit": lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-2, min_8bit_size=0),
    "PagedAdamW8bit": lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=1e-2, min_8bit_size=0),
    "PagedAdamW32bit": lambda ps: bnb.optim.PagedAdamW32bit(ps, lr=1e-2, min_8bit_size=0),
    "AdamW(optim_bits=8)": lambda ps: bnb.optim.AdamW(ps, lr=1e-2, optim_bits=8, min_8bit_size=0),
}


def _mean_loss(model, seed=7):
    # Training mode on purpose (these models have no dropout): an eval-mode no-grad forward makes
    # bitsandbytes repack 4-bit weights on CPU, after which no gradient flows through them.
    batch = pattern_batch(32, seed=seed, pad_last=2)
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return causal_lm_per_example_loss(out, batch["labels"]).mean().item()


def _train(model, opt, steps, batch_size=16):
    """``steps`` selections and optimizer steps; the last step's gradients stay in ``.grad``."""
    loss_fn = causal_lm_loss_fn(model)
    for step in range(steps):
        opt.zero_grad()
        opt.select(pattern_batch(batch_size, seed=opt.num_steps, pad_last=2), loss_fn)
        opt.step()


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_normalization_reads_bnb_state(name):
    model = lora(tiny_llama())
    params = [p for p in model.parameters() if p.requires_grad]
    names = lora_sketch_modules(model, modules=["q_proj", "v_proj"], layers=[-1], factors=("A", "B"))
    opt = CoresetOptimizer(OPTIMIZERS[name](params), model, coreset_size=4, sketch_modules=names)
    _train(model, opt, 3)
    eight_bit = "32bit" not in name
    targets = opt.sketch_layers
    batch = pattern_batch(8, seed=99)
    raw, _ = exact_sketches(model, targets, batch, causal_lm_loss_fn(model), 8, None)
    sketch_params = [p for t in targets for p in t.params]
    got = normalize_sketches(raw, opt.optimizer, sketch_params, "adam")
    # reference: bitsandbytes' own dequantization of the live state, Adam's denominator
    group = opt.param_groups[0]
    beta2, eps = group["betas"][1], group["eps"]
    blocks, start = [], 0
    for p in sketch_params:
        state = opt.optimizer.state[p]
        assert state["state2"].dtype == (torch.uint8 if eight_bit else torch.float32)
        assert state["step"] == 3
        if eight_bit:
            block = p.numel() // state["absmax2"].numel() if p.numel() % state["absmax2"].numel() == 0 else None
            block = block or -(-p.numel() // state["absmax2"].numel())
            blocksize = 1 << (block - 1).bit_length()
            v = bnb.functional.dequantize_blockwise(
                state["state2"], absmax=state["absmax2"], code=state["qmap2"], blocksize=blocksize
            )
        else:
            v = state["state2"]
        v_hat = v.float().flatten() / (1 - beta2**3)
        blocks.append(raw[:, start : start + p.numel()] / (v_hat.sqrt() + eps))
        start += p.numel()
    torch.testing.assert_close(got, torch.cat(blocks, 1), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got, raw)


@pytest.mark.parametrize("name", ["AdamW8bit", "PagedAdamW8bit"])
def test_lora_with_8bit_adam_trains(name):
    model = lora(tiny_llama())
    before = _mean_loss(model)
    opt = CoresetOptimizer(
        OPTIMIZERS[name]([p for p in model.parameters() if p.requires_grad]), model, coreset_ratio=0.25
    )
    _train(model, opt, 12)
    assert _mean_loss(model) < before - 0.1


def _qlora_model(tmp_path):
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path / "base")
    try:
        base = LlamaForCausalLM.from_pretrained(
            tmp_path / "base",
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
            device_map="cpu",
        )
    except Exception as exc:  # noqa: BLE001 - builds without CPU 4-bit support
        pytest.skip(f"4-bit bitsandbytes layers are not available on CPU in this build: {exc}")
    assert isinstance(base.model.layers[0].self_attn.v_proj, bnb.nn.Linear4bit)
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=True)
    return lora(base).train()  # from_pretrained returns eval mode


def test_qlora_sketches_match_batch_size_one_loop(tmp_path):
    model = _qlora_model(tmp_path)
    assert model.base_model.model.is_activation_checkpointing
    opt = CoresetOptimizer(
        bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2, min_8bit_size=0),
        model,
        coreset_size=2,
    )
    batch = pattern_batch(5, seed=3, pad_last=4)
    loss_fn = causal_lm_loss_fn(model)
    sketches, _ = exact_sketches(model, opt.sketch_layers, batch, loss_fn, 5, None)
    weight = opt.sketch_layers[0].module.weight
    model.eval()
    ref = torch.stack(
        [
            torch.autograd.grad(loss_fn({k: v[i : i + 1] for k, v in batch.items()}).sum(), weight)[0].flatten()
            for i in range(5)
        ]
    )
    torch.testing.assert_close(sketches, ref, rtol=1e-4, atol=1e-6)


def test_qlora_trains_with_paged_adamw8bit(tmp_path):
    model = _qlora_model(tmp_path)
    before = _mean_loss(model)
    opt = CoresetOptimizer(
        bnb.optim.PagedAdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2, min_8bit_size=0),
        model,
        coreset_ratio=0.25,
    )
    assert [t.name for t in opt.sketch_layers] == ["base_model.model.model.layers.1.self_attn.v_proj.lora_B.default"]
    _train(model, opt, 1)
    # The sketch pass runs in eval mode with frozen inputs; it must not let bitsandbytes repack the
    # 4-bit weights (see integrations/training_features.py), or no gradient reaches block 0.
    assert not any(
        getattr(m.weight.quant_state, "packing_format_for_cpu", False)
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
    )
    assert all(
        p.grad is not None and torch.count_nonzero(p.grad) > 0 for n, p in model.named_parameters() if "lora_B" in n
    )
    _train(model, opt, 11)
    assert _mean_loss(model) < before - 0.1
    state = opt.optimizer.state[opt.sketch_layers[0].module.weight]
    assert state["state2"].dtype == torch.uint8 and state["step"] == 12


def test_qlora_through_the_trainer(tmp_path):
    from _integrations_models import make_args, make_dataset

    from coreset_optim.integrations.transformers import CoresetTrainer

    model = _qlora_model(tmp_path)
    before = _mean_loss(model)
    first_block = {n: p.detach().clone() for n, p in model.named_parameters() if "layers.0" in n and "lora_" in n}
    args = make_args(tmp_path, optim="paged_adamw_8bit", gradient_checkpointing=True, max_steps=8, logging_steps=4)
    trainer = CoresetTrainer(model=model, args=args, train_dataset=make_dataset(sources=None))
    trainer.train()
    assert _mean_loss(model) < before - 0.05
    params = dict(model.named_parameters())
    assert all(not torch.equal(params[n], p) for n, p in first_block.items())  # block 0 learned too
    assert all(h["coreset/selected"] == 16 for h in trainer.state.log_history if "loss" in h)
