"""Per-example causal-LM loss in row chunks (token_nll) against the plain formula.

Reference: ``F.cross_entropy`` on float64 copies of the shifted logits, averaged per example;
its gradient through autograd. The chunked path must agree in value and gradient for float32,
float64 and bfloat16 logits, with ignored tokens and an example without label tokens (NaN), and
must never build a float32 ``[N, V]`` tensor larger than one chunk.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import coreset_optim.integrations.causal_lm as causal_lm
from coreset_optim.integrations.causal_lm import causal_lm_per_example_loss, token_nll


def reference(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    shifted, targets = logits[:, :-1].double(), labels[:, 1:]
    tokens = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), reduction="none")
    return tokens.view(targets.shape).sum(1) / (targets != -100).sum(1)


def make(dtype, seed=0, b=4, t=9, v=13):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(b, t, v, generator=g)).to(dtype)
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :4] = -100  # a prompt
    labels[3] = -100  # no label token at all: NaN
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("chunk_rows", [1, 5, 10_000])
def test_matches_cross_entropy_in_value_and_gradient(monkeypatch, dtype, chunk_rows):
    monkeypatch.setattr(causal_lm, "NLL_CHUNK_BYTES", 4 * 13 * chunk_rows)
    logits, labels = make(dtype)
    ours_in = logits.clone().requires_grad_()
    ref_in = logits.double().requires_grad_()
    got, want = causal_lm_per_example_loss(ours_in, labels), reference(ref_in, labels)
    assert got.dtype == torch.float32
    tol = {"atol": 2e-2, "rtol": 2e-2} if dtype == torch.bfloat16 else {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(got.double(), want, equal_nan=True, **tol)
    weights = torch.tensor([0.5, 2.0, 1.0, 0.0], dtype=torch.float64)
    (got[:3].double() * weights[:3]).sum().backward()
    (want[:3] * weights[:3]).sum().backward()
    assert ours_in.grad.dtype == dtype
    assert torch.equal(ours_in.detach(), logits)  # backward must not write into the logits
    torch.testing.assert_close(ours_in.grad.double(), ref_in.grad, **tol)


def test_token_nll_is_zero_on_ignored_rows_and_their_gradient_is_zero():
    logits = torch.randn(6, 5, requires_grad=True)
    labels = torch.tensor([1, -100, 4, -100, 0, 2])
    out = token_nll(logits, labels)
    assert out[[1, 3]].tolist() == [0.0, 0.0]
    out.sum().backward()
    assert torch.equal(logits.grad[[1, 3]], torch.zeros(2, 5))
    torch.testing.assert_close(
        out[[0, 2, 4, 5]], F.cross_entropy(logits[[0, 2, 4, 5]], labels[[0, 2, 4, 5]], reduction="none")
    )


def test_no_full_float32_copy_of_bf16_logits(monkeypatch):
    """Every float32 tensor made from the logits is at most one chunk of rows wide (forward and
    backward), where F.cross_entropy would make [N, V] float32 tensors."""
    monkeypatch.setattr(causal_lm, "NLL_CHUNK_BYTES", 4 * 50 * 8)  # 8 rows of a 50-token vocabulary
    logits = torch.randn(4, 16, 50).bfloat16().requires_grad_()
    labels = torch.randint(0, 50, (4, 16))
    largest = []

    class Watch(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.ndim == 2:
                largest.append(out.shape[0])
            return out

    with Watch():
        loss = causal_lm_per_example_loss(logits, labels)
    loss.nansum().backward()  # backward runs outside the mode; check its chunks by the gradient
    assert largest and max(largest) <= 8
    torch.testing.assert_close(loss.double(), reference(logits.detach().double(), labels), atol=2e-2, rtol=2e-2)


def test_non_finite_logits_give_a_non_finite_loss():
    logits, labels = make(torch.float32)
    logits[1, 2, 0] = float("nan")
    got = causal_lm_per_example_loss(logits, labels)
    assert torch.isnan(got[1]) and torch.isfinite(got[:1]).all() and torch.isfinite(got[2])
