"""Fine-tuning benchmark: LoRA on a pretrained base, an imbalanced 7-source mixture, per-source
exact-match accuracy. Random k, stratified / balanced / temperature random k, batch B (accumulated
in chunks of k, and in one piece) and the coreset configurations, on the same batches.

Every method of a seed starts from the same base and LoRA initialisation and sees the same large
batches (drawn uniformly from the pool). "random k" trains on the first k examples of each large
batch (unweighted mean); "balanced k" / "temperature k" pick k of the large batch with per-source
budgets from :func:`coreset_optim.mixture.budget.tempered_split` (T = inf / 2), unweighted mean: the
rebalancing baselines for the macro metric; "stratified k" is ``selection="random"``: the
coreset's per-source budgets and kept sources, random examples, unbiased weights.

Metrics on held-out sets (200 per source and per held-out task): exact match of the greedy answer
and answer loss, per source, mixture-weighted (the training shares) and macro (each source once).
Wall-clock: each method's seconds per step measured round-robin (one step of each in turn, robust
to load from other processes) times the step count. Activation memory: the largest number of bytes
one forward pass saves for backward (parameters excluded).

Add a method: ``ARMS["name"] = Arm("coreset", {CoresetOptimizer options}, target=...)`` in
``lib/finetune.py`` (an experimental selection method: a class in ``lib/experiments.py``, registered
with ``register_method``); ``target`` names the held-out batch of a target method
(``selection.set_target``): ``"target_split"`` is the held-out tasks' target split (a batch with
input_ids/labels), disjoint from their evaluation split.

Label noise (``--noise MODEL --noise-rate R --noise-placement per_source|concentrated``): wrong answers
in the training pool only (:mod:`coreset_optim.datasets.noise`); scores stay on the clean held-out data,
and the results are saved under a name that carries the settings (``finetune_noise-random_tokens-0.2``).
Every training row carries its pool row in ``index`` (sliced with the batch, never given to the model),
and ``ctx.corrupted`` marks the pool rows with wrong answers: what a report of rejected rows needs.

Run: PYTHONPATH=. python benchmarks/finetune.py            (the full benchmark)
     PYTHONPATH=. python benchmarks/finetune.py --quick    (a few minutes)
     PYTHONPATH=. python benchmarks/finetune.py --quick --noise random_tokens --noise-rate 0.2
     PYTHONPATH=. python benchmarks/finetune.py --check [settings]   (the set-up's invariants, no training)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lib.experiments  # noqa: E402, F401  (registers the experimental selection methods)
from lib.finetune import (  # noqa: E402
    ARMS,
    add_setup_options,
    build_context,
    check_noise_in_pool_only,
    check_rows_keep_their_index,
    evaluate,
    lora_model,  # noqa: F401  (examples/demo.py uses it from here)
    make_trainer,
    noise_record,
    noise_settings,
)
from lib.results import machine, md_header, results_dir, save_json, table_head  # noqa: E402
from lib.summary import at_step, at_time, fmt, mean_curve, mean_sd, paired, set_times  # noqa: E402
from lib.training import BatchStream, round_robin_costs, train  # noqa: E402
from lib.workers import collect  # noqa: E402

from coreset_optim.datasets.noise import NOISE_MODELS, PLACEMENTS, check_noise  # noqa: E402
from coreset_optim.datasets.tasks import FinetuneMixture  # noqa: E402

RESULTS = results_dir("finetune")  # benchmarks/results/finetune/ (--results)
# Run order (most needed first, so a run cut short loses the least needed).
FULL_SET = [
    "random_k",
    "default",
    "stratified_k",
    "accum_B",
    "gradient_matching",
    "balanced_k",
    "temperature2_k",
    "temperature2_stratified",
    "balanced_stratified",
    "balanced_gm",
    "batch_B",
    "colm",
    "default_8bit",
    "gm_8bit",
    "random_k_8bit",
    "stratified_k_8bit",
    "accum_B_8bit",
    "default_k32",
    "gm_k32",
    "random_k32",
    "stratified_k32",
    "gm_last_block",
    "gm_uniform_within",
    "fl_l1",
    "fl_cosine",
    "temperature2_gm",
    "gm_unconstrained",
    "gm_no_keep",
]
# Runs made before the default became selection="loss" (the JSON of 2026-11-30): their names then.
RENAMED = {
    "default": "gradient_matching",
    "default_8bit": "gm_8bit",
    "default_k32": "gm_k32",
    "default_last_block": "gm_last_block",
    "default_no_keep": "gm_no_keep",
    "balanced_default": "balanced_gm",
    "temperature2_default": "temperature2_gm",
    "loss": "default",
    "loss_8bit": "default_8bit",
    "loss_k32": "default_k32",
}
PLOTTED = [
    "random_k",
    "stratified_k",
    "balanced_k",
    "temperature2_k",
    "gradient_matching",
    "default",
    "accum_B",
    "batch_B",
]
QUICK_SET = ["random_k", "stratified_k", "balanced_k", "accum_B", "default"]


def run(name: str, seed: int, args, progress: Callable | None = None) -> dict:
    """Train arm ``name`` from the base with ``seed``; evaluate every ``eval_every`` steps.
    ``progress(name, step, total)`` is called after every step."""
    torch.set_num_threads(1)
    ctx = build_context(args)
    arm = ARMS[name]
    trainer = make_trainer(arm, seed, ctx)
    total = int(round(args.steps * arm.steps)) if args.equal_time else args.steps
    curve, _ = train(
        trainer,
        BatchStream(ctx.mixture.train, seed + 1),
        total,
        args.batch,
        lambda model: evaluate(model, ctx.mixture),
        args.eval_every,
        None if progress is None else lambda step, steps: progress(name, step, steps),
    )
    result = {"method": name, "seed": seed, "steps": total, "curve": curve, "activation_bytes": trainer.meter.peak}
    if trainer.on_select is not None:
        result["noise_report"] = trainer.on_select.report()
    return result


def run_star(job):
    return run(*job)


def step_costs(methods: list[str], args, rounds: int) -> dict[str, float]:
    """Median seconds per training step of each arm, measured round-robin."""
    torch.set_num_threads(1)
    ctx = build_context(args)
    trainers = {m: make_trainer(ARMS[m], 0, ctx) for m in methods}
    return round_robin_costs(trainers, BatchStream(ctx.mixture.train, 12345), args.batch, rounds)


# --- summary ----------------------------------------------------------------------------------
def value(key: str) -> Callable[[dict], float]:
    """The reader of ``key`` in a curve point: ``accuracy_mixture`` etc., or ``accuracy:<source>``
    for one source."""
    if ":" in key:
        metric, name = key.split(":", 1)
        return lambda point: point[metric][name]
    return lambda point: point[key]


def summarize(runs: list[dict], costs: dict, mixture: FinetuneMixture, steps: int) -> dict:
    set_times(runs, costs)
    methods = list(dict.fromkeys(r["method"] for r in runs))
    keys = ["accuracy_mixture", "accuracy_macro", "loss_mixture", "loss_macro"]
    keys += [f"accuracy:{n}" for n in mixture.names + mixture.held_out]
    keys += [f"loss:{n}" for n in mixture.names + mixture.held_out]
    out: dict = {"steps": steps, "smallest_source": mixture.names[-1], "methods": {}}
    for m in methods:
        rs = sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])
        s = {key: mean_sd([value(key)(at_step(r["curve"], steps)) for r in rs]) for key in keys}
        s["ms_per_step"] = 1000 * costs[m]
        s["time_to_steps"] = steps * costs[m]
        s["activation_mib"] = max(r["activation_bytes"] for r in rs) / 2**20
        s["seeds"] = [r["seed"] for r in rs]
        reports = [r["noise_report"] for r in rs if "noise_report" in r]
        if reports:
            s["noise_report"] = {key: mean_sd([x[key] for x in reports]) for key in reports[0]}
        out["methods"][m] = s
    ms = out["methods"]
    if "random_k" in ms and "accum_B" in ms:
        for key in ("accuracy_mixture", "accuracy_macro"):
            lo, hi = ms["random_k"][key]["mean"], ms["accum_B"][key]["mean"]
            for s in ms.values():
                s[f"gap_closure_{key}"] = (s[key]["mean"] - lo) / (hi - lo) if hi != lo else None
    # Equal wall-clock: each reference's accuracy at this method's time to `steps` (same seed).
    for m, s in ms.items():
        eq = {}
        for ref in ("random_k", "stratified_k", "balanced_k", "accum_B"):
            if ref not in ms:
                continue
            for key in ("accuracy_mixture", "accuracy_macro"):
                vals = []
                for r in (r for r in runs if r["method"] == m):
                    o = next((x for x in runs if x["method"] == ref and x["seed"] == r["seed"]), None)
                    t = at_step(r["curve"], steps)["time"]
                    vals.append(None if o is None else at_time(o["curve"], t, value(key)))
                eq[f"{ref}:{key}"] = None if any(v is None for v in vals) else mean_sd(vals)
        s["references_at_equal_time"] = eq
    return out


def targets(summary: dict, best_macro: str = "balanced_gm") -> dict:
    """The issue's targets (k = B/4): each figure with its seed spread."""
    ms, small = summary["methods"], summary["smallest_source"]
    out: dict = {}
    need = ("default", "random_k", "accum_B")
    if all(m in ms for m in need):
        d, r, a = (ms[m]["accuracy_mixture"]["per_seed"] for m in need)
        out["gap_closure_mixture"] = {
            "of_means": ms["default"]["gap_closure_accuracy_mixture"],
            "per_seed": mean_sd([(x - y) / (z - y) if z != y else float("nan") for x, y, z in zip(d, r, a)]),
        }
        eq = ms["default"]["references_at_equal_time"].get("accum_B:accuracy_mixture")
        out["equal_time_default_minus_accum_B"] = (
            None if eq is None else mean_sd([x - y for x, y in zip(d, eq["per_seed"])])
        )
    out["default_minus_stratified_mixture"] = paired(ms, "default", "stratified_k", "accuracy_mixture")
    out["default_minus_random_smallest"] = paired(ms, "default", "random_k", f"accuracy:{small}")
    out["best_macro"] = best_macro
    out["best_macro_minus_balanced_k"] = paired(ms, best_macro, "balanced_k", "accuracy_macro")
    for m in ("default", "stratified_k", "balanced_k", "random_k", "accum_B", best_macro):
        if m in ms:
            out[f"sd:{m}"] = {k: ms[m][k]["sd"] for k in ("accuracy_mixture", "accuracy_macro")}
    return out


def noise_line(noise: dict | None) -> list[str]:
    """The markdown's line on label noise (none for a clean pool)."""
    if noise is None:
        return []
    per = ", ".join(f"{n} {c}" for n, c in noise["corrupted_per_source"].items())
    return [
        f"Label noise in the training pool only (scores are on clean held-out data): {noise['model']}, rate "
        f"{noise['rate']:g}, {noise['placement']}, seed {noise['seed']}: {noise['corrupted']} of {noise['pool']} "
        f"rows have a wrong answer ({per}).",
        "",
    ]


def markdown(summary: dict, mixture: FinetuneMixture, args, noise: dict | None = None) -> str:
    ms = summary["methods"]
    order = sorted(ms, key=lambda m: -ms[m]["accuracy_mixture"]["mean"])
    steps = summary["steps"]
    lines = [
        f"# Fine-tuning benchmark: B={args.batch}, k={args.k}, {steps} steps, seeds {args.seeds}, "
        f"LoRA r={args.rank} (attention+MLP), {args.optimizer}, lr {args.lr}"
        + (f", label noise {noise['model']} {noise['rate']:g}" if noise else ""),
        "",
        "Sources (share, kind): "
        + ", ".join(
            f"{n} ({100 * s / sum(mixture.shares):.1f} %, {k})"
            for n, s, k in zip(mixture.names, mixture.shares, mixture.kinds)
        )
        + f". Held-out tasks (not trained on): {', '.join(mixture.held_out)}.",
        "",
        *noise_line(noise),
        *([f"Runs: {args.note}", ""] if getattr(args, "note", "") else []),
        f"After {steps} steps, mean ± sd over seeds. Accuracy: exact match of the greedy answer on "
        f"{args.eval_size} held-out examples per source. 'mixture': weighted by the training shares "
        "(the training objective); 'macro': each source once. Gap closure: (acc - random k) / (accum B - random k).",
        "",
        "| method | accuracy mixture | accuracy macro | gap closure (mixture) | loss mixture | loss macro | "
        f"{summary['smallest_source']} (smallest) acc | ms/step | activation MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m in order:
        s = ms[m]
        gc = s.get("gap_closure_accuracy_mixture")
        lines.append(
            f"| {m} | {fmt(s['accuracy_mixture'])} | {fmt(s['accuracy_macro'])} | "
            f"{'' if gc is None else f'{gc:.2f}'} | "
            f"{fmt(s['loss_mixture'])} | {fmt(s['loss_macro'])} | {fmt(s['accuracy:' + summary['smallest_source']])} | "
            f"{s['ms_per_step']:.1f} | {s['activation_mib']:.2f} |"
        )
    t = summary.get("targets")
    if t:
        f = lambda x: "n/a" if x is None else fmt(x)  # noqa: E731
        gc = t.get("gap_closure_mixture")
        gc_text = "n/a" if not gc or gc["of_means"] is None else f"{gc['of_means']:.2f} / {fmt(gc['per_seed'], 2)}"
        lines += [
            "",
            "## The issue's targets (k = B/4; differences paired by seed: mean ± sd over seeds)",
            "",
            "| figure | value | target |",
            "|---|---|---|",
            f"| gap closure, mixture accuracy: of the means / per seed | {gc_text} | >= 0.5 |",
            "| default - stratified k, mixture accuracy | "
            f"{f(t.get('default_minus_stratified_mixture'))} | > seed spread |",
            f"| {t['best_macro']} - balanced k, macro accuracy | "
            f"{f(t.get('best_macro_minus_balanced_k'))} | > seed spread |",
            f"| default - random k, smallest source ({summary['smallest_source']}) accuracy | "
            f"{f(t.get('default_minus_random_smallest'))} | >= 0 |",
            "| equal wall-clock: default - accum B, mixture accuracy | "
            f"{f(t.get('equal_time_default_minus_accum_B'))} | >= 0 |",
        ]
    reported = [m for m in order if "noise_report" in ms[m]]
    if reported:
        lines += [
            "",
            "## What the coreset trained on, and the suspect report (against the corrupted rows)",
            "",
            "Share of the selected examples whose answer was corrupted (the pool's share is the noise rate); "
            "for selectors that flag suspects, precision and recall of the flags over all steps.",
            "",
            "| method | corrupted share of the coreset | suspect precision | suspect recall |",
            "|---|---|---|---|",
        ]
        for m in reported:
            r = ms[m]["noise_report"]
            cell = lambda key: fmt(r[key]) if key in r else "-"  # noqa: E731
            lines.append(
                f"| {m} | {cell('selected_corrupted_share')} | {cell('suspect_precision')} | {cell('suspect_recall')} |"
            )
    names = mixture.names + mixture.held_out
    lines += [
        "",
        f"## Accuracy per source after {steps} steps (mean over seeds; held-out tasks last)",
        "",
        *table_head("method", *names),
    ]
    for m in order:
        lines.append(f"| {m} | " + " | ".join(f"{ms[m]['accuracy:' + n]['mean']:.3f}" for n in names) + " |")
    lines += [
        "",
        "## Equal wall-clock",
        "",
        f"Accuracy of the reference methods at each method's time to {steps} steps (interpolated; "
        "n/a when the reference ran shorter). Mixture / macro.",
        "",
        "| method | time (s) | own | random k | stratified k | balanced k | accum B |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in order:
        s = ms[m]
        eq = s["references_at_equal_time"]

        def cell(ref):
            a, b = eq.get(f"{ref}:accuracy_mixture"), eq.get(f"{ref}:accuracy_macro")
            return "n/a" if a is None or b is None else f"{a['mean']:.3f} / {b['mean']:.3f}"

        lines.append(
            f"| {m} | {s['time_to_steps']:.1f} | {s['accuracy_mixture']['mean']:.3f} / "
            f"{s['accuracy_macro']['mean']:.3f} | {cell('random_k')} | {cell('stratified_k')} | "
            f"{cell('balanced_k')} | {cell('accum_B')} |"
        )
    return "\n".join(lines) + "\n"


def plot(
    runs: list[dict], summary: dict, mixture: FinetuneMixture, path: Path, methods: list[str] | None = None
) -> None:
    """Accuracy vs steps and vs wall-clock: mixture, macro, then each source and held-out task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = methods or [m for m in PLOTTED if m in summary["methods"]] or list(summary["methods"])
    panels = ["accuracy_mixture", "accuracy_macro"] + [f"accuracy:{n}" for n in mixture.names + mixture.held_out]
    cols = 4
    rows = 2 * ((len(panels) + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    colors = {m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}
    for i, key in enumerate(panels):
        ax_s = axes[2 * (i // cols)][i % cols]
        ax_t = axes[2 * (i // cols) + 1][i % cols]
        for m in methods:
            xs, ts, ys = mean_curve(runs, m, value(key))
            ax_s.plot(xs, ys, color=colors[m], label=m, lw=1.2)
            ax_t.plot(ts, ys, color=colors[m], label=m, lw=1.2)
        title = key.replace("accuracy_", "").replace("accuracy:", "")
        ax_s.set_title(f"{title} vs steps", fontsize=9)
        ax_t.set_title(f"{title} vs wall-clock (s)", fontsize=9)
        ax_s.axvline(summary["steps"], color="gray", ls=":", lw=0.8)
        ax_s.set_xlim(0, 2 * summary["steps"])
        for ax in (ax_s, ax_t):
            ax.set_ylim(-0.02, 1.02)
    for j in range(len(panels), rows // 2 * cols):
        axes[2 * (j // cols)][j % cols].axis("off")
        axes[2 * (j // cols) + 1][j % cols].axis("off")
    handles, labels = axes[0][0].get_legend_handles_labels()
    spare = axes[-1][-1] if len(panels) % cols else fig.add_axes((0.0, 0.0, 0.01, 0.01))
    spare.legend(handles, labels, fontsize=8, loc="center")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def result_name(out: str, noise: dict | None) -> str:
    """``out`` for a clean pool; with noise, ``out`` plus the settings (placement and seed when not
    the defaults), so that noisy results never overwrite clean ones or each other."""
    if noise is None:
        return out
    name = f"{out}_noise-{noise['model']}-{noise['rate']:g}"
    if noise["placement"] != "per_source":
        name += f"-{noise['placement']}"
    return name + (f"-seed{noise['seed']}" if noise["seed"] else "")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_setup_options(ap, steps=300)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--methods", default=",".join(FULL_SET))
    ap.add_argument(
        "--no-equal-time",
        dest="equal_time",
        action="store_false",
        help="every method runs --steps steps (no longer runs for cheap methods)",
    )
    ap.add_argument("--cost-rounds", type=int, default=12)
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    ap.add_argument("--quick", action="store_true", help=f"methods {QUICK_SET}, 150 steps, 2 seeds")
    ap.add_argument("--out", default="finetune")
    ap.add_argument("--results", default=None, help=f"the folder results go to (default {RESULTS})")
    ap.add_argument(
        "--check",
        action="store_true",
        help="check the set-up instead of training: the label noise is in the pool only and its mask matches, "
        "and every method's sub-batches keep each row's pool index (one step each); prints the results name",
    )
    ap.add_argument("--from-runs", default="", help="summarize the runs of this JSON file instead of training")
    ap.add_argument("--note", default="", help="how and where the runs were made (kept in the JSON and the table)")
    ap.add_argument("--renamed", action="store_true", help="--from-runs: the file uses the names of RENAMED")
    ap.add_argument("--remeasure", action="store_true", help="--from-runs: measure the step costs again")
    ap.add_argument("--resume", default="", help="a (partial) JSON file whose runs are kept, not rerun")
    ap.add_argument(
        "--noise",
        choices=list(NOISE_MODELS),
        default=None,
        help="label noise in the training pool (evaluation stays clean); results go to "
        "<out>_noise-<model>-<rate>[-<placement>][-seed<n>]",
    )
    ap.add_argument("--noise-rate", type=float, default=None, help="share of the pool's rows corrupted (default 0.2)")
    ap.add_argument(
        "--noise-placement",
        choices=list(PLACEMENTS),
        default=None,
        help="per_source (default): each source gets the rate; concentrated: the same count, all in the largest source",
    )
    ap.add_argument("--noise-seed", type=int, default=None, help="which rows and wrong answers (default 0)")
    args = ap.parse_args(argv)
    if args.quick:
        args.methods, args.steps, args.seeds, args.eval_every = ",".join(QUICK_SET), 150, "0,1", 50
    noise_options = (args.noise_rate, args.noise_placement, args.noise_seed)
    if args.noise is None and any(o is not None for o in noise_options):
        ap.error("--noise-rate, --noise-placement and --noise-seed need --noise MODEL")
    if args.noise is not None:
        args.noise_rate = 0.2 if args.noise_rate is None else args.noise_rate
        args.noise_placement = args.noise_placement or "per_source"
        args.noise_seed = args.noise_seed or 0
        try:
            check_noise(args.noise, args.noise_rate, args.noise_placement)
        except ValueError as e:
            ap.error(str(e))
    args.out = result_name(args.out, noise_settings(args))
    return args


def check(args, methods: list[str]) -> None:
    """``--check``: the set-up's invariants at these settings (AssertionError when one fails)."""
    torch.set_num_threads(1)
    print(f"results name: {args.out}")
    ctx = build_context(args)
    if ctx.corrupted is not None:
        check_noise_in_pool_only(build_context(argparse.Namespace(**{**vars(args), "noise": None})), ctx)
        print(f"label noise: {int(ctx.corrupted.sum())} pool rows, marked exactly; evaluation and target clean")
    for m in methods:
        print(f"{m}: {check_rows_keep_their_index(ARMS[m], ctx)} sub-batch(es), each row with its pool index")


def main(argv=None) -> None:
    args = parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in ARMS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {list(ARMS)}")
    if args.check:
        check(args, methods)
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    # method-major: a cut-short run loses the last methods
    jobs = [(m, s, args) for m in methods for s in seeds]
    start = time.time()
    runs = []
    results = Path(args.results) if args.results else RESULTS
    results.mkdir(parents=True, exist_ok=True)
    costs = None
    if args.from_runs:
        old = json.loads(Path(args.from_runs).read_text())
        rename = RENAMED if args.renamed else {}
        for r in old["runs"]:
            r["method"] = rename.get(r["method"], r["method"])
        runs = [r for r in old["runs"] if r["method"] in methods]
        if "costs_seconds_per_step" in old and not args.remeasure:
            costs = {rename.get(m, m): c for m, c in old["costs_seconds_per_step"].items()}
    else:
        if args.resume:
            done = json.loads(Path(args.resume).read_text())["runs"]
            runs = [r for r in done if r["method"] in methods and r["seed"] in seeds]
            have = {(r["method"], r["seed"]) for r in runs}
            jobs = [j for j in jobs if (j[0], j[1]) not in have]
        total = len(runs) + len(jobs)

        def describe(r: dict) -> str:
            last = r["curve"][-1]
            return (
                f"{len(runs)}/{total} {r['method']} seed {r['seed']}: "
                f"acc mixture {last['accuracy_mixture']:.3f} macro {last['accuracy_macro']:.3f}"
            )

        # --jobs 1: in this process (no worker start-up)
        collect(run_star, jobs, args.jobs, runs, results / f"{args.out}.partial.json", args, describe)
    t_runs = time.time() - start
    methods = [m for m in methods if any(r["method"] == m for r in runs)]
    if costs is None:
        costs = step_costs(methods, args, args.cost_rounds)
    ctx = build_context(args)
    summary = summarize(runs, costs, ctx.mixture, args.steps)
    summary["targets"] = targets(summary)
    payload = {
        "args": vars(args),
        "machine": machine(),
        "seconds": {"runs": t_runs, "total": time.time() - start},
        "mixture": {
            "names": ctx.mixture.names,
            "shares": ctx.mixture.shares,
            "kinds": ctx.mixture.kinds,
            "held_out": ctx.mixture.held_out,
        },
        "noise": noise_record(ctx),
        "methods": {
            m: {
                "kind": ARMS[m].kind,
                "options": {k: str(v) for k, v in ARMS[m].options.items()},
                "optimizer": ARMS[m].optimizer or args.optimizer,
                "k": ARMS[m].k or args.k,
            }
            for m in methods
        },
        "costs_seconds_per_step": costs,
        "summary": summary,
        "runs": runs,
    }
    payload = save_json(results / f"{args.out}.json", payload, "finetune")
    md = md_header(payload["produced_by"]) + markdown(summary, ctx.mixture, args, noise_record(ctx))
    (results / f"{args.out}.md").write_text(md)
    plot(runs, summary, ctx.mixture, results / f"{args.out}.png")
    print(md)
    (results / f"{args.out}.partial.json").unlink(missing_ok=True)
    print(f"total {time.time() - start:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
