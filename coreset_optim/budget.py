"""How a coreset budget is shared among the sources of a data mixture.

Small sources are kept whole (weight 1), because gradient matching rarely picks their examples and
losing them hurts (CoLM). The rest of the budget is split among the other sources in proportion to
their counts: floor first, then the remainder one example at a time to the largest fractional
shares (ties: the larger source, then the first).
"""

from __future__ import annotations

from collections.abc import Sequence


def proportional_split(counts: Sequence[int], budget: int) -> list[int]:
    """Split ``budget`` in proportion to ``counts``, never giving a source more than its count."""
    total = sum(counts)
    if budget >= total:
        return list(counts)
    if budget <= 0 or total == 0:
        return [0] * len(counts)
    # Exact integer arithmetic: floor(budget * c / total) and the fractional part's numerator, so
    # equal fractional shares tie exactly (floats break ties by rounding noise).
    alloc = [min(budget * c // total, c) for c in counts]
    rems = [budget * c % total for c in counts]
    order = sorted(range(len(counts)), key=lambda i: (-rems[i], -counts[i], i))
    left = budget - sum(alloc)
    while left > 0:  # terminates: budget < total, so some source still has room
        for i in order:
            if left == 0:
                break
            if alloc[i] < counts[i]:
                alloc[i] += 1
                left -= 1
    return alloc


def small_sources(counts: Sequence[int], budget: int) -> list[bool]:
    """The default ("auto") rule: a source is small when its proportional share of the budget is
    below one example (``count * budget < total``), i.e. when proportional selection would give it
    at most one example by rounding."""
    total = sum(counts)
    return [0 < c and c * budget < total for c in counts]


def allocate_budget(counts: Sequence[int], budget: int, keep: Sequence[bool]) -> list[int]:
    """Examples to select per source.

    Kept sources get all their examples when they fit in the budget, the others share what is
    left. When the kept examples alone exceed the budget, no source is kept whole: the budget is
    split proportionally over all sources, so the coreset never exceeds ``budget``.
    """
    kept_total = sum(c for c, k in zip(counts, keep) if k)
    if kept_total > budget:
        return proportional_split(counts, budget)
    rest = proportional_split([0 if k else c for c, k in zip(counts, keep)], budget - kept_total)
    return [c if k else r for c, k, r in zip(counts, keep, rest)]
