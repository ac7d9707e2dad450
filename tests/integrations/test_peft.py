"""PEFT LoRA: default sketch targets, the naming helper, DoRA, checkpointing, the causal-LM loss."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytest.importorskip("peft")
pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

from _integrations_models import lora, one_thread, pattern_batch, tiny_gpt2, tiny_llama  # noqa: E402,F401

from coreset_optim import CoresetOptimizer  # noqa: E402
from coreset_optim.integrations.causal_lm import causal_lm_loss_fn, causal_lm_per_example_loss  # noqa: E402
from coreset_optim.integrations.peft import lora_sketch_modules  # noqa: E402
from coreset_optim.sketch.capture import exact_sketches  # noqa: E402


def _wrap(model, **kwargs):
    params = [p for p in model.parameters() if p.requires_grad]
    return CoresetOptimizer(torch.optim.AdamW(params, lr=1e-3), model, coreset_size=2, **kwargs)


def test_imports_stay_lazy():
    code = (
        "import sys, coreset_optim, coreset_optim.sketch.capture\n"
        "import coreset_optim.integrations.peft, coreset_optim.integrations.causal_lm\n"
        "import coreset_optim.integrations.training_features\n"
        "print([m for m in ('peft', 'transformers', 'bitsandbytes', 'accelerate') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_lora_default_without_importing_the_integrations():
    """peft loaded after coreset_optim, coreset_optim.integrations never named: the LoRA default holds."""
    code = (
        "import sys, torch\n"
        "from coreset_optim import CoresetOptimizer\n"
        "assert 'peft' not in sys.modules and 'transformers' not in sys.modules\n"
        "from peft import LoraConfig, get_peft_model\n"
        "class Block(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.q_proj = torch.nn.Linear(4, 4); self.v_proj = torch.nn.Linear(4, 4)\n"
        "    def forward(self, x): return self.v_proj(self.q_proj(x))\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__(); self.layers = torch.nn.ModuleList([Block(), Block()])\n"
        "        self.head = torch.nn.Linear(4, 2)\n"
        "    def forward(self, x):\n"
        "        for b in self.layers: x = b(x)\n"
        "        return self.head(x)\n"
        "model = get_peft_model(Net(), LoraConfig(r=2, target_modules=['q_proj', 'v_proj']))\n"
        "params = [p for p in model.parameters() if p.requires_grad]\n"
        "opt = CoresetOptimizer(torch.optim.AdamW(params), model, coreset_size=2)\n"
        "print([t.name for t in opt.sketch_layers])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['base_model.model.layers.1.v_proj.lora_B.default']"


def test_default_target_is_last_v_proj_lora_b():
    model = lora(tiny_llama())
    opt = _wrap(model)
    assert [t.name for t in opt.sketch_layers] == ["base_model.model.model.layers.1.self_attn.v_proj.lora_B.default"]


def test_default_target_without_v_proj_is_last_lora_layer():
    model = lora(tiny_gpt2(), targets=("c_attn", "c_proj"))
    opt = _wrap(model)
    assert [t.name for t in opt.sketch_layers] == ["base_model.model.transformer.h.1.mlp.c_proj.lora_B.default"]


def test_default_covers_every_active_adapter_only():
    from peft import LoraConfig

    model = lora(tiny_llama())
    model.add_adapter("other", LoraConfig(r=2, target_modules=["v_proj"]))
    # peft activates one adapter at a time; the default follows the active one.
    model.set_adapter("other")
    opt = _wrap(model)
    assert [t.name for t in opt.sketch_layers] == ["base_model.model.model.layers.1.self_attn.v_proj.lora_B.other"]
    model.base_model.set_adapter(["default", "other"])
    for p in model.parameters():
        p.requires_grad_(False)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    opt = _wrap(model)
    assert [t.name for t in opt.sketch_layers] == [
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default",
        "base_model.model.model.layers.1.self_attn.v_proj.lora_B.other",
    ]


def test_lora_sketch_modules_helper():
    model = lora(tiny_llama())
    names = lora_sketch_modules(model, modules=["q_proj", "v_proj"], layers=[0, -1], factors=("A", "B"))
    assert len(names) == 8
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.default" in names
    opt = _wrap(model, sketch_modules=names)
    assert sorted(t.name for t in opt.sketch_layers) == sorted(names)
    assert lora_sketch_modules(model, modules=None, layers=None) == [
        f"base_model.model.model.layers.{i}.self_attn.{m}.lora_B.default" for i in (0, 1) for m in ("q_proj", "v_proj")
    ]
    with pytest.raises(ValueError, match="LoRA wraps .*q_proj.*v_proj"):
        lora_sketch_modules(model, modules=["k_proj"])
    with pytest.raises(ValueError, match="out of range"):
        lora_sketch_modules(model, layers=[5])
    with pytest.raises(ValueError, match="factors"):
        lora_sketch_modules(model, factors=("C",))
    with pytest.raises(ValueError, match="no peft LoRA layer"):
        lora_sketch_modules(tiny_llama())


def test_sketch_target_matching_no_lora_module_is_refused():
    model = lora(tiny_llama())
    with pytest.raises(ValueError, match="matches no module name"):
        _wrap(model, sketch_modules=["base_model.model.model.layers.1.self_attn.k_proj.lora_B.default"])
    # a frozen base layer is not trained: refused with its own message
    with pytest.raises(ValueError, match="not trained"):
        _wrap(model, sketch_modules=["base_model.model.model.layers.1.self_attn.v_proj.base_layer"])


def test_dora_is_refused():
    model = lora(tiny_llama(), use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        _wrap(model)


def _reference_lora_grads(model, batch, names):
    """Batch-size-1 loop: each example's gradient of the named LoRA weights (obviously right)."""
    modules = dict(model.named_modules())
    weights = [modules[n].weight for n in names]
    loss_fn = causal_lm_loss_fn(model)
    rows = []
    model.eval()
    for i in range(batch["input_ids"].shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(loss_fn(one).sum(), weights)
        rows.append(torch.cat([g.flatten() for g in grads]))
    model.train()
    return torch.stack(rows)


def test_lora_sketches_match_batch_size_one_loop():
    model = lora(tiny_llama())
    batch = pattern_batch(6, pad_last=3)
    names = lora_sketch_modules(model, modules=["q_proj", "v_proj"], layers=[-1], factors=("A", "B"))
    opt = _wrap(model, sketch_modules=names)
    sketches, _ = exact_sketches(model, opt.sketch_layers, batch, causal_lm_loss_fn(model), 6, 4)
    ref = _reference_lora_grads(model, batch, [t.name for t in opt.sketch_layers])
    torch.testing.assert_close(sketches, ref, rtol=1e-4, atol=1e-6)


def test_sketch_pass_with_gradient_checkpointing_and_input_require_grads():
    plain = lora(tiny_llama())
    base = tiny_llama()
    # what peft's prepare_model_for_kbit_training does for a quantized model
    base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    base.enable_input_require_grads()
    checked = lora(base)
    checked.load_state_dict(plain.state_dict())
    inner = checked.base_model.model
    assert inner.is_activation_checkpointing and inner._require_grads_hooks
    emb = inner.get_input_embeddings()
    hooks_before = list(emb._forward_hooks.items())
    flags_before = [
        (n, m.gradient_checkpointing) for n, m in checked.named_modules() if hasattr(m, "gradient_checkpointing")
    ]

    seen = []
    spy = emb.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    batch = pattern_batch(5)
    opt_plain, opt_checked = _wrap(plain), _wrap(checked)
    ref, _ = exact_sketches(plain, opt_plain.sketch_layers, batch, causal_lm_loss_fn(plain), 5, None)
    got, _ = exact_sketches(checked, opt_checked.sketch_layers, batch, causal_lm_loss_fn(checked), 5, None)
    spy.remove()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-7)
    assert seen == [False]  # the hook that forces requires_grad on the embeddings was off
    assert list(emb._forward_hooks.items()) == hooks_before
    assert [
        (n, m.gradient_checkpointing) for n, m in checked.named_modules() if hasattr(m, "gradient_checkpointing")
    ] == flags_before
    checked.train()
    out = emb(batch["input_ids"])
    assert out.requires_grad  # restored

    # a training step through the checkpointed model still works
    loss_fn = causal_lm_loss_fn(checked)
    coreset = opt_checked.select(batch, loss_fn)
    assert len(coreset) == 2
    assert all(p.grad is not None for n, p in checked.named_parameters() if "lora_" in n)


def test_causal_lm_per_example_loss_matches_hf_per_example():
    model = tiny_llama()
    batch = pattern_batch(4, pad_last=5)
    batch["labels"][1, 3:7] = -100
    batch["labels"][2, :] = -100
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    losses = causal_lm_per_example_loss(out, batch["labels"])
    assert losses.shape == (4,) and torch.isnan(losses[2])
    for i in (0, 1, 3):
        ref = model(
            input_ids=batch["input_ids"][i : i + 1],
            attention_mask=batch["attention_mask"][i : i + 1],
            labels=batch["labels"][i : i + 1],
        ).loss
        torch.testing.assert_close(losses[i], ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(causal_lm_per_example_loss(out.logits, batch["labels"]), losses, equal_nan=True)
    with pytest.raises(ValueError, match="labels must be"):
        causal_lm_per_example_loss(out, batch["labels"][:, :3])


def test_plain_model_keeps_the_core_default_when_peft_is_loaded():
    model = tiny_llama()
    opt = CoresetOptimizer(torch.optim.AdamW(model.parameters()), model, coreset_size=2)
    assert [t.name for t in opt.sketch_layers] == ["lm_head"]
