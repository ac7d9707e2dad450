"""Compressing normalized sketches by a seeded CountSketch instead of keeping top coordinates.

Coordinate j goes to bucket h(j) with sign s(j); the projection of x is
y[b] = sum_{j: h(j) = b} s(j) x[j]. Inner products (hence distances and norms) are preserved in
expectation, with variance falling as 1 / dim, and every coordinate contributes (top-k keeps only
the largest ones).

``h`` and ``s`` are computed from the coordinate's index, not drawn in sequence: one random cubic
modulo the prime p = 2**31 - 1 (a 4-wise independent hash, what CountSketch's variance bound asks
for) gives the sign (its lowest bit) and the bucket (the other 30 bits scaled to ``[0, dim)``). So any range of
coordinates is hashed on its own and a layer can be projected block by block
(:mod:`coreset_optim.sketch.streaming`) with the same result as at once. The coefficients are a function
of the seed alone, so the same seed (saved in the optimizer's state) gives the same projection
after a checkpoint reload. Indices beyond p are folded in (j mod p plus a multiple of j // p).
"""

from __future__ import annotations

import functools

import torch

PRIME = 2**31 - 1  # products of two residues stay below 2**62: exact in int64


@functools.lru_cache(maxsize=64)
def _coefficients(seed: int) -> tuple[int, ...]:
    """The hash's five coefficients for ``seed`` (host ints, computed once per seed)."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(1, PRIME, (5,), generator=gen, dtype=torch.long).tolist())


def _poly(keys: torch.Tensor, coefs: list[int]) -> torch.Tensor:
    """``(c0 x^d + ... + c_d) mod p`` by Horner's rule (in place), every intermediate < 2**63."""
    acc = torch.full_like(keys, coefs[0])
    for c in coefs[1:]:
        acc.mul_(keys).add_(c).remainder_(PRIME)
    return acc


def countsketch_hash(numel: int, dim: int, seed: int, start: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Buckets in ``[0, dim)`` and float signs in {-1, +1} of coordinates ``start .. start+numel-1``."""
    c = _coefficients(seed)
    keys = torch.arange(start, start + numel, dtype=torch.long, device=device)
    if start + numel > PRIME:
        keys = (keys % PRIME + (keys // PRIME) * c[4]) % PRIME
    h = _poly(keys, c[0:4])
    signs = (h & 1).float().mul_(-2).add_(1)
    return h.bitwise_right_shift_(1).mul_(dim).bitwise_right_shift_(30), signs  # [0, 2**30) scaled to [0, dim)


def countsketch_add_(
    out: torch.Tensor, x: torch.Tensor, seed: int, start: int = 0, divisor: torch.Tensor | None = None
) -> torch.Tensor:
    """``out[n, dim] += CountSketch of x[n, m] / divisor[m]``, x being coordinates ``start .. start+m-1``
    (the division folded into the signs: one pass over x, no host check). ``divisor`` must be
    positive with a finite reciprocal (e.g. Adam's with eps > 0); otherwise divide x first and
    pass ``divisor=None``, so that 0 / 0 is NaN as on whole rows, not 0 * inf."""
    buckets, signs = countsketch_hash(x.shape[1], out.shape[1], seed, start, device=x.device)
    signs = signs.to(x.dtype)
    if divisor is not None:
        signs = signs / divisor.to(x.device, x.dtype)
    return out.index_add_(1, buckets, x * signs)


def countsketch(x: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """``Tensor[n, dim]``: the CountSketch of the rows of ``x[n, D]`` (rows with NaN stay NaN)."""
    return countsketch_add_(x.new_zeros(x.shape[0], dim), x, seed)
