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
from dataclasses import dataclass

import torch

from .moments import MomentRanges, adam_moment_ranges, find_group, has_second_moment

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


DivisorFn = Callable[[int, int], "torch.Tensor | None"]  # (start, stop) -> per-coordinate divisor, None: raw


def _raw_block(values: torch.Tensor, start: int) -> torch.Tensor:
    return values


def _raw_divisor(start: int, stop: int) -> None:
    return None


@dataclass
class ParamPreconditioner:
    """How the wrapped optimizer will scale one parameter's gradient under ``mode``, read once:
    its param group and Adam moments are found here, and every question below is answered from
    them (block normalizer, per-coordinate divisor, whether that divisor is known positive).

    Build it with :meth:`of`. ``group`` is None when the group is not Adam's; ``ranges`` is None
    when the mode is raw or there are no moments (yet); ``has_state``: the optimizer holds state
    for the parameter (with ``ranges`` None: Lion, Adamax, whose gradients are used raw).
    """

    mode: str | None
    group: dict | None
    ranges: MomentRanges | None
    has_state: bool

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer, param: torch.Tensor, mode: str | None) -> ParamPreconditioner:
        if mode not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {mode!r}")
        group = find_group(optimizer, param)
        if not has_second_moment(group):
            return cls(mode, None, None, False)
        ranges = None if mode is None else adam_moment_ranges(optimizer, param, group)
        return cls(mode, group, ranges, bool(optimizer.state.get(param)))

    def block_normalizer(self, inplace: bool = False) -> BlockNormalizer:
        """How to normalize any block of the parameter's per-example gradients: ``f(values[n, m],
        start)`` for the flat coordinates ``start .. start+m-1``, reading the moments of that range
        only.

        Every mode is elementwise in the coordinates, so normalizing block by block equals
        normalizing the whole gradient at once. ``inplace``: the "adam" mode divides the block itself.
        """
        ranges, group = self.ranges, self.group
        if self.mode is None or group is None:
            return _raw_block
        if self.mode == "adam":
            if ranges is None:
                return _raw_block

            def adam(values: torch.Tensor, start: int) -> torch.Tensor:
                m = ranges.read_denominator(start, start + values.shape[1])
                return adam_normalize(values, m, ranges.step, ranges.beta2, ranges.eps, inplace=inplace)

            return adam
        if ranges is None:
            if self.has_state:  # state without an Adam second moment (Lion, Adamax): raw
                return _raw_block
            beta1, beta2, eps = group["betas"][0], group["betas"][1], float(group["eps"])
            return lambda values, start: adam_update_normalize(values, None, None, 0, beta1, beta2, eps)  # noqa: E731

        def adam_update(values: torch.Tensor, start: int) -> torch.Tensor:
            m = ranges.read(start, start + values.shape[1])
            return adam_update_normalize(
                values, m.exp_avg, m.exp_avg_sq, m.step, m.beta1, m.beta2, m.eps, amsgrad_max=m.max_exp_avg_sq
            )

        return adam_update

    def divisor(self) -> DivisorFn | None:
        """When the mode divides each coordinate by one positive number for every example ("adam",
        or raw), the function giving those numbers for a flat range (``None`` from it: raw);
        ``None`` when it does not (``"adam_update"`` mixes in the example's own gradient).

        Lets a compressor score columns and normalize only the values it keeps, the same as
        normalizing every value first (up to float rounding): ``sum_i |g_i / d| = sum_i |g_i| / d``.
        """
        ranges = self.ranges
        if self.mode is None or self.group is None:
            return _raw_divisor
        if self.mode == "adam_update":
            return _raw_divisor if ranges is None and self.has_state else None
        if ranges is None or ranges.step <= 0:
            return _raw_divisor
        return lambda start, stop: adam_denominator(
            ranges.read_denominator(start, stop), ranges.step, ranges.beta2, ranges.eps
        )

    def divisor_is_positive(self) -> bool:
        """Whether :meth:`divisor`'s numbers are known positive without reading them:
        ``sqrt(v_hat) + eps >= eps`` with eps a normal float32 (so ``1 / divisor`` is finite), or
        there is no divisor at all.

        A compressor may then fold ``1 / divisor`` into its weights (a product, no host check of the
        values: no device sync per block); with ``eps = 0`` it must divide the values themselves.
        """
        if self.group is None:
            return True
        return float(self.group["eps"]) >= torch.finfo(torch.float32).tiny  # 1 / eps finite in float32


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
        blocks.append(ParamPreconditioner.of(optimizer, p, mode).block_normalizer()(sketches[:, start:stop], 0))
        start = stop
    return torch.cat(blocks, dim=1)
