"""Training on the synthetic mixture: random k, coreset k of B (several configurations), batch B
by gradient accumulation. Held-out loss overall and per source, against steps and wall-clock.

Every method sees the same large batches (same model init and data order per seed); "random k"
trains on the first k examples of each (already shuffled) large batch; "accum B" accumulates the
large batch in micro-batches of k. Wall-clock is the time spent in training steps (evaluation
excluded), one thread: each method's seconds per step are measured round-robin against the
others (``lib.training.step_costs``, robust to load from other processes on a shared machine) and the
curves' time axis is step x seconds per step. "activation memory" is the largest number of bytes saved for backward by
one forward pass (parameters excluded): what gradient accumulation and coresets keep small.

Run: PYTHONPATH=. python benchmarks/training.py  (about 5-8 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lib.experiments  # noqa: E402, F401  (registers gradient_matching_unconstrained)
from lib.results import machine  # noqa: E402
from lib.summary import at_step, at_time, set_times  # noqa: E402
from lib.synthetic import answer_loss_fn, evaluate, overall, summarize, tiny_llama, write_results  # noqa: E402
from lib.synthetic import plot  # noqa: E402, F401  (examples/compare.py uses it from here)
from lib.options import add_run_options  # noqa: E402
from lib.training import BatchStream, Trainer, round_robin_costs, train  # noqa: E402

from coreset_optim import CoresetOptimizer  # noqa: E402
from coreset_optim.datasets.synthetic import make_mixture  # noqa: E402

# name -> (kind, CoresetOptimizer options, steps multiplier)
METHODS: dict[str, tuple[str, dict, float]] = {
    "random_k": ("random", {}, 5.0),
    "accum_B": ("accum", {}, 1.5),
    "batch_B": ("full", {}, 1.0),
    "accum_2B": ("accum2", {}, 1.0),
    "coreset_default": ("coreset", {}, 1.0),
    "coreset_colm": ("coreset", {"preset": "colm"}, 1.0),
    "coreset_fl_l1_adam": ("coreset", {"selection": "facility_location", "similarity": "l1", "normalize": "adam"}, 1.0),
    "coreset_fl_cosine": (
        "coreset",
        {"selection": "facility_location", "similarity": "cosine", "normalize": "adam"},
        1.0,
    ),
    "coreset_gm_projection": (
        "coreset",
        {
            "selection": "gradient_matching",
            "sketch": "projection",
            "sketch_modules": r"model\.layers\.1\..*_proj|lm_head",
        },
        1.0,
    ),
    "coreset_gm_unconstrained": ("coreset", {"selection": "gradient_matching_unconstrained"}, 1.0),
    "coreset_zo_fresh": ("coreset", {"sketch": "zeroth_order", "selection": "gradient_matching", "zo_probes": 1}, 1.0),
}


def make_trainer(method: str, seed: int, k: int, lr: float) -> Trainer:
    """``method``'s trainer: a fresh tiny Llama from ``seed``, AdamW and its training step
    ("accum2": the doubled batch 2B accumulated in micro-batches of k)."""
    kind, options, _ = METHODS[method]
    model = tiny_llama(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    wrapper = CoresetOptimizer(opt, model, coreset_size=k, seed=seed, **options) if kind == "coreset" else None
    factor = 2 if kind == "accum2" else 1
    return Trainer(
        "accum" if kind == "accum2" else kind, k, model, opt, answer_loss_fn(model), wrapper, batch_factor=factor
    )


def run(
    method: str,
    mixture,
    seed: int,
    steps: int,
    batch: int,
    k: int,
    lr: float,
    eval_every: int,
    progress=None,
    mult: float | None = None,
) -> dict:
    """Train ``method`` and evaluate every ``eval_every`` steps. Curve times are filled in later
    from the round-robin step costs (``step * seconds_per_step``); ``measured_time`` is this run's own."""
    trainer = make_trainer(method, seed, k, lr)
    total_steps = int(steps * (METHODS[method][2] if mult is None else mult))
    curve, _ = train(
        trainer,
        BatchStream(mixture.train, seed + 1),
        total_steps,
        batch,
        lambda model: evaluate(model, mixture),
        eval_every,
        None if progress is None else lambda step, total: progress(method, step, total),
    )
    return {
        "method": method,
        "seed": seed,
        "steps": total_steps,
        "curve": curve,
        "activation_bytes": trainer.meter.peak,
    }


def step_costs(methods, mixture, batch: int, k: int, lr: float, rounds: int = 12) -> dict:
    """Median seconds per training step of each method, measured round-robin (one step of each
    method in turn) so that load from other processes affects every method alike."""
    trainers = {m: make_trainer(m, 0, k, lr) for m in methods}
    return round_robin_costs(trainers, BatchStream(mixture.train, 12345), batch, rounds)


def interp(curve, t):
    """Held-out loss (mixture) at wall-clock ``t`` (linear between evaluations); None beyond the run."""
    return at_time(curve, t, overall)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_run_options(ap, steps=300)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument(
        "--methods", default=",".join(m for m in METHODS if m not in ("batch_B", "coreset_gm_unconstrained"))
    )
    ap.add_argument("--out", default="training")
    ap.add_argument("--mult", default="", help="override step multipliers, e.g. random_k=5,accum_B=2")
    args = ap.parse_args()
    mults = {kv.split("=")[0]: float(kv.split("=")[1]) for kv in args.mult.split(",") if kv}
    torch.set_num_threads(1)
    mixture = make_mixture(20000, 64, seed=0)
    runs = []
    seeds = [int(s) for s in args.seeds.split(",")]
    t_start = time.time()
    for seed in seeds:
        for m in args.methods.split(","):
            runs.append(
                run(m, mixture, seed, args.steps, args.batch, args.k, args.lr, args.eval_every, mult=mults.get(m))
            )
            r = runs[-1]
            print(
                f"seed {seed} {m}: loss {at_step(r['curve'], args.steps)['overall']:.3f}  "
                f"[{time.time() - t_start:.0f}s]",
                file=sys.stderr,
                flush=True,
            )
    costs = step_costs(args.methods.split(","), mixture, args.batch, args.k, args.lr)
    set_times(runs, costs)
    summary = summarize(runs, mixture, args.steps)
    write_results(
        args.out,
        {
            "args": vars(args),
            "machine": machine(),
            "methods": {m: {"kind": METHODS[m][0], **{k: str(v) for k, v in METHODS[m][1].items()}} for m in METHODS},
            "summary": summary,
            "runs": runs,
        },
        runs,
        summary,
        args,
    )


if __name__ == "__main__":
    main()
