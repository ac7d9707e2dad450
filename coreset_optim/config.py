"""The options of :class:`~coreset_optim.CoresetOptimizer` that every selection method shares
(the budget, the mixture, chunking, the seed, the ranks), checked once, saved in checkpoints.

Each method's own options live in its object (:mod:`coreset_optim.methods.base`);
:func:`~coreset_optim.methods.registry.resolve_options` splits ``CoresetOptimizer``'s keyword
options between the two. This module imports no method: every method may read the shared config.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

from .checks import check_optional_positive_int, is_int


@dataclass
class CoresetConfig:
    """The options every selection shares. See ``docs/api.md`` for each in plain words."""

    coreset_size: int | None = None
    coreset_ratio: float | None = None
    keep_sources: Any = "auto"
    source_key: str | None = None
    micro_batch_size: int | None = None
    seed: int = 0
    temperature: float = 1.0
    distributed: Any = "auto"

    def __post_init__(self) -> None:
        if (self.coreset_size is None) == (self.coreset_ratio is None):
            raise ValueError("give exactly one of coreset_size (an int >= 1) or coreset_ratio (a float in (0, 1])")
        if self.coreset_size is not None:
            if not is_int(self.coreset_size):
                raise TypeError(f"coreset_size must be an int, got {type(self.coreset_size).__name__}")
            if self.coreset_size <= 0:
                raise ValueError(f"coreset_size must be >= 1, got {self.coreset_size}")
        if self.coreset_ratio is not None:
            if isinstance(self.coreset_ratio, bool) or not isinstance(self.coreset_ratio, (int, float)):
                raise TypeError(f"coreset_ratio must be a float, got {type(self.coreset_ratio).__name__}")
            if not 0.0 < float(self.coreset_ratio) <= 1.0:
                raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
            self.coreset_ratio = float(self.coreset_ratio)
        if self.keep_sources not in ("auto", None):
            if isinstance(self.keep_sources, (str, bytes)) or not isinstance(self.keep_sources, Iterable):
                raise ValueError(
                    f"keep_sources must be 'auto', None or a list of source ids, got {self.keep_sources!r}"
                )
            self.keep_sources = list(self.keep_sources)
        if self.source_key is not None and not isinstance(self.source_key, str):
            raise TypeError(f"source_key must be a str (a batch key) or None, got {self.source_key!r}")
        check_optional_positive_int("micro_batch_size", self.micro_batch_size)
        if not is_int(self.seed):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if (
            isinstance(self.temperature, bool)
            or not isinstance(self.temperature, (int, float))
            or not (self.temperature > 0 and not math.isnan(self.temperature))
        ):
            raise ValueError(
                f"temperature must be a float > 0 (1: the mixture as sampled, 2: temperature sampling, "
                f"float('inf'): every source equally), got {self.temperature!r}"
            )
        self.temperature = float(self.temperature)
        if not (isinstance(self.distributed, bool) or self.distributed == "auto"):
            raise ValueError(
                f"distributed must be 'auto' (select across ranks when torch.distributed is "
                f"initialized), True or False (select per rank), got {self.distributed!r}"
            )

    def budget(self, batch_size: int) -> int:
        """Examples to select from a batch of ``batch_size``: ``coreset_size`` or ceil(ratio * B)."""
        if self.coreset_size is not None:
            return self.coreset_size
        return max(1, math.ceil(self.coreset_ratio * batch_size - 1e-9))

    def to_dict(self) -> dict:
        return asdict(self)


CONFIG_OPTIONS = tuple(f.name for f in fields(CoresetConfig))
