"""Named bundles of selection options: the project's default and CoLM's released configuration.

An option left out of ``CoresetOptimizer(...)`` takes its preset's value; an option given
explicitly always wins. See ``docs/selection_quality.md`` for the measurements behind "default".
"""

from __future__ import annotations

from typing import Any

SKETCH_MODES = ("exact", "zeroth_order", "projection")


class _FromPreset:
    """Sentinel default: "take this option from the preset"."""

    def __repr__(self) -> str:
        return "<from preset>"


FROM_PRESET: Any = _FromPreset()

PRESETS: dict[str, dict[str, Any]] = {
    # Chosen by benchmarks/selection_quality (docs/selection_quality.md).
    "default": {
        "sketch": "exact",
        "normalize": "adam",
        "sketch_dim": 2560,
        "similarity": "l1",
        "selection": "gradient_matching",
        "keep_sources": "auto",
        "zo_fixed_direction": False,
        "temperature": 1.0,
    },
    # CoLM's released script: SPSA sketch of the last v_proj along one direction fixed for the
    # run, CoLM's per-example Adam-update transform, top-2560 coordinates per source, L1 facility
    # location with cluster-size weights, small sources kept whole.
    "colm": {
        "sketch": "zeroth_order",
        "normalize": "adam_update",
        "sketch_dim": 2560,
        "similarity": "l1",
        "selection": "facility_location",
        "keep_sources": "auto",
        "zo_fixed_direction": True,
        "temperature": 1.0,
    },
}


def resolve_preset(preset: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with every ``FROM_PRESET`` value replaced by ``preset``'s value."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    values = PRESETS[preset]
    return {k: (values[k] if v is FROM_PRESET else v) for k, v in options.items()}
