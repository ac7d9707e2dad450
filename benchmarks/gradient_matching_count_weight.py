"""Does a stronger "count" coordinate help gradient matching keep the weights-sum-to-N contract?

``greedy_matching`` (gradient_matching.py) appends a constant coordinate ``lam = count_weight * mean row norm`` to every
atom, so the non-negative fit is asked (softly) to give weights that add up to n; the weights are
then rescaled to sum exactly to n. A large ``count_weight`` makes the sum a near-hard constraint
during the greedy choice itself (the best convex-combination fit); 0 leaves it free until the
rescale. This runs the gradient-matching benchmark (same model, batches and error metric as
``gradient_matching.py``) with the default configuration at several ``count_weight`` values.

Run: python benchmarks/gradient_matching_count_weight.py  (about a minute on 2 CPU cores)
     -> benchmarks/results/gradient_matching_count_weight/gradient_matching_count_weight.{json,md,png}
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gradient_matching  # noqa: E402
from common import results_dir  # noqa: E402

from coreset_optim.methods.gradient_matching import gradient_matching_coreset, GradientMatching
from coreset_optim.methods.registry import register_method

COUNT_WEIGHTS = (0.0, 1.0, 3.0, 10.0, 100.0)  # 1.0 is the library's default


def _choose(x, k, *, count_weight, **context):
    return gradient_matching_coreset(x, k, count_weight=count_weight, **context)


def main() -> None:
    names = ["random"]
    for cw in COUNT_WEIGHTS:
        name = f"gm_count_weight_{cw:g}"
        choose = staticmethod(partial(_choose, count_weight=cw))
        register_method(type(name, (GradientMatching,), {"name": name, "choose": choose}))
        gradient_matching.METHODS[name] = dict(selection=name, normalize="adam")
        names.append(name)
    gradient_matching.SCRIPT = "gradient_matching_count_weight"
    gradient_matching.RESULTS = results_dir(gradient_matching.SCRIPT)
    defaults = ["--batches", "20", "--methods", ",".join(names), "--out", "gradient_matching_count_weight"]
    sys.argv[1:] = defaults + sys.argv[1:]  # later flags win
    gradient_matching.main()


if __name__ == "__main__":
    main()
