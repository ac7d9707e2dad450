"""Normalizing per-example gradients the way Adam will use them.

``"adam"``:        g_i / (sqrt(v_hat) + eps),  v_hat = v / (1 - beta2**t), the optimizer's current
                   second moment (``max_exp_avg_sq`` under amsgrad). Before the first step (t = 0,
                   no state) the sketches are used as they are.
``"adam_update"``: CoLM's per-example Adam update m_hat_i / (sqrt(v_hat_i) + eps) with
                   m_i = b1 m + (1 - b1) g_i, v_i = b2 v + (1 - b2) g_i**2, bias-corrected with t + 1
                   (before the first step m = v = 0, t = 0, i.e. Adam's first update).
``None``:          raw gradients.

Optimizers without an Adam second moment (SGD, ...) get raw gradients under every mode. One whose
param group has ``betas`` and ``eps`` but whose state holds no second moment (Lion, Adamax) is
indistinguishable from Adam before its first step (``"adam_update"`` gives Adam's first update
then) and gets raw gradients once it has state.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .moments import find_group, has_second_moment, read_adam_moments

NORMALIZE_MODES = ("adam", "adam_update", None)


def adam_normalize(grads: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, beta2: float, eps: float) -> torch.Tensor:
    """``grads[n, P] / (sqrt(v_hat) + eps)`` with ``v_hat`` Adam's bias-corrected second moment."""
    if step <= 0:
        return grads
    v_hat = exp_avg_sq.reshape(1, -1).to(grads.device) / (1.0 - beta2**step)
    return grads / (v_hat.sqrt() + eps)


def adam_update_normalize(
    grads: torch.Tensor,
    exp_avg: torch.Tensor | None,
    exp_avg_sq: torch.Tensor | None,
    step: int,
    beta1: float,
    beta2: float,
    eps: float,
    amsgrad_max: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each example's Adam update if it alone were the next gradient (CoLM's transform)."""
    t = step + 1
    m = grads * (1.0 - beta1)
    v = grads.square() * (1.0 - beta2)
    if exp_avg is not None:
        m = m + beta1 * exp_avg.reshape(1, -1).to(grads.device)
    if exp_avg_sq is not None:
        v = v + beta2 * exp_avg_sq.reshape(1, -1).to(grads.device)
    if amsgrad_max is not None:
        v = torch.maximum(v, amsgrad_max.reshape(1, -1).to(grads.device))
    m_hat = m / (1.0 - beta1**t)
    v_hat = v / (1.0 - beta2**t)
    return m_hat / (v_hat.sqrt() + eps)


def normalize_sketches(
    sketches: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.Tensor],
    mode: str | None,
) -> torch.Tensor:
    """Normalize ``sketches[n, sum(numel)]`` (the params' gradients side by side) per parameter."""
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {mode!r}")
    if mode is None:
        return sketches
    blocks, start = [], 0
    for p in params:
        stop = start + p.numel()
        block = sketches[:, start:stop]
        start = stop
        group = find_group(optimizer, p)
        if not has_second_moment(group):
            blocks.append(block)
            continue
        moments = read_adam_moments(optimizer, p, group)
        if mode == "adam":
            if moments is not None:
                block = adam_normalize(block, moments.denominator_sq, moments.step, moments.beta2, moments.eps)
        elif moments is None:
            if optimizer.state.get(p):  # state without an Adam second moment (Lion, Adamax): raw
                blocks.append(block)
                continue
            beta1, beta2 = group["betas"][0], group["betas"][1]
            block = adam_update_normalize(block, None, None, 0, beta1, beta2, float(group["eps"]))
        else:
            block = adam_update_normalize(
                block,
                moments.exp_avg,
                moments.exp_avg_sq,
                moments.step,
                moments.beta1,
                moments.beta2,
                moments.eps,
                amsgrad_max=moments.max_exp_avg_sq,
            )
        blocks.append(block)
    return torch.cat(blocks, dim=1)
