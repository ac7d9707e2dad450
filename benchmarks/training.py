"""Training on the synthetic mixture: random k, coreset k of B (several configurations), batch B
by gradient accumulation. Held-out loss overall and per source, against steps and wall-clock.

Every method sees the same large batches (same model init and data order per seed); "random k"
trains on the first k examples of each (already shuffled) large batch; "accum B" accumulates the
large batch in micro-batches of k. Wall-clock is the time spent in training steps (evaluation
excluded), one thread: each method's seconds per step are measured round-robin against the
others (:func:`step_costs`, robust to load from other processes on a shared machine) and the
curves' time axis is step x seconds per step. "activation memory" is the largest number of bytes saved for backward by
one forward pass (parameters excluded): what gradient accumulation and coresets keep small.

Run: PYTHONPATH=. python benchmarks/training.py  (about 5-8 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    ActivationMeter,
    BatchStream,
    evaluate,
    machine,
    make_loss_fn,
    md_header,
    provenance,
    register_experiments,
    results_dir,
    save_json,
    tiny_llama,
)

from coreset_optim import CoresetOptimizer  # noqa: E402
from coreset_optim.datasets.synthetic import make_mixture  # noqa: E402

register_experiments()

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


class Trainer:
    """One method's model, optimizer and training step on a large batch."""

    def __init__(self, method: str, seed: int, k: int, lr: float):
        self.kind, options, _ = METHODS[method]
        self.k = k
        self.model = tiny_llama(seed)
        self.model.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=lr, weight_decay=0.0)
        self.meter = ActivationMeter(self.model)
        self.loss_fn = self.meter.wrap(make_loss_fn(self.model))
        self.wrapper = (
            CoresetOptimizer(self.opt, self.model, coreset_size=k, seed=seed, **options)
            if self.kind == "coreset"
            else None
        )

    def batch_size(self, batch: int) -> int:
        return 2 * batch if self.kind == "accum2" else batch

    def step(self, big: dict) -> None:
        k, loss_fn = self.k, self.loss_fn
        if self.kind == "random":
            loss_fn({key: v[:k] for key, v in big.items()}).mean().backward()
        elif self.kind == "full":
            loss_fn(big).mean().backward()
        elif self.kind in ("accum", "accum2"):
            n = big["input_ids"].shape[0]
            for start in range(0, n, k):
                part = {key: v[start : start + k] for key, v in big.items()}
                (loss_fn(part).sum() / n).backward()
        else:
            self.wrapper.select(big, loss_fn, sources=big["source"])
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def step_costs(methods, mixture, batch: int, k: int, lr: float, rounds: int = 12) -> dict:
    """Median seconds per training step of each method, measured round-robin (one step of each
    method in turn) so that load from other processes affects every method alike."""
    trainers = {m: Trainer(m, 0, k, lr) for m in methods}
    stream = BatchStream(mixture.train, 12345)
    times = {m: [] for m in methods}
    for r in range(rounds + 2):
        big = stream.next(2 * batch)
        for m, t in trainers.items():
            part = {key: v[: t.batch_size(batch)] for key, v in big.items()}
            t0 = time.perf_counter()
            t.step(part)
            if r >= 2:  # the first two rounds warm up (optimizer state, allocator)
                times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


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
    from :func:`step_costs` (``step * seconds_per_step``); ``measured_time`` is this run's own."""
    trainer = Trainer(method, seed, k, lr)
    total_steps = int(steps * (METHODS[method][2] if mult is None else mult))
    stream = BatchStream(mixture.train, seed + 1)
    curve = [{"step": 0, "measured_time": 0.0, **evaluate(trainer.model, mixture)}]
    spent = 0.0
    for step in range(1, total_steps + 1):
        big = stream.next(trainer.batch_size(batch))
        t0 = time.perf_counter()
        trainer.step(big)
        spent += time.perf_counter() - t0
        if step % eval_every == 0 or step == total_steps:
            curve.append({"step": step, "measured_time": spent, **evaluate(trainer.model, mixture)})
        if progress is not None:
            progress(method, step, total_steps)
    return {
        "method": method,
        "seed": seed,
        "steps": total_steps,
        "curve": curve,
        "activation_bytes": trainer.meter.peak,
    }


def set_times(runs, costs: dict) -> None:
    for r in runs:
        r["seconds_per_step"] = costs[r["method"]]
        for c in r["curve"]:
            c["time"] = c["step"] * costs[r["method"]]


def at_step(curve, step):
    return next(c for c in curve if c["step"] == step)


def interp(curve, t, key="overall"):
    """Loss at wall-clock ``t`` (linear between evaluations); None beyond the run."""
    if t > curve[-1]["time"]:
        return None
    for a, b in zip(curve, curve[1:]):
        if a["time"] <= t <= b["time"]:
            va = a[key] if key == "overall" else a["per_source"][key]
            vb = b[key] if key == "overall" else b["per_source"][key]
            f = 0.0 if b["time"] == a["time"] else (t - a["time"]) / (b["time"] - a["time"])
            return va + f * (vb - va)
    return curve[0][key] if key == "overall" else curve[0]["per_source"][key]


def summarize(runs, mixture, steps) -> dict:
    smallest = mixture.names[-1]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    out = {"smallest_source": smallest, "steps": steps, "methods": {}}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        final = [at_step(r["curve"], steps) for r in rs]
        out["methods"][m] = {
            "loss_at_steps": statistics.mean(f["overall"] for f in final),
            "loss_at_steps_per_seed": [f["overall"] for f in final],
            "smallest_at_steps": statistics.mean(f["per_source"][smallest] for f in final),
            "per_source_at_steps": {n: statistics.mean(f["per_source"][n] for f in final) for n in mixture.names},
            "time_to_steps": statistics.mean(at_step(r["curve"], steps)["time"] for r in rs),
            "median_step_ms": 1000 * rs[0]["seconds_per_step"],
            "activation_mib": max(r["activation_bytes"] for r in rs) / 2**20,
        }
    ms = out["methods"]
    if "random_k" in ms and "accum_B" in ms:
        lr_, lb = ms["random_k"]["loss_at_steps"], ms["accum_B"]["loss_at_steps"]
        for m, s in ms.items():
            s["gap_closure"] = (lr_ - s["loss_at_steps"]) / (lr_ - lb) if lr_ != lb else None
            # Equal wall-clock: the others' loss at this method's time to `steps` (same seed).
            eq = {}
            for other in ("random_k", "accum_B"):
                vals = []
                for r in (r for r in runs if r["method"] == m):
                    o = next(x for x in runs if x["method"] == other and x["seed"] == r["seed"])
                    v = interp(o["curve"], at_step(r["curve"], steps)["time"])
                    vals.append(v)
                eq[other] = None if any(v is None for v in vals) else statistics.mean(vals)
            s["at_equal_time"] = eq
    return out


def markdown(summary, args) -> str:
    sm = summary["smallest_source"]
    lines = [
        f"# Training: B={args.batch}, k={args.k}, {args.steps} steps, seeds {args.seeds}, lr {args.lr}",
        "",
        f"Held-out loss (mixture-weighted) after {args.steps} steps, mean over seeds; gap closure = "
        "(L_random - L) / (L_random - L_accumB); 'at equal time' = loss of random k / accum B at this "
        "method's wall-clock for its steps (interpolated; n/a when that run was shorter).",
        "",
        f"| method | loss | gap closure | {sm} (smallest) | ms/step | time to {args.steps} steps (s) | "
        "activation MiB | random k at equal time | accum B at equal time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, s in sorted(summary["methods"].items(), key=lambda t: t[1]["loss_at_steps"]):
        eq = s.get("at_equal_time", {})
        f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        gc = s.get("gap_closure")
        lines.append(
            f"| {m} | {s['loss_at_steps']:.3f} | {'' if gc is None else f'{gc:.2f}'} | {s['smallest_at_steps']:.3f} | "
            f"{s['median_step_ms']:.1f} | {s['time_to_steps']:.1f} | {s['activation_mib']:.2f} | "
            f"{f(eq.get('random_k'))} | {f(eq.get('accum_B'))} |"
        )
    names = list(next(iter(summary["methods"].values()))["per_source_at_steps"])
    lines += [
        "",
        "## Per source after the steps (mean over seeds)",
        "",
        "| method | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    for m, s in sorted(summary["methods"].items(), key=lambda t: t[1]["loss_at_steps"]):
        lines.append(f"| {m} | " + " | ".join(f"{s['per_source_at_steps'][n]:.3f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def plot(runs, summary, path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sm = summary["smallest_source"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    methods = list(summary["methods"])
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        n = min(len(r["curve"]) for r in rs)
        pts = list(zip(*[r["curve"][:n] for r in rs]))
        xs = [p[0]["step"] for p in pts]
        ts = [statistics.mean(c["time"] for c in p) for p in pts]
        ys = [statistics.mean(c["overall"] for c in p) for p in pts]
        ys_small = [statistics.mean(c["per_source"][sm] for c in p) for p in pts]
        axes[0].plot(xs, ys, label=m, color=colors[m])
        axes[1].plot(ts, ys, label=m, color=colors[m])
        axes[2].plot(xs, ys_small, label=m, color=colors[m])
    axes[0].set(xlabel="step", ylabel="held-out loss (mixture)", title="vs steps", yscale="log")
    axes[1].set(
        xlabel="training wall-clock (s, 1 thread)",
        ylabel="held-out loss (mixture)",
        title="vs wall-clock",
        yscale="log",
    )
    axes[2].set(xlabel="step", ylabel=f"held-out loss ({sm})", title=f"smallest source ({sm}) vs steps")
    for ax in axes:
        ax.axvline(steps, color="gray", ls=":", lw=0.8) if ax is not axes[1] else None
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lr", type=float, default=3e-3)
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


def write_results(out: str, payload: dict, runs: list, summary: dict, args, script: str = "training") -> None:
    """``out``.json (payload), .md (table) and .png (curves) under benchmarks/results/<script>/."""
    folder = results_dir(script)
    produced_by = provenance(script)
    save_json(folder / f"{out}.json", {"produced_by": produced_by, **payload}, script)
    (folder / f"{out}.md").write_text(md_header(produced_by) + markdown(summary, args))
    plot(runs, summary, folder / f"{out}.png", args.steps)
    print(markdown(summary, args))


if __name__ == "__main__":
    main()
