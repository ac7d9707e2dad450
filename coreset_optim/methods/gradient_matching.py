"""Gradient matching (GradMatch's idea): greedy orthogonal matching pursuit with non-negative
least-squares weights, choosing k rows whose weighted sum matches the sum of all rows.

Atoms are the rows x_j, augmented with a constant "count" coordinate ``lam`` so that the fit also
asks the weights to add up to n (the target's count coordinate is ``lam * n``); atoms are scaled to
unit norm for the fit. Each greedy step adds the unused atom most positively correlated with the
residual and refits the non-negative weights on the chosen atoms exactly (Lawson-Hanson active
set). The final weights are rescaled to sum exactly to n (the coreset contract: weights sum to the
number of valid examples), which changes the fit by the factor n / sum(w), close to 1 thanks to
the count coordinate.

Only the n x n Gram matrix is needed: it is formed on the sketches' device and copied to the host
once per source; the small greedy loop then runs in float64 on the CPU with no device syncs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from ..records import ChooseContext
from ..timing import Stopwatch
from .base import SketchedMethod


def nnls_gram(
    gram: np.ndarray,
    b: np.ndarray,
    allowed: np.ndarray,
    max_iter: int | None = None,
    start: np.ndarray | None = None,
) -> np.ndarray:
    """argmin_{w >= 0, w = 0 off ``allowed``} 0.5 w^T G w - b^T w (Lawson-Hanson, Gram form).

    For G = A^T A and b = A^T t this is min ||A w - t|| over non-negative w. ``start``: a warm
    start, the solution for a smaller allowed set (positive exactly on its support); the greedy
    loop passes the previous step's weights, so each refit usually costs one small solve.
    """
    n = b.shape[0]
    w = np.zeros(n) if start is None else np.where(start > 0, start, 0.0)
    passive = w > 0
    allowed = np.asarray(allowed, dtype=bool)
    tol = 1e-12 * max(1.0, float(np.abs(b).max(initial=0.0)), float(np.abs(gram).max(initial=0.0)))
    max_iter = max_iter or 3 * n + 10
    for _ in range(max_iter):
        grad = b - gram @ w
        cand = allowed & ~passive & (grad > tol)
        if not cand.any():
            break
        passive[np.flatnonzero(cand)[np.argmax(grad[cand])]] = True
        for _ in range(max_iter):
            idx = np.flatnonzero(passive)
            s = np.zeros(n)
            s[idx] = np.linalg.lstsq(gram[np.ix_(idx, idx)], b[idx], rcond=None)[0]
            if (s[idx] > 0).all():
                w = s
                break
            neg = idx[s[idx] <= 0]
            alpha = np.min(w[neg] / (w[neg] - s[neg]))
            w = w + alpha * (s - w)
            passive &= w > tol
            w[~passive] = 0.0
    return w


def greedy_matching(
    x: torch.Tensor, k: int, *, count_weight: float = 1.0, rescale: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` row indices of ``x[n, d]`` and non-negative weights (summing to n) such that
    ``sum_j w_j x_j`` matches ``sum_i x_i``. ``count_weight`` scales the count coordinate
    (``lam = count_weight * mean row norm``; 0 leaves the weight sum free until the rescale).
    ``rescale=False`` returns the raw least-squares weights (they need not sum to n, so they break
    the coreset contract: for experiments only; GradMatch's original weights)."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    xd = x.double()
    lam = count_weight * xd.norm(dim=1).mean()
    gram_x = xd @ xd.T
    gram_t = gram_x + lam * lam  # Gram matrix of the atoms [x_j, lam]
    host = (gram_t if gram_t.device.type == "cpu" else gram_t.cpu()).numpy()  # select_from_sketches passes host rows
    norms = np.sqrt(np.maximum(np.diag(host), 1e-300))
    gram = host / np.outer(norms, norms)
    b = host.sum(1) / norms  # <unit atom j, sum_i atom_i>
    taken = np.zeros(n, dtype=bool)
    chosen: list[int] = []
    w = np.zeros(n)
    for _ in range(k):
        corr = b - gram @ w
        corr[taken] = -np.inf
        j = int(np.argmax(corr))
        chosen.append(j)
        taken[j] = True
        w = nnls_gram(gram, b, taken, start=w)
    weights = w[chosen] / norms[chosen]
    total = weights.sum()
    if not rescale:
        return torch.tensor(chosen, dtype=torch.long, device=x.device), torch.tensor(
            weights, dtype=torch.float32, device=x.device
        )
    # Nothing correlates positively (e.g. all-zero sketches): fall back to uniform weights.
    weights = weights * (n / total) if total > 0 else np.full(k, n / k)
    return (
        torch.tensor(chosen, dtype=torch.long, device=x.device),
        torch.tensor(weights, dtype=torch.float32, device=x.device),
    )


def gradient_matching_coreset(
    x: torch.Tensor, k: int, watch: Stopwatch | None = None, count_weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """One source's ``k`` rows and non-negative weights (see :func:`greedy_matching`)."""
    chosen, weights = greedy_matching(x, k, count_weight=count_weight)
    if watch is not None:
        watch.lap("greedy")
    return chosen, weights


@dataclass(kw_only=True)
class GradientMatching(SketchedMethod):
    """``selection="gradient_matching"``: per source, the rows whose non-negatively weighted sum
    best matches the sum of all its rows (the large batch's normalized gradient)."""

    name: ClassVar[str] = "gradient_matching"
    # The greedy runs in numpy: select_from_sketches hands it host rows, copied once for all sources.
    runs_on_host: ClassVar[bool] = True

    def choose(self, x: torch.Tensor, k: int, context: ChooseContext) -> tuple[torch.Tensor, torch.Tensor]:
        return gradient_matching_coreset(x, k, context.watch)
