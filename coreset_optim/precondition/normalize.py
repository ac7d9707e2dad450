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

from collections.abc import Callable, Sequence

import torch

from .moments import adam_moment_ranges, find_group, has_second_moment

BlockNormalizer = Callable[[torch.Tensor, int], torch.Tensor]  # (values[n, m], flat start) -> normalized

NORMALIZE_MODES = ("adam", "adam_update", None)


def adam_normalize(
    grads: torch.Tensor, exp_avg_sq: torch.Tensor, step: int, beta2: float, eps: float, inplace: bool = False
) -> torch.Tensor:
    """``grads[n, P] / (sqrt(v_hat) + eps)`` with ``v_hat`` Adam's bias-corrected second moment
    (``inplace``: divides ``grads`` itself)."""
    if step <= 0:
        return grads
    denominator = adam_denominator(exp_avg_sq.reshape(1, -1).to(grads.device), step, beta2, eps)
    return grads.div_(denominator) if inplace else grads / denominator


def adam_denominator(exp_avg_sq: torch.Tensor, step: int, beta2: float, eps: float) -> torch.Tensor:
    """``sqrt(v / (1 - beta2**step)) + eps``, what Adam divides each coordinate by (a new tensor)."""
    return (exp_avg_sq.float() / (1.0 - beta2**step)).sqrt_().add_(eps)


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


def param_normalizer(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, mode: str | None, inplace: bool = False
) -> BlockNormalizer:
    """How to normalize any block of ``param``'s per-example gradients: ``f(values[n, m], start)``
    for the flat coordinates ``start .. start+m-1``, reading the optimizer's moments of that range only.

    Every mode is elementwise in the coordinates, so normalizing block by block equals
    normalizing the whole gradient at once. ``inplace``: the "adam" mode divides the block itself.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {mode!r}")
    raw: BlockNormalizer = lambda values, start: values  # noqa: E731
    if mode is None:
        return raw
    group = find_group(optimizer, param)
    if not has_second_moment(group):
        return raw
    ranges = adam_moment_ranges(optimizer, param, group)
    if mode == "adam":
        if ranges is None:
            return raw

        def adam(values: torch.Tensor, start: int) -> torch.Tensor:
            m = ranges.read_denominator(start, start + values.shape[1])
            return adam_normalize(values, m, ranges.step, ranges.beta2, ranges.eps, inplace=inplace)

        return adam
    if ranges is None:
        if optimizer.state.get(param):  # state without an Adam second moment (Lion, Adamax): raw
            return raw
        beta1, beta2, eps = group["betas"][0], group["betas"][1], float(group["eps"])
        return lambda values, start: adam_update_normalize(values, None, None, 0, beta1, beta2, eps)  # noqa: E731

    def adam_update(values: torch.Tensor, start: int) -> torch.Tensor:
        m = ranges.read(start, start + values.shape[1])
        return adam_update_normalize(
            values, m.exp_avg, m.exp_avg_sq, m.step, m.beta1, m.beta2, m.eps, amsgrad_max=m.max_exp_avg_sq
        )

    return adam_update


DivisorFn = Callable[[int, int], "torch.Tensor | None"]  # (start, stop) -> per-coordinate divisor, None: raw


def coordinate_divisor(optimizer: torch.optim.Optimizer, param: torch.Tensor, mode: str | None) -> DivisorFn | None:
    """When ``mode`` divides each coordinate of ``param`` by one positive number for every example
    ("adam", or raw), the function giving those numbers for a flat range (``None`` from it: raw);
    ``None`` when it does not (``"adam_update"`` mixes in the example's own gradient).

    Lets a compressor score columns and normalize only the values it keeps, the same as
    normalizing every value first (up to float rounding): ``sum_i |g_i / d| = sum_i |g_i| / d``.
    """
    if mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {mode!r}")
    raw: DivisorFn = lambda start, stop: None  # noqa: E731
    if mode is None:
        return raw
    group = find_group(optimizer, param)
    if not has_second_moment(group):
        return raw
    ranges = adam_moment_ranges(optimizer, param, group)
    if mode == "adam_update":
        return raw if ranges is None and optimizer.state.get(param) else None
    if ranges is None or ranges.step <= 0:
        return raw
    return lambda start, stop: adam_denominator(
        ranges.read_denominator(start, stop), ranges.step, ranges.beta2, ranges.eps
    )


def divisor_is_positive(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> bool:
    """Whether :func:`coordinate_divisor`'s numbers are known positive without reading them:
    ``sqrt(v_hat) + eps >= eps`` with eps a normal float32 (so ``1 / divisor`` is finite), or there
    is no divisor at all.

    A compressor may then fold ``1 / divisor`` into its weights (a product, no host check of the
    values: no device sync per block); with ``eps = 0`` it must divide the values themselves.
    """
    group = find_group(optimizer, param)
    if not has_second_moment(group):
        return True
    return float(group["eps"]) >= torch.finfo(torch.float32).tiny  # 1 / eps finite in float32


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
        blocks.append(param_normalizer(optimizer, p, mode)(sketches[:, start:stop], 0))
        start = stop
    return torch.cat(blocks, dim=1)
