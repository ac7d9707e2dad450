"""How well does each selection match the large batch's gradient, along a training run?

A tiny Llama (random init, full training) is trained on large batches B of the synthetic mixture
with AdamW. At each of ``--batches`` steps (after ``--warmup``) every method picks k of the B
examples through ``CoresetOptimizer.select`` (the real code path) and we measure

    error = || sum_j w_j g_j / N  -  mean_i g_i || / || mean_i g_i ||

over ALL trainable parameters, in the Adam-normalized space of the optimizer at that step
(g / (sqrt(v_hat) + eps)), with exact per-example gradients from a batch-size-1 loop. Also the
same error restricted to each source, and coverage (sources present that got >= 1 example).
"bound" runs greedy matching directly on the all-parameter normalized gradients (too costly to
use in training: it needs every example's full gradient). "*unconstrained" methods use GradMatch's
raw non-negative least-squares weights, which need not sum to the batch count: they break the
coreset contract and are here to measure what the contract costs.

Run: PYTHONPATH=. python benchmarks/gradient_matching.py  (about 3-5 minutes on 2 CPU cores)
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.gradient_error import main as measure  # noqa: E402

LAST_LAYER = r"model\.layers\.1\..*_proj|lm_head"
METHODS: dict[str, dict] = {
    "random": dict(selection="random"),
    "loss": dict(selection="loss"),
    "fl_l1_adam": dict(selection="facility_location", similarity="l1", normalize="adam"),
    "fl_l1_adam_update": dict(selection="facility_location", similarity="l1", normalize="adam_update"),
    "fl_cosine_adam": dict(selection="facility_location", similarity="cosine", normalize="adam"),
    "colm_preset": dict(preset="colm"),
    "zo1_gm_adam": dict(sketch="zeroth_order", zo_probes=1, selection="gradient_matching", normalize="adam"),
    "zo4_gm_adam": dict(sketch="zeroth_order", zo_probes=4, selection="gradient_matching", normalize="adam"),
    "gm_adam": dict(selection="gradient_matching", normalize="adam"),
    "gm_adam_update": dict(selection="gradient_matching", normalize="adam_update"),
    "gm_unconstrained": dict(selection="gradient_matching_unconstrained", normalize="adam"),
    "gm_unconstrained_lastlayer_projection": dict(
        selection="gradient_matching_unconstrained",
        normalize="adam",
        sketch_modules=LAST_LAYER,
        sketch="projection",
        sketch_dim=2560,
    ),
    "gm_adam_keep_none": dict(selection="gradient_matching", normalize="adam", keep_sources=None),
    "gm_adam_v_proj": dict(
        selection="gradient_matching", normalize="adam", sketch_modules="model.layers.1.self_attn.v_proj"
    ),
    "gm_adam_lastlayer_topk": dict(
        selection="gradient_matching", normalize="adam", sketch_modules=LAST_LAYER, sketch_dim=2560
    ),
    "gm_adam_lastlayer_projection": dict(
        selection="gradient_matching", normalize="adam", sketch_modules=LAST_LAYER, sketch="projection", sketch_dim=2560
    ),
    "fl_cosine_lastlayer_projection": dict(
        selection="facility_location",
        similarity="cosine",
        normalize="adam",
        sketch_modules=LAST_LAYER,
        sketch="projection",
        sketch_dim=2560,
    ),
}


def main(argv=None) -> None:
    measure(argv, METHODS, "gradient_matching")


if __name__ == "__main__":
    main()
