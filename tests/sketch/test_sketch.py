"""Hook-based per-example sketches == a loop of batch-size-1 backward passes."""

import math

import pytest
import torch
from torch import nn

from coreset_optim.sketch.capture import exact_sketches, linear_per_example_grads, resolve_sketch_modules
from core_utils import TwoLayer, make_batch, per_example_grads_loop, regression_loss


def _sketch(model, opt, spec, batch, loss_fn, n, chunk=None):
    targets = resolve_sketch_modules(model, opt, spec)
    return targets, *exact_sketches(model, targets, batch, loss_fn, n, chunk)


@pytest.mark.parametrize("train_bias", [True, False])
@pytest.mark.parametrize("module", ["fc2", "fc1"])
def test_plain_linear_matches_loop(train_bias, module):
    model = TwoLayer()
    params = [p for n, p in model.named_parameters() if train_bias or not n.endswith("bias")]
    opt = torch.optim.SGD(params, lr=0.1)
    batch, loss_fn = make_batch(7), regression_loss(model)
    targets, sketches, losses = _sketch(model, opt, module, batch, loss_fn, 7)
    layer = getattr(model, module)
    assert targets[0].with_bias == train_bias
    ref_params = [layer.weight] + ([layer.bias] if train_bias else [])
    ref = per_example_grads_loop(model, ref_params, batch, loss_fn, 7)
    assert sketches.shape == (7, layer.weight.numel() + (layer.bias.numel() if train_bias else 0))
    torch.testing.assert_close(sketches, ref)
    torch.testing.assert_close(losses, loss_fn(batch).detach())


class LoraLike(nn.Module):
    """A frozen base Linear plus a trained low-rank path x -> A -> B (scaled), like LoRA."""

    def __init__(self, d=6, r=2, out=4):
        super().__init__()
        self.base = nn.Linear(d, out)
        self.A = nn.Linear(d, r, bias=False)
        self.B = nn.Linear(r, out, bias=False)
        nn.init.normal_(self.B.weight)  # non-zero, so A's gradient is non-zero too
        self.base.requires_grad_(False)

    def forward(self, x):
        return self.base(x) + 0.5 * self.B(self.A(x))


def test_lora_like_two_linear_path():
    model = LoraLike()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    batch, loss_fn = make_batch(6, d_in=6, d_out=4, tokens=3), regression_loss(model)
    targets, sketches, _ = _sketch(model, opt, ["B", "A"], batch, loss_fn, 6)
    assert [t.name for t in targets] == ["B", "A"]
    ref = per_example_grads_loop(model, [model.B.weight, model.A.weight], batch, loss_fn, 6)
    torch.testing.assert_close(sketches, ref)
    # a regex that matches both, in named_modules() order
    targets, sketches, _ = _sketch(model, opt, "A|B", batch, loss_fn, 6)
    assert [t.name for t in targets] == ["A", "B"]
    ref = per_example_grads_loop(model, [model.A.weight, model.B.weight], batch, loss_fn, 6)
    torch.testing.assert_close(sketches, ref)


def test_sequence_inputs_mean_over_tokens():
    model = TwoLayer()
    opt = torch.optim.AdamW(model.parameters())
    batch, loss_fn = make_batch(5, tokens=4), regression_loss(model)
    for spec, params in [("fc2", [model.fc2.weight, model.fc2.bias]), (["fc1", "fc2"], list(model.parameters()))]:
        _, sketches, _ = _sketch(model, opt, spec, batch, loss_fn, 5)
        ref = per_example_grads_loop(model, params, batch, loss_fn, 5)
        torch.testing.assert_close(sketches, ref)


def test_tied_layer_called_twice_adds_up():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 4)
            self.shared = nn.Linear(4, 4)

        def forward(self, x):
            return self.shared(torch.tanh(self.shared(self.inp(x))))

    model = Twice()
    opt = torch.optim.Adam(model.parameters())
    batch = make_batch(5, d_in=4, d_out=4)
    loss_fn = regression_loss(model)
    _, sketches, _ = _sketch(model, opt, "shared", batch, loss_fn, 5)
    ref = per_example_grads_loop(model, [model.shared.weight, model.shared.bias], batch, loss_fn, 5)
    torch.testing.assert_close(sketches, ref)


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 100])
def test_chunking_gives_same_result(chunk):
    model = TwoLayer()
    opt = torch.optim.AdamW(model.parameters())
    batch, loss_fn = make_batch(7, tokens=2), regression_loss(model)
    _, full, full_losses = _sketch(model, opt, None, batch, loss_fn, 7, chunk=None)
    calls = []

    def counting_loss(b):
        calls.append(b["x"].shape[0])
        return loss_fn(b)

    _, chunked, losses = _sketch(model, opt, None, batch, counting_loss, 7, chunk=chunk)
    assert max(calls) <= chunk and sum(calls) == 7
    torch.testing.assert_close(chunked, full)
    torch.testing.assert_close(losses, full_losses)


def test_default_module_is_last_trained_linear():
    model = TwoLayer()
    opt = torch.optim.AdamW(model.fc1.parameters())  # fc2 is not trained
    assert [t.name for t in resolve_sketch_modules(model, opt, None)] == ["fc1"]
    opt = torch.optim.AdamW(model.parameters())
    assert [t.name for t in resolve_sketch_modules(model, opt, None)] == ["fc2"]


def test_grads_flags_and_modes_restored_and_eval_used():
    model = nn.Sequential(nn.Linear(5, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 3))
    model.train()
    model[2].eval()  # a mixed train/eval state must come back exactly
    model[0].bias.requires_grad_(False)  # a frozen parameter stays frozen
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn_like(p)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = [m.training for m in model.modules()]
    batch = make_batch(6)
    loss_fn = regression_loss(model)
    seen_modes = []

    def loss_and_mode(b):
        seen_modes.append(model.training or model[1].training)
        return loss_fn(b)

    _, sketches, _ = _sketch(model, opt, "3", batch, loss_and_mode, 6)
    assert seen_modes == [False]  # eval mode during the pass: no dropout
    for n, p in model.named_parameters():
        assert p.requires_grad == flags[n]
        if n in grads:
            torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0)
        else:
            assert p.grad is None
    assert [m.training for m in model.modules()] == modes
    model.eval()
    ref = per_example_grads_loop(model, [model[3].weight, model[3].bias], batch, loss_fn, 6)
    torch.testing.assert_close(sketches, ref)


def test_backward_limited_to_sketch_modules():
    """Parameters below the sketch module are excluded from autograd during the pass."""
    model = TwoLayer()
    opt = torch.optim.AdamW(model.parameters())
    flags_inside = []

    def loss_fn(b):
        flags_inside.append((model.fc1.weight.requires_grad, model.fc2.weight.requires_grad))
        return regression_loss(model)(b)

    _sketch(model, opt, "fc2", make_batch(4), loss_fn, 4)
    assert flags_inside == [(False, True)]
    assert model.fc1.weight.requires_grad and model.fc2.weight.requires_grad


def test_nan_loss_gives_nan_row_only():
    model = TwoLayer()
    opt = torch.optim.AdamW(model.parameters())
    batch = make_batch(6)
    batch["x"][2, 1] = float("nan")
    batch["y"][4, 0] = float("inf")
    loss_fn = regression_loss(model)
    for spec in ["fc2", ["fc1", "fc2"]]:
        targets, sketches, losses = _sketch(model, opt, spec, batch, loss_fn, 6, chunk=4)
        params = [p for t in targets for p in t.params]
        assert not math.isfinite(losses[2]) and not math.isfinite(losses[4])
        assert torch.isnan(sketches[[2, 4]]).all()
        good = [0, 1, 3, 5]
        sub = {k: v[good] for k, v in batch.items()}
        ref = per_example_grads_loop(model, params, sub, loss_fn, 4)
        torch.testing.assert_close(sketches[good], ref)


def test_linear_per_example_grads_closed_form():
    """The free function alone: sum over tokens of outer(dy, x), plus sum of dy for the bias."""
    x = torch.randn(3, 4, 5)
    dy = torch.randn(3, 4, 2)
    got = linear_per_example_grads([x], [dy], with_bias=True)
    ref = []
    for i in range(3):
        w = sum(torch.outer(dy[i, t], x[i, t]) for t in range(4))
        ref.append(torch.cat([w.flatten(), dy[i].sum(0)]))
    torch.testing.assert_close(got, torch.stack(ref))
    got2 = linear_per_example_grads([x, x], [dy, 2 * dy], with_bias=False)
    torch.testing.assert_close(got2, 3 * torch.stack(ref)[:, :10])
