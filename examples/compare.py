"""A short version of benchmarks/training.py: what a coreset buys on a data mixture.

Trains a tiny Llama (random init, 2 CPU threads at most) on a 7-source synthetic mixture with:
a random batch of k, a coreset of k chosen from B (this library's default, and CoLM's published
configuration via preset="colm"), and batch B (accumulated in micro-batches of k, and in one
piece). Prints a table (held-out loss overall and for the smallest source, activation memory,
time per step) and saves a PNG; its progress bar shows the elapsed time.

    python examples/compare.py [--steps 200] [--out compare.png]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from training import at_step, interp, plot, run, set_times, step_costs, summarize  # noqa: E402

from coreset_optim.datasets.synthetic import make_mixture  # noqa: E402

METHODS = ["random_k", "coreset_default", "coreset_colm", "accum_B", "batch_B"]
LABELS = {
    "random_k": "random k",
    "coreset_default": "coreset k of B (default)",
    "coreset_colm": "coreset k of B (preset='colm')",
    "accum_B": "batch B, accumulated",
    "batch_B": "batch B, one piece",
}


class Progress:
    """A one-line text progress bar on stderr (no dependency)."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.time()

    def __call__(self, method: str, step: int, steps: int) -> None:
        self.done += 1
        if step % 10 and step != steps:
            return
        frac = self.done / self.total
        bar = "#" * int(30 * frac)
        print(
            f"\r[{bar:<30}] {100 * frac:5.1f}%  {LABELS[method]:<32} step {step:4d}/{steps}  "
            f"{time.time() - self.start:5.0f}s",
            end="",
            file=sys.stderr,
            flush=True,
        )


def compare(
    steps: int = 200, batch: int = 64, k: int = 16, seed: int = 0, out: str | Path = "compare.png", lr: float = 3e-3
) -> dict:
    """Run the comparison, print the table, save the plot; returns the summary dict."""
    torch.set_num_threads(min(2, torch.get_num_threads()))
    mixture = make_mixture(20000, 64, seed=0)
    mult = {"random_k": 4.0, "accum_B": 1.5, "batch_B": 2.0}
    progress = Progress(sum(int(steps * mult.get(m, 1.0)) for m in METHODS))
    runs = [
        run(m, mixture, seed, steps, batch, k, lr, max(10, steps // 10), progress, mult=mult.get(m, 1.0))
        for m in METHODS
    ]
    print("\nmeasuring time per step (methods in turn) ...", file=sys.stderr)
    set_times(runs, step_costs(METHODS, mixture, batch, k, lr, rounds=8))
    summary = summarize(runs, mixture, steps)
    sm = summary["smallest_source"]
    rows = [("method", "eval loss", f"{sm} (smallest)", "activation MiB", "ms/step", "loss at coreset's time")]
    t_core = at_step(next(r for r in runs if r["method"] == "coreset_default")["curve"], steps)["time"]
    for m in METHODS:
        s = summary["methods"][m]
        same_time = interp(next(r for r in runs if r["method"] == m)["curve"], t_core)
        rows.append(
            (
                LABELS[m],
                f"{s['loss_at_steps']:.3f}",
                f"{s['smallest_at_steps']:.3f}",
                f"{s['activation_mib']:.2f}",
                f"{s['median_step_ms']:.1f}",
                "n/a (run shorter)" if same_time is None else f"{same_time:.3f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(
        f"\nB={batch}, k={k}, {steps} steps, seed {seed}; held-out loss after {steps} steps "
        f"(random k and batch B also ran longer, for the equal-time column)"
    )
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(runs, summary, out, steps)
    print(f"\nplot saved to {out}")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="compare.png")
    args = ap.parse_args()
    compare(args.steps, args.batch, args.k, args.seed, args.out)


if __name__ == "__main__":
    main()
