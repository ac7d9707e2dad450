"""Target-aware selection on the fine-tuning benchmark: the table the issue asks for.

Reads the JSON files benchmarks/finetune.py wrote in benchmarks/results/finetune/ (runs of the same
seeds and batches; later files add methods), and writes
benchmarks/results/target_report/target_quality.md: accuracy on the held-out tasks
(the target: not training sources; their target split is disjoint from their evaluation split),
per task and averaged, next to mixture-weighted and macro accuracy over the training sources,
mean +- sd over seeds (and per seed), at equal steps.

    PYTHONPATH=$PWD python benchmarks/target_report.py finetune_target [finetune_target_spread ...]
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.results import md_header, provenance, results_dir  # noqa: E402


def final(run: dict) -> dict:
    return run["curve"][-1]


def stats(xs: list[float]) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return f"{statistics.mean(xs):.3f} ± {sd:.3f} ({' / '.join(f'{x:.3f}' for x in xs)})"


def main(names: list[str]) -> None:
    runs, costs, held_out, args = [], {}, None, None
    for name in names:
        data = json.loads((results_dir("finetune") / f"{name}.json").read_text())
        runs += data["runs"]
        costs.update(data["costs_seconds_per_step"])
        held_out = data["mixture"]["held_out"]
        args = args or data["args"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    rows = []
    for m in methods:
        rs = sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])
        per_task = {t: [final(r)["accuracy"][t] for r in rs] for t in held_out}
        target = [statistics.mean(final(r)["accuracy"][t] for t in held_out) for r in rs]
        target_loss = [statistics.mean(final(r)["loss"][t] for t in held_out) for r in rs]
        rows.append((m, rs, per_task, target, target_loss))
    rows.sort(key=lambda row: -statistics.mean(row[3]))
    lines = [
        f"# Target-aware selection: held-out tasks as the target (B={args['batch']}, k={args['k']}, "
        f"{args['steps']} steps, seeds {args['seeds']}, LoRA r={args['rank']}, {args['optimizer']}, lr {args['lr']})",
        "",
        f"Target: the target split of the held-out tasks {held_out} ({args['target_size']} examples each), "
        "disjoint from their evaluation split; they are not training sources. Accuracy: exact match on "
        f"{args['eval_size']} evaluation examples per task, after {args['steps']} steps (equal steps), "
        "mean ± sd over seeds (per seed in brackets). Mixture / macro: over the training sources. "
        "Options of each method: `ARMS` in benchmarks/lib/finetune.py (`target`, `target_h*`, "
        "`target_last_block`, `target_spread`: one greedy over the batch; `*_per_source`: per-source "
        "budgets, the default; `target_spread` aims at 8 examples of each training source instead).",
        "",
        "| method | target tasks accuracy (mean) | "
        + " | ".join(held_out)
        + " | target tasks answer loss | accuracy mixture | accuracy macro | ms/step |",
        "|---" * (6 + len(held_out)) + "|",
    ]
    for m, rs, per_task, target, target_loss in rows:
        mix = [final(r)["accuracy_mixture"] for r in rs]
        mac = [final(r)["accuracy_macro"] for r in rs]
        lines.append(
            f"| {m} | {stats(target)} | "
            + " | ".join(stats(per_task[t]) for t in held_out)
            + f" | {stats(target_loss)} | {stats(mix)} | {stats(mac)} | {1000 * costs.get(m, float('nan')):.0f} |"
        )
    out = results_dir("target_report")
    out.mkdir(parents=True, exist_ok=True)
    (out / "target_quality.md").write_text(md_header(provenance("target_report")) + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:] or ["finetune_target"])
