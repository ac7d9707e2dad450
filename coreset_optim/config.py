"""The options of :class:`~coreset_optim.CoresetOptimizer`, checked once, saved in checkpoints."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from .normalize import NORMALIZE_MODES
from .presets import PRESETS, SKETCH_MODES
from .selection import SELECTORS
from .similarity import SIMILARITIES
from .streaming import DEFAULT_BLOCK_BYTES


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_optional_positive_int(name: str, value: Any) -> None:
    if value is not None and (not _is_int(value) or value <= 0):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


@dataclass
class CoresetConfig:
    """Every option that shapes a selection. See ``docs/api.md`` for each in plain words."""

    coreset_size: int | None = None
    coreset_ratio: float | None = None
    sketch_dim: int = 2560
    normalize: str | None = "adam"
    similarity: str = "l1"
    keep_sources: Any = "auto"
    source_key: str | None = None
    sketch_batch_size: int | None = None
    sketch_block_bytes: int = DEFAULT_BLOCK_BYTES
    micro_batch_size: int | None = None
    seed: int = 0
    sketch: str = PRESETS["default"]["sketch"]
    zo_eps: float = 1e-3
    zo_probes: int = 1
    zo_fixed_direction: bool = False
    selection: str = PRESETS["default"]["selection"]
    temperature: float = 1.0
    distributed: Any = "auto"
    target_curvature: float = 0.0
    target_refresh: int = 1
    target_per_source: bool = False

    def __post_init__(self) -> None:
        if (self.coreset_size is None) == (self.coreset_ratio is None):
            raise ValueError("give exactly one of coreset_size (an int >= 1) or coreset_ratio (a float in (0, 1])")
        if self.coreset_size is not None:
            if not _is_int(self.coreset_size):
                raise TypeError(f"coreset_size must be an int, got {type(self.coreset_size).__name__}")
            if self.coreset_size <= 0:
                raise ValueError(f"coreset_size must be >= 1, got {self.coreset_size}")
        if self.coreset_ratio is not None:
            if isinstance(self.coreset_ratio, bool) or not isinstance(self.coreset_ratio, (int, float)):
                raise TypeError(f"coreset_ratio must be a float, got {type(self.coreset_ratio).__name__}")
            if not 0.0 < float(self.coreset_ratio) <= 1.0:
                raise ValueError(f"coreset_ratio must be in (0, 1], got {self.coreset_ratio}")
            self.coreset_ratio = float(self.coreset_ratio)
        if not _is_int(self.sketch_dim) or self.sketch_dim <= 0:
            raise ValueError(f"sketch_dim must be a positive int, got {self.sketch_dim!r}")
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {self.normalize!r}")
        if self.similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {self.similarity!r}")
        if self.keep_sources not in ("auto", None):
            if isinstance(self.keep_sources, (str, bytes)) or not isinstance(self.keep_sources, Iterable):
                raise ValueError(
                    f"keep_sources must be 'auto', None or a list of source ids, got {self.keep_sources!r}"
                )
            self.keep_sources = list(self.keep_sources)
        if self.source_key is not None and not isinstance(self.source_key, str):
            raise TypeError(f"source_key must be a str (a batch key) or None, got {self.source_key!r}")
        _check_optional_positive_int("sketch_batch_size", self.sketch_batch_size)
        _check_optional_positive_int("micro_batch_size", self.micro_batch_size)
        if not _is_int(self.sketch_block_bytes) or self.sketch_block_bytes <= 0:
            raise ValueError(
                f"sketch_block_bytes must be a positive int (bytes for one block of per-example "
                f"gradients, e.g. 64 * 2**20), got {self.sketch_block_bytes!r}"
            )
        if not _is_int(self.seed):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if self.sketch not in SKETCH_MODES:
            raise ValueError(f"sketch must be one of {SKETCH_MODES}, got {self.sketch!r}")
        if self.selection not in SELECTORS:
            raise ValueError(f"selection must be one of {tuple(SELECTORS)}, got {self.selection!r}")
        if (
            isinstance(self.zo_eps, bool)
            or not isinstance(self.zo_eps, (int, float))
            or not (math.isfinite(self.zo_eps) and self.zo_eps > 0)
        ):
            raise ValueError(f"zo_eps must be a positive finite float (e.g. 1e-3), got {self.zo_eps!r}")
        self.zo_eps = float(self.zo_eps)
        if not _is_int(self.zo_probes) or self.zo_probes <= 0:
            raise ValueError(f"zo_probes must be a positive int (directions per step), got {self.zo_probes!r}")
        if not isinstance(self.zo_fixed_direction, bool):
            raise TypeError(f"zo_fixed_direction must be a bool, got {self.zo_fixed_direction!r}")
        if self.zo_fixed_direction and self.zo_probes != 1:
            raise ValueError(
                "zo_probes > 1 with zo_fixed_direction=True would repeat one direction; "
                "use zo_probes=1 or zo_fixed_direction=False"
            )
        if (
            isinstance(self.target_curvature, bool)
            or not isinstance(self.target_curvature, (int, float))
            or not (math.isfinite(self.target_curvature) and self.target_curvature >= 0)
        ):
            raise ValueError(
                "target_curvature must be a finite float >= 0 (0: first-order gains only), "
                f"got {self.target_curvature!r}"
            )
        self.target_curvature = float(self.target_curvature)
        if not _is_int(self.target_refresh) or self.target_refresh <= 0:
            raise ValueError(
                "target_refresh must be a positive int (selections between target-gradient refreshes), "
                f"got {self.target_refresh!r}"
            )
        if not isinstance(self.target_per_source, bool):
            raise TypeError(f"target_per_source must be a bool, got {self.target_per_source!r}")
        if self.selection == "target" and self.normalize == "adam_update":
            raise ValueError(
                "selection='target' models the step as the gradient times Adam's current "
                "preconditioner (normalize='adam', or None for SGD-like optimizers); "
                "normalize='adam_update' is a per-example update with the momentum inside: use 'adam'"
            )
        if self.selection == "target" and self.sketch not in ("auto", "exact"):
            raise ValueError(
                f"selection='target' needs exact sketches (the target's gradient is compared with each "
                f"example's on the same coordinates); got sketch={self.sketch!r}: use sketch='exact' (or 'auto')"
            )
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
