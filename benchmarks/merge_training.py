"""Merge training runs made in separate invocations of training.py into one table and plot.

Runs of a method come from the first file that has them; seconds per step come from the main file's
round-robin measurement; a method measured only in another file gets its own seconds per step
scaled by (main accum_B / that file's accum_B), so all costs are relative to the same yardstick.

The files are read from benchmarks/results/training/ (where training.py writes); the merge goes to
benchmarks/results/merge_training/.

Run: PYTHONPATH=. python benchmarks/merge_training.py main.json other.json ... --out training_all
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.results import results_dir  # noqa: E402
from lib.summary import set_times  # noqa: E402
from lib.synthetic import summarize, write_results  # noqa: E402

from coreset_optim.datasets.synthetic import make_mixture  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("files", nargs="+", help="training JSON files; the first is the main one")
    ap.add_argument("--prefer", default="", help="methods whose runs are taken from the LAST file having them")
    ap.add_argument("--out", default="training_all")
    args = ap.parse_args()
    data = [json.loads((results_dir("training") / f).read_text()) for f in args.files]
    prefer = set(filter(None, args.prefer.split(",")))
    main_costs = {r["method"]: r["seconds_per_step"] for r in data[0]["runs"]}
    runs, costs, sources = [], dict(main_costs), {}
    for i, d in enumerate(data):
        own = {r["method"]: r["seconds_per_step"] for r in d["runs"]}
        scale = main_costs["accum_B"] / own["accum_B"]
        for m in dict.fromkeys(r["method"] for r in d["runs"]):
            if m not in sources or m in prefer:
                sources[m] = i
            costs.setdefault(m, own[m] * scale)
    for m, i in sources.items():
        runs += [r for r in data[i]["runs"] if r["method"] == m]
    set_times(runs, costs)
    args0 = argparse.Namespace(**data[0]["args"])
    mixture = make_mixture(20000, 64, seed=0)
    summary = summarize(runs, mixture, args0.steps)
    write_results(
        args.out,
        {
            "merged_from": args.files,
            "run_source": {m: args.files[i] for m, i in sources.items()},
            "summary": summary,
            "costs": costs,
        },
        runs,
        summary,
        args0,
        script="merge_training",
    )


if __name__ == "__main__":
    main()
