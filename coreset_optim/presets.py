"""Named bundles of selection options: the project's default and CoLM's released configuration.

A preset names a selection method and the options where it departs from that method's own
defaults (the defaults live once, in the method's dataclass fields). An option left out of
``CoresetOptimizer(...)`` takes its preset's value; an option given explicitly always wins.
See ``docs/selection_quality.md`` for the measurements behind "default".
"""

from __future__ import annotations

from typing import Any


class _FromPreset:
    """Sentinel default: "take this option from the preset"."""

    def __repr__(self) -> str:
        return "<from preset>"


FROM_PRESET: Any = _FromPreset()
DEFAULT_PRESET = "default"

PRESETS: dict[str, dict[str, Any]] = {
    # Chosen by benchmarks/finetune.py with and without label noise (docs/selection_quality.md,
    # "Label noise"; benchmarks/results/finetune/noise_table.md): LoRA fine-tuning of a pretrained
    # base on a 7-source mixture, B = 64, k = 16, 150 steps, 3 seeds, clean held-out mixture
    # exact-match accuracy. "consensus_loss" (the highest losses among the examples whose
    # Adam-normalized sketch agrees with their source's, one vote per example): clean 0.833 (loss
    # 0.847, stratified random 0.797, random 0.788, batch B accumulated 0.871; at 300 steps 0.863
    # vs loss 0.870); 20 % of answers wrong: random tokens 0.809, swapped within a source 0.782,
    # another task's 0.753, where "loss" (the default before) falls to 0.209 / 0.007 / 0.070 and
    # random k is at 0.748 / 0.730 / 0.624. At 40 % wrong answers in a source it collapses too
    # (0.02-0.46; random k 0.42-0.71): for such data use selection="random". It needs the sketch
    # pass (a forward of the batch with a backward to the sketch layer). sketch="auto": top
    # coordinates ("exact") while the whole batch's sketch-layer activations fit in 4 blocks,
    # else a streamed CountSketch ("projection"; e.g. an lm_head at a 32k+ vocabulary), so that
    # the sketch pass stays near a plain step of k (docs/performance.md, "Real shapes").
    # Its options are ConsensusLoss's own defaults (coreset_optim/methods/base.py, SketchedMethod).
    "default": {"selection": "consensus_loss"},
    # CoLM's released script: SPSA sketch of the last v_proj along one direction fixed for the
    # run, CoLM's per-example Adam-update transform, top-2560 coordinates per source, L1 facility
    # location with cluster-size weights, small sources kept whole.
    # (the top-coordinate count and the L1 similarity are FacilityLocation's own defaults; small
    # sources kept whole is CoresetConfig's keep_sources default.)
    "colm": {
        "selection": "facility_location",
        "sketch": "zeroth_order",
        "normalize": "adam_update",
        "zo_fixed_direction": True,
    },
}
