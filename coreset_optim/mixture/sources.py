"""Which source of a data mixture each example of a batch comes from: read, checked and encoded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch


def source_values(batch: Any, size: int, sources: Any, source_key: str | None) -> list | None:
    """One source id per example: ``sources`` when given, else ``batch[source_key]`` (None: one
    source). TypeError/ValueError naming the fix when they are not one id per example."""
    if sources is None and source_key is not None:
        if not isinstance(batch, Mapping) or source_key not in batch:
            raise ValueError(
                f"source_key={source_key!r} is not a key of the batch; add the source ids to the "
                "batch under that key, pass sources=..., or set source_key=None"
            )
        sources = batch[source_key]
    if sources is None:
        return None
    if hasattr(sources, "tolist"):  # a tensor or an array
        sources = sources.tolist()
    if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence):
        raise TypeError(f"sources must be a list or 1-D tensor of source ids, got {type(sources).__name__}")
    if len(sources) != size:
        raise ValueError(
            f"sources has {len(sources)} entries for a batch of {size} examples; give one source id per example"
        )
    return list(sources)


def encode_sources(values: Sequence[Any] | None, size: int) -> tuple[torch.Tensor, list[Any]]:
    """Integer codes (in order of first appearance) and the source names they stand for."""
    if values is None:
        return torch.zeros(size, dtype=torch.long), ["all"]
    names: dict[Any, int] = {}
    codes = [names.setdefault(v, len(names)) for v in values]
    return torch.tensor(codes, dtype=torch.long), list(names)
