"""Zeroth-order (SPSA) sketches, CoLM's released default: two forward passes, no backward.

With the sketch parameters theta perturbed to theta + eps*z and theta - eps*z (z Gaussian), each
example's directional derivative is c_i = (L_i(+) - L_i(-)) / (2 eps) and its sketch is c_i * z,
an unbiased estimate of the projection of its gradient on z (E[z z^T] = I). ``probes`` fresh
directions are averaged. With one direction fixed for the whole run (CoLM's choice), every sketch
is a multiple of the same vector, so selection sees one number per example.

The parameters are restored bit-exactly from a copy taken before the first perturbation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .capture import sketch_mode, sketch_params, BatchPass, SketchLayer


def sketch_numel(layers: Sequence[SketchLayer]) -> int:
    return sum(t.numel for t in layers)


def fixed_direction(numel: int, seed: int) -> torch.Tensor:
    """CoLM's one direction for the whole run, a function of ``seed`` only (so checkpoints agree)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(numel, generator=gen)


def _perturb(params: Sequence[torch.Tensor], z: torch.Tensor, scale: float) -> None:
    start = 0
    for p in params:
        stop = start + p.numel()
        p.add_(z[start:stop].to(p.device, p.dtype).view_as(p), alpha=scale)
        start = stop


def _restore(params: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    for p, s in zip(params, saved):
        p.copy_(s)


@torch.no_grad()
def zeroth_order_sketches(
    batch_pass: BatchPass,
    *,
    eps: float,
    directions: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sketches[B, D], losses[B])`` from central differences along each row of ``directions``.

    ``directions[K, D]`` (D: the sketch parameters' total size) are averaged over: sketch_i =
    mean_k c_ik z_k. The losses are mean_k (L_i(+) + L_i(-)) / 2, the unperturbed loss up to
    O(eps^2). Rows of examples with a non-finite loss are NaN. Parameters are restored exactly.
    """
    params = sketch_params(batch_pass.layers)
    saved = [p.detach().clone() for p in params]
    num_probes = directions.shape[0]
    sketches = None
    loss_sum = None
    try:
        with sketch_mode(batch_pass.model, []):
            for z in directions:
                _perturb(params, z, eps)
                plus = batch_pass.losses()
                _restore(params, saved)
                _perturb(params, z, -eps)
                minus = batch_pass.losses()
                _restore(params, saved)
                coef = (plus - minus) / (2.0 * eps)
                part = coef[:, None] * z.to(coef.device, coef.dtype)[None, :]
                sketches = part if sketches is None else sketches + part
                mid = (plus + minus) / 2.0
                loss_sum = mid if loss_sum is None else loss_sum + mid
    finally:
        _restore(params, saved)
    sketches = sketches / num_probes
    losses = loss_sum / num_probes
    finite = torch.isfinite(losses)
    sketches = torch.where(finite[:, None], sketches, torch.full_like(sketches, float("nan")))
    return sketches, losses
