"""How a coreset budget is shared among the sources of a data mixture.

Small sources are kept whole (weight 1), because gradient matching rarely picks their examples and
losing them hurts (CoLM). The rest of the budget is split among the other sources in proportion to
their counts: floor first, then the remainder one example at a time to the largest fractional
shares (ties: the larger source, then the first).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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


def keep_mask(keep_sources: Any, names: Sequence[Any], counts: Sequence[int], budget: int) -> list[bool]:
    """Which sources ``keep_sources`` marks to keep whole: "auto" the small ones
    (:func:`small_sources`), None none, a list the sources it names."""
    if keep_sources is None:
        return [False] * len(names)
    if keep_sources == "auto":
        return small_sources(counts, budget)
    return [name in keep_sources for name in names]


def sources_kept_whole(counts: Sequence[int], budget: int, keep: Sequence[bool]) -> list[bool]:
    """Which of the sources marked ``keep`` are kept whole within ``budget``.

    Smallest first, a marked source is kept whole only if, with it, the kept examples still leave
    at least one example of budget for every other non-empty source. So keeping small sources
    never starves a large one, and the coreset never exceeds the budget.
    """
    nonempty = sum(1 for c in counts if c > 0)
    kept = [False] * len(counts)
    kept_total, kept_sources = 0, 0
    for i in sorted(range(len(counts)), key=lambda i: (counts[i], i)):
        if not keep[i] or counts[i] == 0:
            continue
        others = nonempty - kept_sources - 1
        if kept_total + counts[i] + others <= budget:
            kept[i] = True
            kept_total += counts[i]
            kept_sources += 1
    return kept


def allocate_budget(counts: Sequence[int], budget: int, keep: Sequence[bool]) -> list[int]:
    """Examples to select per source.

    The sources :func:`sources_kept_whole` keeps get all their examples; the others share what is
    left in proportion to their counts. A marked source that does not fit is treated like the
    others (when every marked source fits, all are kept whole).
    """
    whole = sources_kept_whole(counts, budget, keep)
    kept_total = sum(c for c, w in zip(counts, whole) if w)
    rest = proportional_split([0 if w else c for c, w in zip(counts, whole)], budget - kept_total)
    return [c if w else r for c, w, r in zip(counts, whole, rest)]


def tempered_scores(counts: Sequence[int], temperature: float) -> list[float]:
    """Each source's weight under temperature sampling: ``count ** (1 / temperature)`` (``inf``: 1
    for every non-empty source), 0 for an empty one."""
    return [0.0 if c == 0 else (1.0 if temperature == float("inf") else c ** (1.0 / temperature)) for c in counts]


def tempered_split(counts: Sequence[int], budget: int, temperature: float) -> list[int]:
    """Split ``budget`` among sources in proportion to ``count ** (1 / temperature)``, capped at
    each count (what a capped source cannot take goes to the others the same way).

    Temperature sampling, the multi-task standard: ``temperature=1`` is proportional,
    ``float("inf")`` gives every non-empty source an equal share ("balanced"). Rounding: floor,
    then the remainder one example at a time to the largest fractional shares (ties: the larger
    source, then the first).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (float('inf') for balanced), got {temperature!r}")
    alloc = [0] * len(counts)
    left = min(budget, sum(counts))
    open_ = [i for i, c in enumerate(counts) if c > 0]
    score = tempered_scores(counts, temperature)
    while left > 0 and open_:
        total = sum(score[i] for i in open_)
        share = {i: left * score[i] / total for i in open_}
        capped = [i for i in open_ if alloc[i] + share[i] >= counts[i]]
        if capped:  # sources that can take all they have: give it, re-split the rest
            for i in capped:
                left -= counts[i] - alloc[i]
                alloc[i] = counts[i]
            open_ = [i for i in open_ if i not in capped]
            continue
        floors = {i: int(share[i] + 1e-9) for i in open_}
        for i in open_:
            alloc[i] += floors[i]
        left -= sum(floors.values())
        # Fractions rounded so that shares equal in exact arithmetic tie (floats differ by noise).
        for i in sorted(open_, key=lambda i: (-round(share[i] - floors[i], 9), -counts[i], i))[: max(left, 0)]:
            alloc[i] += 1
        left = 0
    return alloc
