"""select() on a ``torch.compile``'d model: the same coreset, sketches and gradients as eager.

What compile changes for the sketch pass: the forward hooks that record each sketch layer's
``(input, output)`` run inside a compiled region. Traced into the graph, the recorded output of a
layer that is not the model's last (LoRA's ``v_proj`` LoRA-B, any hidden Linear) was an
intermediate of the graph, not the tensor the loss was computed from: its gradient came back
unused and the sketches were all zero, with no error (a different coreset than eager). The hook is
now ``torch.compiler.disable``'d, so the sketch pass's graphs break at the sketch layer; these
tests count those graph breaks (``torch._dynamo.utils.counters``) and compare against eager.

Tolerances: ``aot_eager`` runs the same aten kernels in the same order as eager (measured equal
to the last bit; asserted to 1e-6 relative); ``inductor`` generates fused C++ kernels whose float32
sums are ordered differently, so values differ by rounding (gradients ~1e-6 relative; sketches,
divided by Adam's sqrt(v) + eps, ~1e-5 of their largest entry): asserted to 1e-4 relative. The
coresets (indices) must be identical in both: the selection's margins on these seeds are far
larger than that rounding.

Fast tests use ``aot_eager`` (dynamo and AOT autograd, where hooks and graphs are decided); the
inductor and tiny-Llama runs take 10-60 s of compilation on a loaded 2-core CPU and are marked slow.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from core_utils import TwoLayer, make_batch, regression_loss

from coreset_optim import CoresetOptimizer

HOOK = "make_hook.<locals>.hook"  # the library's sketch hook, as graph-break reasons name it
TOLERANCE = {"eager": 0.0, "aot_eager": 1e-6, "inductor": 1e-4}


@pytest.fixture(autouse=True)
def _one_thread_fresh_dynamo():
    """One torch thread (a shared 2-core machine) and no compiled graph carried between tests."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()
    torch.set_num_threads(before)


def graph_breaks() -> dict[str, int]:
    return dict(torch._dynamo.utils.counters["graph_break"])


def frames_compiled() -> int:
    return torch._dynamo.utils.counters["frames"]["total"]


def run_two_layer(
    backend: str, steps: int = 3, train_only_sketch_layer: bool = False, wrap_compiled: bool = False, **options
) -> list[dict]:
    """``steps`` coreset steps of a seeded TwoLayer (16 examples of 6 tokens, k = 4), eager or
    compiled with ``backend``; per step what select() returned and the gradients it left.
    ``wrap_compiled``: the compiled module, not the model, is given to ``CoresetOptimizer``."""
    torch.manual_seed(0)
    model = TwoLayer(d_in=5, hidden=16, d_out=3)
    if train_only_sketch_layer:
        model.fc1.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    run = model if backend == "eager" else torch.compile(model, backend=backend)
    if wrap_compiled and "sketch_modules" in options:
        options["sketch_modules"] = "_orig_mod." + options["sketch_modules"]  # the compiled module's names
    wrapper = CoresetOptimizer(opt, run if wrap_compiled else model, coreset_size=4, **options)
    return steps_of(wrapper, model, regression_loss(run), lambda s: make_batch(16, 5, 3, tokens=6, seed=s), steps)


def steps_of(wrapper, model, loss_fn, batch_of, steps: int) -> list[dict]:
    out = []
    for step in range(steps):
        coreset = wrapper.select(batch_of(step), loss_fn)
        out.append(
            {
                "indices": coreset.indices.clone(),
                "weights": coreset.weights.clone(),
                "sketches": None if coreset.sketches is None else coreset.sketches.clone(),
                "losses": coreset.losses.clone(),
                "grads": {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                "frames": frames_compiled(),
            }
        )
        wrapper.step()
        wrapper.zero_grad(set_to_none=True)
    return out


def assert_same_steps(eager: list[dict], compiled: list[dict], backend: str) -> None:
    tol = TOLERANCE[backend]
    close = dict(rtol=tol, atol=tol)
    for step, (e, c) in enumerate(zip(eager, compiled)):
        assert torch.equal(e["indices"], c["indices"]), f"step {step}: another coreset"
        torch.testing.assert_close(c["weights"], e["weights"], **close)
        torch.testing.assert_close(c["losses"], e["losses"], equal_nan=True, **close)  # NaN: no pass ("random")
        assert e["grads"].keys() == c["grads"].keys()
        for name, g in e["grads"].items():
            scale = g.abs().max().item()
            torch.testing.assert_close(c["grads"][name], g, rtol=tol, atol=tol * scale, msg=f"step {step}: {name}")
        if e["sketches"] is None or e["sketches"].numel() == 0:
            assert c["sketches"] is None or c["sketches"].numel() == 0
            continue
        scale = e["sketches"].abs().max().item()
        assert scale > 0
        assert c["sketches"].abs().max().item() > 0, f"step {step}: all-zero sketches (hook output off the graph)"
        torch.testing.assert_close(c["sketches"], e["sketches"], rtol=tol, atol=tol * scale)


def test_a_plain_compiled_step_has_no_graph_break():
    """The reference point: the model itself compiles whole; any break below is the sketch hook's."""
    torch.manual_seed(0)
    model = TwoLayer(d_in=5, hidden=16, d_out=3)
    regression_loss(torch.compile(model, backend="aot_eager"))(make_batch(8, tokens=6)).mean().backward()
    assert graph_breaks() == {}
    assert frames_compiled() == 1


@pytest.mark.parametrize("sketch_layer", ["fc2", "fc1"])
def test_default_selection_is_eager_s(sketch_layer):
    """fc2 is the model's output (its hook output is the returned tensor: right even before the
    fix); fc1 is a hidden layer, where the sketches came back all zero before it."""
    eager = run_two_layer("eager", sketch_modules=sketch_layer)
    compiled = run_two_layer("aot_eager", sketch_modules=sketch_layer)
    assert_same_steps(eager, compiled, "aot_eager")
    breaks = graph_breaks()
    assert breaks and all(HOOK in reason for reason in breaks), breaks  # only the sketch hook breaks
    assert compiled[0]["frames"] == compiled[-1]["frames"], "recompiled after the first step"


def test_the_compiled_module_given_to_the_wrapper():
    """``CoresetOptimizer(opt, torch.compile(model))``: its layers are found under ``_orig_mod.``."""
    eager = run_two_layer("eager", sketch_modules="fc1")
    compiled = run_two_layer("aot_eager", wrap_compiled=True, sketch_modules="fc1")
    assert_same_steps(eager, compiled, "aot_eager")
    default_layer = run_two_layer("aot_eager", steps=1, wrap_compiled=True)
    assert_same_steps(run_two_layer("eager", steps=1), default_layer, "aot_eager")


def test_random_selection_is_eager_s_without_graph_breaks():
    """``"random"`` makes no pass over the batch (only the coreset's forward): no hook, no break."""
    eager = run_two_layer("eager", selection="random")
    compiled = run_two_layer("aot_eager", selection="random")
    assert_same_steps(eager, compiled, "aot_eager")
    assert graph_breaks() == {}
    assert compiled[0]["frames"] == compiled[-1]["frames"]


def test_only_the_sketch_layer_trained():
    """Every trained parameter is sketched: the sketch pass freezes nothing, so its graph and the
    coreset backward's differ only in the hook (a guard dynamo keeps: the number of hooks)."""
    eager = run_two_layer("eager", train_only_sketch_layer=True)
    compiled = run_two_layer("aot_eager", train_only_sketch_layer=True)
    assert_same_steps(eager, compiled, "aot_eager")


def first_a_compiled_plain_step(skip_hook_guards: bool):
    """A compiled forward/backward of k examples before the first select(), with only the sketch
    layer trained: the graph it compiles has no hook, and (dynamo's default) no guard on hooks."""
    torch.manual_seed(0)
    model = TwoLayer(d_in=5, hidden=16, d_out=3)
    model.fc1.requires_grad_(False)
    opt = torch.optim.AdamW(model.fc2.parameters(), lr=1e-2)
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=skip_hook_guards):
        loss_fn = regression_loss(torch.compile(model, backend="aot_eager"))
        loss_fn(make_batch(4, tokens=6, seed=9)).mean().backward()
        opt.zero_grad(set_to_none=True)
        wrapper = CoresetOptimizer(opt, model, coreset_size=4)
        return wrapper.select(make_batch(16, tokens=6), loss_fn)


def test_a_graph_compiled_without_hooks_is_refused_not_silent():
    """Dynamo's default (``skip_nnmodule_hook_guards=True``) reuses that graph for the sketch pass
    and the hooks do not run: select() raises (and says what to set), it never selects on nothing."""
    with pytest.raises(ValueError, match="skip_nnmodule_hook_guards"):
        first_a_compiled_plain_step(skip_hook_guards=True)
    torch._dynamo.reset()
    coreset = first_a_compiled_plain_step(skip_hook_guards=False)  # the way out the message names
    assert coreset.sketches.abs().max() > 0


def test_fullgraph_refuses_the_sketch_pass():
    """``fullgraph=True`` forbids the hook's graph break: an error, not zero sketches."""
    torch.manual_seed(0)
    model = TwoLayer(d_in=5, hidden=16, d_out=3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    wrapper = CoresetOptimizer(opt, model, coreset_size=4, sketch_modules="fc1")
    loss_fn = regression_loss(torch.compile(model, backend="aot_eager", fullgraph=True))
    with pytest.raises(Exception, match="disable"):
        wrapper.select(make_batch(16, tokens=6), loss_fn)


@pytest.mark.slow
def test_inductor_is_eager_s_within_rounding():
    eager = run_two_layer("eager", sketch_modules="fc1")
    compiled = run_two_layer("inductor", sketch_modules="fc1")
    assert_same_steps(eager, compiled, "inductor")
    assert all(HOOK in reason for reason in graph_breaks())


@pytest.mark.slow
@pytest.mark.parametrize("selection", [None, "random"])
def test_lora_llama_is_eager_s(selection):
    """A tiny LoRA Llama (q, v), the default sketch layer (the last v_proj's LoRA-B, a hidden
    layer), the library's causal-LM loss: every graph break is the sketch hook's (none with
    ``"random"``: the Llama forward itself compiles without one)."""
    from _integrations_models import lora, pattern_batch, tiny_llama

    from coreset_optim.integrations.causal_lm import causal_lm_loss_fn

    def run(backend):
        model = lora(tiny_llama(0, layers=2))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        compiled = model if backend == "eager" else torch.compile(model, backend=backend)
        options = {} if selection is None else {"selection": selection}
        wrapper = CoresetOptimizer(opt, model, coreset_size=4, **options)
        return steps_of(wrapper, model, causal_lm_loss_fn(compiled), lambda s: pattern_batch(16, 16, seed=s), 3)

    eager, compiled = run("eager"), run("aot_eager")
    assert_same_steps(eager, compiled, "aot_eager")
    breaks = graph_breaks()
    assert all(HOOK in reason for reason in breaks), breaks
    assert bool(breaks) == (selection is None)
    # no recompile once warm: the default's base-model pass (adapters off) compiles its variant of
    # the forward within the first two steps (measured: 61 frames after step 0, 62 from step 1 on)
    assert compiled[1]["frames"] == compiled[-1]["frames"]
