"""Gradient matching (GradMatch's idea): greedy orthogonal matching pursuit with non-negative
least-squares weights, choosing k rows whose weighted sum matches the sum of all rows.

Atoms are the rows x_j, augmented with a constant "count" coordinate ``lam`` so that the fit also
asks the weights to add up to n (the target's count coordinate is ``lam * n``); atoms are scaled to
unit norm for the fit. Each greedy step adds the unused atom most positively correlated with the
residual and refits the non-negative weights on the chosen atoms. The final weights are rescaled
to sum exactly to n (the coreset contract: weights sum to the number of valid examples), which
changes the fit by the factor n / sum(w) — close to 1 thanks to the count coordinate.

Everything works on the n x n Gram matrix on the sketches' device with a fixed number of
iterations and no host synchronization, so the loop runs on a GPU as well as on a CPU.
"""

from __future__ import annotations

import torch


def _lipschitz(gram: torch.Tensor, mask: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """An upper estimate of the largest eigenvalue of ``gram`` restricted to ``mask``."""
    m = mask.to(gram.dtype)
    restricted = gram * m[:, None] * m[None, :]
    v = m.clone()
    for _ in range(iters):
        v = restricted @ v
        v = v / v.norm().clamp_min(1e-30)
    estimate = (v @ (restricted @ v)).clamp_min(1e-12)
    trace = (torch.diagonal(gram) * m).sum().clamp_min(1e-12)
    return torch.minimum(estimate * 1.25, trace)


def nnls_gram(
    gram: torch.Tensor, b: torch.Tensor, mask: torch.Tensor, w0: torch.Tensor | None = None, iters: int = 300
) -> torch.Tensor:
    """argmin_{w >= 0, w = 0 off mask} 0.5 w^T G w - b^T w, by accelerated projected gradient.

    (For G = A^T A, b = A^T t this is min ||A w - t||^2 / 2 over non-negative w.)
    """
    m = mask.to(gram.dtype)
    step = 1.0 / _lipschitz(gram, mask)
    w = (torch.zeros_like(b) if w0 is None else w0.clone()) * m
    y, t = w.clone(), 1.0
    for _ in range(iters):
        w_next = (y - step * (gram @ y - b)).clamp_(min=0) * m
        t_next = (1.0 + (1.0 + 4.0 * t * t) ** 0.5) / 2.0
        y = w_next + ((t - 1.0) / t_next) * (w_next - w)
        w, t = w_next, t_next
    return w


def greedy_matching(
    x: torch.Tensor,
    k: int,
    *,
    count_weight: float = 1.0,
    inner_iters: int = 40,
    final_iters: int = 400,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` row indices of ``x[n, d]`` and non-negative weights (summing to n) such that
    ``sum_j w_j x_j`` matches ``sum_i x_i``. ``count_weight`` scales the count coordinate
    (``lam = count_weight * mean row norm``; 0 leaves the weight sum free until the rescale)."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    x = x.double()
    lam = count_weight * x.norm(dim=1).mean()
    atoms = torch.cat([x, lam.expand(n, 1)], dim=1)
    norms = atoms.norm(dim=1).clamp_min(1e-30)
    unit = atoms / norms[:, None]
    target = atoms.sum(0)
    gram = unit @ unit.T
    b = unit @ target
    taken = torch.zeros(n, dtype=torch.bool, device=x.device)
    chosen = torch.empty(k, dtype=torch.long, device=x.device)
    w = torch.zeros(n, dtype=x.dtype, device=x.device)
    for step in range(k):
        corr = (b - gram @ w).masked_fill(taken, -float("inf"))
        best = corr.argmax().view(1)
        chosen[step : step + 1] = best
        taken.index_fill_(0, best, True)
        w = nnls_gram(gram, b, taken, w, final_iters if step == k - 1 else inner_iters)
    weights = (w / norms).index_select(0, chosen)
    total = weights.sum()
    # All-zero weights (nothing correlates positively): fall back to uniform weights.
    weights = torch.where(total > 0, weights * (n / total.clamp_min(1e-300)), torch.full_like(weights, n / k))
    return chosen, weights.float()


def gradient_matching_coreset(x: torch.Tensor, k: int, *, watch=None, **_: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Selector for :data:`coreset_optim.selection.SELECTORS` (see :func:`greedy_matching`)."""
    chosen, weights = greedy_matching(x, k)
    if watch is not None:
        watch.lap("greedy")
    return chosen, weights
