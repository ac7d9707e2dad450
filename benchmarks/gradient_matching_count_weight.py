"""Does a stronger "count" coordinate help gradient matching keep the weights-sum-to-N contract?

``greedy_matching`` (gradient_matching.py) appends a constant coordinate ``lam = count_weight * mean row norm`` to every
atom, so the non-negative fit is asked (softly) to give weights that add up to n; the weights are
then rescaled to sum exactly to n. A large ``count_weight`` makes the sum a near-hard constraint
during the greedy choice itself (the best convex-combination fit); 0 leaves it free until the
rescale. This runs the gradient-matching measurement (same model, batches and error metric as
``gradient_matching.py``: ``lib/gradient_error.py``) with the default configuration at several
``count_weight`` values (``selection="gradient_matching_count_weight"``, ``lib/experiments.py``).

Run: python benchmarks/gradient_matching_count_weight.py  (about a minute on 2 CPU cores)
     -> benchmarks/results/gradient_matching_count_weight/gradient_matching_count_weight.{json,md,png}
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.gradient_error import main as measure  # noqa: E402

COUNT_WEIGHTS = (0.0, 1.0, 3.0, 10.0, 100.0)  # 1.0 is the library's default
METHODS: dict[str, dict] = {
    "random": dict(selection="random"),
    **{
        f"gm_count_weight_{cw:g}": dict(selection="gradient_matching_count_weight", count_weight=cw, normalize="adam")
        for cw in COUNT_WEIGHTS
    },
}


def main(argv=None) -> None:
    measure(argv, METHODS, "gradient_matching_count_weight", batches=20)


if __name__ == "__main__":
    main()
