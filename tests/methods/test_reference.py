"""The anchored default's reference from outside the batch: the base model's losses (peft adapters
off) against peft's own ``disable_adapter()``, the running share and its gate against loops, and the
choice with the gate open against the rule written out."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

from _integrations_models import lora, one_thread, pattern_batch, tiny_llama  # noqa: E402,F401
from coreset_optim import AnchoredConsensus, ChooseContext, CoresetOptimizer  # noqa: E402
from coreset_optim.integrations.causal_lm import causal_lm_loss_fn  # noqa: E402
from coreset_optim.integrations.peft import adapters_off  # noqa: E402
from coreset_optim.methods.anchored import (  # noqa: E402
    anchored_suspects,
    confident_suspects,
    contested_rows,
    high_loss_component,
    implausible_rows,
    small_half_agreement,
)
from coreset_optim.methods.reference import reference_losses, running_share  # noqa: E402
from coreset_optim.records import Sketches  # noqa: E402
from coreset_optim.sketch.capture import BatchPass  # noqa: E402
from coreset_optim.sketch.compress import rows_per_source  # noqa: E402
from coreset_optim.methods.suspects import hardest_first  # noqa: E402


def _batch_pass(model, batch, chunk=3):
    return BatchPass(model, [], batch, causal_lm_loss_fn(model), batch["input_ids"].shape[0], chunk)


def test_reference_losses_are_the_base_models_and_everything_is_restored():
    model = lora(tiny_llama())
    first_a = next(p for n, p in model.named_parameters() if "lora_A" in n)
    first_a.requires_grad_(False)  # a weight the user froze stays frozen
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    batch = pattern_batch(7)
    got = reference_losses(_batch_pass(model, batch))
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    loss_fn = causal_lm_loss_fn(model)
    model.eval()
    with torch.no_grad():
        adapted = loss_fn(batch)
        with model.disable_adapter():  # peft's own switch: the reference's reference
            want = loss_fn(batch)
    torch.testing.assert_close(got, want)
    assert not torch.allclose(adapted, want)  # the adapters were on, and switched off


def test_no_reference_without_adapters_to_switch_off():
    plain = tiny_llama()
    assert adapters_off(plain) is None
    assert reference_losses(_batch_pass(plain, pattern_batch(4))) is None
    merged = lora(tiny_llama())
    merged.merge_adapter()  # the base weights now hold the adapters: no base to compare with
    assert adapters_off(merged) is None


@pytest.mark.parametrize("seed", range(4))
def test_implausible_rows_match_a_loop_over_sources(seed):
    g = torch.Generator().manual_seed(seed)
    n = 30
    reference = torch.rand(n, generator=g) ** 3
    codes = torch.randint(0, 4, (n,), generator=g)
    codes[:3] = 3  # source 3 has few rows: never judged
    codes[3:] = torch.where(codes[3:] == 3, 0, codes[3:])
    reference[codes == 1] += torch.where(torch.rand(int((codes == 1).sum()), generator=g) < 0.3, 4.0, 0.0)
    valid = torch.rand(n, generator=g) > 0.1
    want = torch.zeros(n, dtype=torch.bool)
    for s in range(4):
        rows = [i for i in range(n) if codes[i] == s and valid[i]]
        if len(rows) >= 4:
            flags = high_loss_component(reference[rows])
            for i, f in zip(rows, flags.tolist()):
                want[i] = f
    _, rows = rows_per_source(valid, codes, 4)
    assert torch.equal(implausible_rows(reference, rows), want)
    assert not implausible_rows(reference, rows)[codes == 3].any()


def test_running_share_is_an_exponential_average():
    assert running_share(None, 0.3, 0.9) == 0.3
    assert running_share(0.3, 0.5, 0.9) == pytest.approx(0.9 * 0.3 + 0.1 * 0.5)
    assert running_share(0.3, 0.5, 0.0) == 0.5


def _sketches(losses, reference, valid=None):
    n = losses.numel()
    return Sketches(
        torch.zeros(n, 2), losses, torch.ones(n, dtype=torch.bool) if valid is None else valid, None, reference
    )


def test_observe_keeps_the_running_share_and_opens_the_gate():
    """Two sources of 8 rows (one with 3 rows the reference finds far off) and one of 2 (not judged):
    the share counts the judged rows only; the gate opens once the average reaches noise_gate."""
    codes = torch.tensor([0] * 8 + [1] * 8 + [2] * 2)
    quiet = torch.full((8,), 0.1)  # no spread, no split
    off = torch.cat([torch.full((5,), 0.1), torch.tensor([5.0, 5.1, 5.2])])
    reference = torch.cat([quiet, off, torch.tensor([9.0, 0.1])])
    method = AnchoredConsensus(gate_statistic="implausible", noise_gate=0.15, gate_decay=0.5)
    assert method.implausible_share is None and not method.gate_open
    method.observe(_sketches(torch.ones(18), reference), codes, 3)
    assert method.implausible_share == pytest.approx(3 / 16)
    assert method.gate_open
    method.observe(_sketches(torch.ones(18), torch.cat([quiet, quiet, torch.tensor([0.1, 0.1])])), codes, 3)
    assert method.implausible_share == pytest.approx(0.5 * 3 / 16)  # 0.094 < 0.15: shut again
    assert not method.gate_open
    method.observe(_sketches(torch.ones(18), None), codes, 3)  # no reference: nothing changes
    assert method.implausible_share == pytest.approx(0.5 * 3 / 16)
    restored = AnchoredConsensus()
    restored.load_state_dict(method.state_dict())
    assert restored.implausible_share == method.implausible_share


@pytest.mark.parametrize("seed", range(3))
def test_contested_rows_and_the_default_gate_match_a_loop(seed):
    """The default's gate counts the rows both signals call wrong: in their source's high component
    of reference losses, and with a negative cosine against the small-loss half's anchor."""
    g = torch.Generator().manual_seed(seed)
    n = 24
    codes = torch.tensor([0] * 10 + [1] * 11 + [2] * 3)
    x = torch.randn(n, 4, generator=g)
    losses = torch.rand(n, generator=g)
    reference = torch.where(torch.rand(n, generator=g) < 0.4, 6.0, 0.2) + 0.1 * torch.rand(n, generator=g)
    valid = torch.ones(n, dtype=torch.bool)
    sketches = Sketches(x, losses, valid, None, reference)
    want = torch.zeros(n, dtype=torch.bool)
    for s in range(3):
        rows = [i for i in range(n) if codes[i] == s]
        if len(rows) < 4:
            continue
        _, cosine = small_half_agreement(x[rows].double(), losses[rows])
        both = high_loss_component(reference[rows]) & (cosine < 0)
        for i, f in zip(rows, both.tolist()):
            want[i] = f
    _, rows = rows_per_source(valid, codes, 3)
    assert torch.equal(contested_rows(sketches, codes, 3, rows, 2560, 2.0), want)
    method = AnchoredConsensus()
    assert method.gate_statistic == "contested" and method.noise_gate == 0.18
    method.observe(sketches, codes, 3)
    assert method.implausible_share == pytest.approx(float(want.sum()) / 21)
    assert AnchoredConsensus(gate_statistic="implausible").noise_gate == 0.40


def _context(losses, reference):
    return ChooseContext(torch.arange(losses.numel()), losses, None, losses.numel(), None, reference)


def test_with_the_gate_open_the_choice_also_avoids_the_reference_high_component():
    """Easy and hard rows pull along +x; the three hardest rows also pull along +x (the in-batch rule
    keeps them) but the base finds them far off: with the gate open they go last."""
    easy = [[1.0, 0.1], [1.0, -0.1], [1.0, 0.2], [1.0, -0.2], [1.0, 0.05], [1.0, -0.05]]
    hard = [[2.0, 0.3], [2.0, -0.3], [2.0, 0.1]]
    far = [[2.0, 0.0], [2.2, 0.0], [2.1, 0.0]]  # along the small-loss half's anchor
    x = torch.tensor(easy + hard + far)
    losses = torch.tensor([0.1, 0.2, 0.15, 0.05, 0.3, 0.25, 1.2, 1.5, 1.1, 2.0, 2.2, 2.1])
    reference = torch.tensor([0.1, 0.2, 0.1, 0.1, 0.3, 0.2, 0.9, 1.0, 0.8, 6.0, 6.5, 6.2])
    in_batch = anchored_suspects(x, losses)
    assert not in_batch[9:].any()  # the in-batch rule alone would take them first
    shut = AnchoredConsensus(noise_gate=1.0)
    shut.implausible_share = 0.5
    chosen, _ = shut.choose(x, 4, _context(losses, reference))
    assert chosen.tolist() == hardest_first(losses, 4, in_batch).tolist()
    assert {9, 10, 11} <= set(chosen.tolist())
    opened = AnchoredConsensus(noise_gate=0.2)
    opened.implausible_share = 0.5
    assert torch.nonzero(high_loss_component(reference)).flatten().tolist() == [9, 10, 11]
    chosen, _ = opened.choose(x, 4, _context(losses, reference))
    assert chosen.tolist() == hardest_first(losses, 4, in_batch | high_loss_component(reference)).tolist()
    assert not {9, 10, 11} & set(chosen.tolist())


def _peft_setup(seed=0, **options):
    model = lora(tiny_llama(seed=seed))
    inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    return model, inner, CoresetOptimizer(inner, model, coreset_size=4, **options)


def test_select_reads_the_base_and_keeps_the_choice_while_the_gate_is_shut():
    batch = pattern_batch(12, seed=1)
    sources = ["a"] * 8 + ["b"] * 4
    states = {}
    for name, options in {"auto": {}, "none": {"reference": None}}.items():
        model, inner, opt = _peft_setup(gate_statistic="implausible", noise_gate=1.0, **options)
        coreset = opt.select(batch, causal_lm_loss_fn(model), sources=sources)
        states[name] = (coreset.indices.tolist(), opt.selection.implausible_share, model)
    assert states["auto"][0] == states["none"][0]  # the gate is shut: the same choice
    assert states["none"][1] is None
    model = states["auto"][2]
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        base = causal_lm_loss_fn(model)(batch)
    codes = torch.tensor([0] * 8 + [1] * 4)
    _, rows = rows_per_source(torch.ones(12, dtype=torch.bool), codes, 2)
    want = float(implausible_rows(base, rows).sum()) / 12
    assert states["auto"][1] == pytest.approx(want, abs=1e-6)


def test_reference_base_on_a_model_without_adapters_is_refused_and_changes_nothing():
    model = tiny_llama()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    opt = CoresetOptimizer(inner, model, coreset_size=4, reference="base")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="reference='base'"):
        opt.select(pattern_batch(8), causal_lm_loss_fn(model))
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters()) and not inner.state
    assert opt.num_selections == 0


@pytest.mark.parametrize(
    "option, bad",
    [
        ("reference", "lagged"),
        ("reference", True),
        ("noise_gate", 1.5),
        ("noise_gate", -0.1),
        ("noise_gate", float("nan")),
        ("noise_gate", "0.4"),
        ("noise_gate", True),
        ("gate_decay", 2.0),
        ("gate_decay", None),
        ("reference_every", 0),
        ("reference_every", 2.0),
        ("gate_statistic", "loss"),
    ],
)
def test_reference_options_are_checked(option, bad):
    with pytest.raises(ValueError, match=option):
        AnchoredConsensus(**{option: bad})


def test_a_bad_checkpoint_state_is_refused():
    method = AnchoredConsensus()
    with pytest.raises(ValueError, match="implausible_share"):
        method.load_state_dict({"cache": 1})
    with pytest.raises(TypeError, match="implausible_share"):
        method.load_state_dict({"implausible_share": "0.3"})
    assert method.implausible_share is None
    assert math.isclose(AnchoredConsensus(noise_gate=0).noise_gate, 0.0)


@pytest.mark.parametrize("report", ["confident", "avoided"])
def test_while_the_gate_is_open_the_report_adds_the_implausible_rows(report):
    """The suspects of two sources: the in-batch report alone while the gate is shut; with it open,
    also each source's high component of reference losses (what the choice avoided besides)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(20, 3, generator=g)
    losses = torch.rand(20, generator=g)
    reference = torch.where(torch.arange(20) % 5 == 0, 8.0, 0.1) + 0.01 * torch.rand(20, generator=g)
    codes = torch.tensor([0, 1] * 10)
    valid = torch.ones(20, dtype=torch.bool)
    method = AnchoredConsensus(suspect_report=report, noise_gate=0.3)
    in_batch = torch.zeros(20, dtype=torch.bool)
    for s in range(2):
        rows = [i for i in range(20) if codes[i] == s]
        rule = (
            confident_suspects(x[rows], losses[rows])
            if report == "confident"
            else anchored_suspects(x[rows], losses[rows])
        )
        in_batch[rows] = rule
    method.implausible_share = 0.2  # shut
    assert torch.equal(method.suspects(x, losses, valid, codes, 2, reference), in_batch)
    method.implausible_share = 0.5  # open
    far = torch.arange(20) % 5 == 0
    assert torch.equal(method.suspects(x, losses, valid, codes, 2, reference), in_batch | far)
    assert torch.equal(method.suspects(x, losses, valid, codes, 2, None), in_batch)  # no reference


@pytest.mark.parametrize("gate, want", [(1.0, [0, 3]), (0.0, [0, 1, 2, 3])])
def test_while_the_gate_is_shut_the_reference_runs_every_reference_every_selections(monkeypatch, gate, want):
    import coreset_optim.methods.anchored as anchored

    passes, counter = [], {"n": 0}
    real = anchored.reference_losses

    def counted(batch_pass, *args):
        passes.append(counter["n"])
        return real(batch_pass, *args)

    monkeypatch.setattr(anchored, "reference_losses", counted)
    model, inner, opt = _peft_setup(noise_gate=gate, reference_every=3)
    loss_fn = causal_lm_loss_fn(model)
    for step in range(4):
        counter["n"] = step
        opt.zero_grad()
        opt.select(pattern_batch(12, seed=step), loss_fn, sources=["a"] * 8 + ["b"] * 4)
        opt.step()
    assert passes == want
    assert opt.selection.gate_open == (gate == 0.0)
