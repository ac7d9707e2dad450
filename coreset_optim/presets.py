"""Named bundles of selection options: the project's default and CoLM's released configuration.

An option left out of ``CoresetOptimizer(...)`` takes its preset's value; an option given
explicitly always wins. See ``docs/selection_quality.md`` for the measurements behind "default".
"""

from __future__ import annotations

from typing import Any

SKETCH_MODES = ("auto", "exact", "zeroth_order", "projection")


class _FromPreset:
    """Sentinel default: "take this option from the preset"."""

    def __repr__(self) -> str:
        return "<from preset>"


FROM_PRESET: Any = _FromPreset()

PRESETS: dict[str, dict[str, Any]] = {
    # Chosen by benchmarks/finetune.py (docs/selection_quality.md#fine-tuning-benchmark): LoRA
    # fine-tuning of a pretrained base on a 7-source mixture, B = 64, 300 steps, 3 seeds, mixture
    # exact-match accuracy at k = 16: "loss" 0.871 +- 0.001, gradient matching 0.843 +- 0.013,
    # stratified random 0.833 +- 0.019, random 0.829 +- 0.018, batch B accumulated 0.904 +- 0.011;
    # with 8-bit AdamW 0.864 / 0.844 / 0.819; at k = 32 0.882 / 0.878 / 0.861. "loss" needs no
    # sketch pass (one no-grad forward of the batch). The sketch options below apply when
    # selection="gradient_matching" or "facility_location" is chosen. sketch="auto": top
    # coordinates ("exact") while the whole batch's sketch-layer activations fit in 4 blocks,
    # else a streamed CountSketch ("projection"; e.g. an lm_head at a 32k+ vocabulary), so that the
    # sketch pass stays near a plain step of k (docs/performance.md#real-shapes).
    "default": {
        "sketch": "auto",
        "normalize": "adam",
        "sketch_dim": 2560,
        "similarity": "l1",
        "selection": "loss",
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
