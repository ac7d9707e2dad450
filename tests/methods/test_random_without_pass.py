"""``selection="random"`` makes no pass over the large batch (``reads_losses = False``).

References: the old pipeline (the same method with the loss pass, ``RandomWithPass`` below), a
draw computed here by hand from the optimizer's generator, and a weighted backward written out
example by example (``core_utils.weighted_grad_reference``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import ClassVar

import pytest
import torch

from coreset_optim import CoresetOptimizer
from coreset_optim.methods.baselines import RandomSubset
from core_utils import Snapshot, TwoLayer, build, make_batch, regression_loss, take_steps, weighted_grad_reference

SOURCES = ["a"] * 9 + ["b"] * 5 + ["c"] * 2  # a large, a middle and a small source (16 rows)


@dataclasses.dataclass(kw_only=True)
class RandomWithPass(RandomSubset):
    """The behaviour before: the same draws after a no-grad loss pass over the whole batch."""

    name: ClassVar[str] = "random_with_pass_test"
    reads_losses: ClassVar[bool] = True


def rows_seen(model: torch.nn.Module) -> list[int]:
    """The number of examples of every forward of ``model`` from now on."""
    seen: list[int] = []
    model.register_forward_hook(lambda module, args, out: seen.append(int(args[0].shape[0])))
    return seen


def run(method, steps: int = 3, **options) -> list[dict]:
    """``steps`` selections and AdamW steps of a seeded TwoLayer on 16-row batches; per step what
    select() chose, the gradient it left, the parameters after the step and the rows forwarded."""
    torch.manual_seed(0)
    model = TwoLayer(5, 6, 3)
    opt = CoresetOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2), model, seed=3, selection=method, **options)
    seen = rows_seen(model)
    out = []
    for step in range(steps):
        opt.zero_grad()
        del seen[:]
        cs = opt.select(make_batch(16, seed=step), regression_loss(model), sources=SOURCES)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        out.append(dict(coreset=cs, grads=grads, params=params, seen=list(seen)))
    return out


OPTIONS = {
    "stratified, small source kept": dict(coreset_size=6),
    "micro-batches": dict(coreset_size=6, micro_batch_size=2),
    "no source kept, budget below the sources": dict(coreset_size=2, keep_sources=None),
    "temperature": dict(coreset_size=6, temperature=2.0),
    "ratio": dict(coreset_ratio=0.3),
    "take all": dict(coreset_size=16),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_same_coresets_and_updates_as_the_pass(name):
    """Same indices and weights (exactly), same gradients and parameters as the old pipeline; the
    old one forwards B rows more per step (the pass), the new one only the coreset's."""
    new, old = run(RandomSubset(), **OPTIONS[name]), run(RandomWithPass(), **OPTIONS[name])
    for step, (n, o) in enumerate(zip(new, old)):
        torch.testing.assert_close(n["coreset"].indices, o["coreset"].indices, rtol=0, atol=0)
        torch.testing.assert_close(n["coreset"].weights, o["coreset"].weights, rtol=0, atol=0)
        assert n["coreset"].source_counts == o["coreset"].source_counts
        assert n["coreset"].num_valid == o["coreset"].num_valid == 16
        torch.testing.assert_close(n["coreset"].loss, o["coreset"].loss)
        for key in ("grads", "params"):
            for p, value in o[key].items():
                torch.testing.assert_close(n[key][p], value, msg=f"step {step}: {key} {p}")
        k = len(n["coreset"])
        assert sum(n["seen"]) == k, n["seen"]
        assert sum(o["seen"]) == 16 + k


def test_draws_are_the_generators_per_source():
    """Written out: "c" (2 rows, share below one) kept whole; the other 4 split 9:5 as 3 and 1; the
    generator draws a's rows, then b's; weights n_s / k_s."""
    (step,) = run(RandomSubset(), steps=1, coreset_size=6)
    g = torch.Generator().manual_seed(3)
    a = torch.randperm(9, generator=g)[:3]
    b = 9 + torch.randperm(5, generator=g)[:1]
    expected = torch.cat([a, b, torch.tensor([14, 15])])
    order = expected.argsort()
    cs = step["coreset"]
    torch.testing.assert_close(cs.indices, expected[order], rtol=0, atol=0)
    torch.testing.assert_close(cs.weights, torch.tensor([3.0] * 3 + [5.0] + [1.0] * 2)[order], rtol=0, atol=0)
    assert step["seen"] == [6]


def test_update_is_the_weighted_backward_of_the_drawn_rows():
    """The gradient is ``sum_j w_j grad(loss_j) / B`` and AdamW's step on it is the parameter update."""
    model, opt, wrapper = build(coreset_size=4, selection="random", micro_batch_size=3)
    take_steps(opt, model, 2)
    twin = TwoLayer(5, 4, 3)
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=opt.param_groups[0]["lr"])
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # no state tensor shared
    batch = make_batch(12, seed=7)
    opt.zero_grad()
    cs = wrapper.select(batch, regression_loss(model))
    assert len(cs) == 4
    torch.testing.assert_close(cs.weights, torch.full((4,), 3.0))
    ref = weighted_grad_reference(twin, batch, regression_loss(twin), cs.indices, cs.weights, 12)
    for (p, g), q in zip(ref.items(), model.parameters()):
        torch.testing.assert_close(q.grad, g)
        p.grad = g
    wrapper.step()
    twin_opt.step()
    for p, q in zip(twin.parameters(), model.parameters()):
        torch.testing.assert_close(q, p)


def test_what_the_coreset_says_without_a_pass():
    """No loss of the batch was computed: NaN losses, the coreset's loss as the batch's, every row
    valid, no suspects, no sketch stage; the other methods still report the pass's losses."""
    _, _, wrapper = build(coreset_size=3, selection="random")
    cs = wrapper.select(make_batch(9), regression_loss(wrapper.model), sources=["x"] * 5 + ["y"] * 4)
    assert not cs.losses_computed
    assert cs.losses.shape == (9,) and bool(torch.isnan(cs.losses).all())
    torch.testing.assert_close(cs.batch_loss, cs.loss)
    assert math.isfinite(float(cs.batch_loss))
    assert cs.num_valid == 9 and cs.num_invalid == 0
    assert cs.sketches.shape == (9, 0)
    assert cs.suspects is None and cs.suspect_shares() is None
    assert "sketch" not in cs.timings and cs.timings["backward"] > 0
    _, _, loss_method = build(coreset_size=3, selection="loss")
    seen = loss_method.select(make_batch(9), regression_loss(loss_method.model))
    assert seen.losses_computed and bool(torch.isfinite(seen.losses).all())
    torch.testing.assert_close(seen.batch_loss, seen.losses.mean())


def test_random_loss_estimates_the_batch_mean():
    """n / k weights: over many draws the coreset's loss (the logged batch loss) averages to the batch's mean."""
    model, _, wrapper = build(coreset_size=3, selection="random")
    batch = make_batch(12, seed=4)
    estimates = []
    for _ in range(600):
        wrapper.zero_grad()
        estimates.append(float(wrapper.select(batch, regression_loss(model)).batch_loss))
    with torch.no_grad():
        mean = float(regression_loss(model)(batch).mean())
    assert abs(sum(estimates) / len(estimates) - mean) < 0.03 * mean


def nan_batch(rows: list[int]) -> dict:
    batch = make_batch(12, seed=7)
    batch["x"][rows, 0] = float("nan")
    return batch


def test_a_drawn_nonfinite_example_is_left_out_with_a_warning():
    """Row 2's input is NaN, rows 6 and 7's targets inf; 11 of 12 drawn (all but 6 on this seed):
    2 and 7 are left out of the backward (one more forward of their micro-batch) and named; the
    gradient is the others' weighted backward. Row 6, not drawn, is never seen."""
    model, opt, wrapper = build(coreset_size=11, selection="random", micro_batch_size=4)
    take_steps(opt, model, 2)
    batch = nan_batch([2])
    batch["y"][[6, 7], 1] = float("inf")
    seen = rows_seen(model)
    opt.zero_grad()
    with pytest.warns(RuntimeWarning, match=r"left 2 of the 11 drawn examples \(batch rows \[2, 7\]\)"):
        cs = wrapper.select(batch, regression_loss(model))
    assert cs.indices.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11]
    assert cs.num_valid == 12 and cs.num_invalid == 0  # nothing was judged before the draw
    assert seen == [4, 3, 4, 3, 3]  # micro-batches of 4, 4, 3; the first two again without their bad row
    good = torch.tensor([i for i in cs.indices.tolist() if i not in (2, 7)])
    keep = torch.isin(cs.indices, good)
    ref = weighted_grad_reference(model, batch, regression_loss(model), good, cs.weights[keep], 12)
    for p, g in ref.items():
        assert bool(torch.isfinite(p.grad).all())
        torch.testing.assert_close(p.grad, g)
    assert math.isfinite(float(cs.loss))


def test_every_drawn_example_nonfinite_raises_and_changes_nothing():
    """As a batch with no finite example does with a pass: ValueError before any gradient changes."""
    model, opt, wrapper = build(coreset_size=3, selection="random")
    take_steps(opt, model, 2)
    wrapper.select(make_batch(8), regression_loss(model))  # .grad holds something already
    snap = Snapshot(model, opt)
    batch = nan_batch(list(range(12)))
    with pytest.raises(ValueError, match="non-finite loss"):
        wrapper.select(batch, regression_loss(model))
    snap.assert_unchanged()
    assert wrapper.num_selections == 1


def test_bad_input_still_raises_clearly():
    model, _, wrapper = build(coreset_size=3, selection="random")
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        wrapper.select(make_batch(8), None)
    with pytest.raises(ValueError, match="one loss per example"):
        wrapper.select(make_batch(8), lambda b: regression_loss(model)(b).mean())
    with pytest.raises(ValueError, match="sources"):
        wrapper.select(make_batch(8), regression_loss(model), sources=["a"] * 7)
    with pytest.raises(TypeError, match="floating-point"):
        wrapper.select(make_batch(8), lambda b: regression_loss(model)(b).long())


def test_trainer_logs_the_coresets_loss_and_forwards_only_k(tmp_path):
    """CoresetTrainer with selection="random": every forward sees the coreset's 4 rows (never the
    micro-batch of 16), the logged "loss" is the window's mean coreset loss (no batch loss exists),
    and no sketch stage, suspect or invalid example is logged."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    from _integrations_models import lora, make_args, make_dataset, selection_recorder, tiny_llama

    from coreset_optim.integrations.transformers import CoresetTrainer

    model = lora(tiny_llama())
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, args, out: seen.append(int(args[0].shape[0])))
    args = make_args(tmp_path, max_steps=4, logging_steps=2, selection="random", source_column="source")
    recorder = selection_recorder()
    trainer = CoresetTrainer(model=model, args=args, train_dataset=make_dataset(), callbacks=[recorder])
    trainer.train()
    assert seen == [4] * 4
    assert all(not c.losses_computed and bool(torch.isnan(c.losses).all()) for c in recorder.coresets)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for w, log in enumerate(logs):
        window = [float(c.loss) for c in recorder.coresets[2 * w : 2 * w + 2]]
        assert log["loss"] == pytest.approx(sum(window) / 2, rel=1e-4)
        assert log["coreset/loss"] == pytest.approx(sum(window) / 2, rel=1e-4)
        assert log["coreset/invalid"] == 0 and log["coreset/time_backward"] > 0
        assert not any(key.startswith(("coreset/time_sketch", "coreset/suspect")) for key in log)
