"""Fine-tuning as users run it: a finite training set, several epochs, duplicates; every arm at
equal steps, equal wall-clock and equal FLOPs (issue 23, items 1, 2 and 6).

The fine-tuning benchmark's set-up (``lib/finetune.py``: LoRA r = 8 on every linear of the
committed base, the 7-source mixture, AdamW lr 3e-3), on a finite set of N rows drawn once
(``lib.finetune.finite_context``): the first rows of the shuffled pool, plus, when asked, a share
of duplicates of them (half exact copies, half near duplicates: one input symbol changed and the
answer recomputed), then the label noise, if any, on the set itself. Training runs epochs: each a
fresh permutation of the N rows cut into large batches of B (``BatchStream``), so an epoch is
N / B steps. ``accum_B`` trains on every row of an epoch; the k-row arms on k of each batch.

Each arm runs long enough for its curve to reach the default's time and FLOPs after
:data:`EPOCHS` epochs, evaluated every half epoch (random k: every epoch or two), so that it can
be read off at equal steps, at equal wall-clock (its seconds per step measured round-robin in one
process, ``--costs``, times steps; curves interpolated) and at equal FLOPs (counted from the
model's shape, :func:`step_flops`, so that machine load does not enter).

Arms: ``default`` (the library's ``anchored_consensus``), ``random_k`` (the first k of each batch),
``stratified_k`` (``selection="random"``), ``accum_B`` (B in micro-batches of k) and
``accum_then_default`` (a schedule defined here: accumulate B in epoch 1, the default from epoch
2 on, in the same model and optimizer).

Each run is one JSON line in ``results/finite_data/runs.jsonl``; a cut-short grid resumes.

    PYTHONPATH=. python benchmarks/finite_data.py --costs            # seconds per step, per k/B
    PYTHONPATH=. python benchmarks/finite_data.py --grid             # the runs (resumable)
    PYTHONPATH=. python benchmarks/finite_data.py --report           # finite_data.md from the runs
    PYTHONPATH=. python benchmarks/finite_data.py --quick            # a one-minute smoke check
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib.finetune import ARMS, NoiseCounts, add_setup_options, evaluate, finite_context, make_trainer  # noqa: E402
from lib.results import md_header, results_dir, stamped  # noqa: E402
from lib.summary import mean_sd_text, value_at_step  # noqa: E402
from lib.training import BatchStream, Trainer, round_robin_costs, train  # noqa: E402

RESULTS = results_dir("finite_data")
NOISE = ("random_tokens", 0.2, "per_source")


@dataclass(frozen=True)
class Data:
    """A finite training set: rows, duplicate share, label noise (None: clean)."""

    rows: int
    duplicates: float = 0.0
    noise: tuple | None = None


CONFIGS = {
    "2k clean": Data(2048),
    "2k clean, 40 % duplicates": Data(2048, 0.4),
    "2k random tokens 20 %": Data(2048, 0.0, NOISE),
    "2k random tokens 20 %, 40 % duplicates": Data(2048, 0.4, NOISE),
    "8k clean": Data(8192),
    "8k clean, 40 % duplicates": Data(8192, 0.4),
    "8k random tokens 20 %": Data(8192, 0.0, NOISE),
    "quick": Data(128, 0.4, NOISE),
}
RATIOS = {"1/4": (64, 16), "1/8": (128, 16), "1/2": (32, 16), "quick": (16, 4)}
EPOCHS = 4  # the default's run; the comparisons read every arm at the default's epochs 1..EPOCHS
MAIN_ARMS = ["default", "random_k", "stratified_k", "accum_B", "accum_then_default"]
# The grid in order of priority (a cut-short grid has the first groups): (k/B, configs, arms).
GRID = [
    ("1/4", ["2k clean", "2k clean, 40 % duplicates", "2k random tokens 20 %"], MAIN_ARMS),
    ("1/8", ["2k clean", "2k clean, 40 % duplicates", "2k random tokens 20 %"], MAIN_ARMS),
    ("1/2", ["2k clean", "2k random tokens 20 %"], MAIN_ARMS[:4]),
    ("1/4", ["2k random tokens 20 %, 40 % duplicates"], MAIN_ARMS),
    ("1/4", ["8k clean", "8k random tokens 20 %", "8k clean, 40 % duplicates"], MAIN_ARMS[:4]),
    ("1/8", ["8k clean", "8k random tokens 20 %"], MAIN_ARMS[:4]),
]
SEEDS = [0, 1, 2]
DATA_SEED, NOISE_SEED = 0, 0  # one training set per configuration: the seeds vary init and order


def arm_epochs(arm: str, batch: int, k: int) -> float:
    """How many epochs an arm runs: enough to reach the default's time and FLOPs after
    :data:`EPOCHS` epochs (random and stratified k cost about k / B of accumulation: neither
    makes a pass over the large batch)."""
    if arm in ("random_k", "stratified_k"):  # at k/B = 1/2 a step of k costs more than half of B's
        return EPOCHS * max(batch // k, 3) + 2
    if arm == "accum_B" and batch // k <= 2:  # at k/B = 1/2 the default's step costs more than accumulation's
        return EPOCHS + 2
    return {"accum_B": EPOCHS + 1, "accum_then_default": EPOCHS + 1}.get(arm, EPOCHS)


def evals_per_epoch(arm: str, batch: int, k: int) -> float:
    if arm in ("random_k", "stratified_k"):
        return 1.0 if batch // k <= 4 else 0.5
    return 2.0


# --- the trainers -----------------------------------------------------------------------------
class Scheduled:
    """Accumulate B for the first ``switch`` steps, then ``coreset``'s step, in the same model and
    optimizer (the Adam state the selection normalizes by is the accumulated steps' at the switch)."""

    def __init__(self, coreset: Trainer, switch: int):
        self.coreset, self.switch, self.done = coreset, switch, 0
        self.accum = Trainer("accum", coreset.k, coreset.model, coreset.opt, coreset.loss_fn)
        self.model, self.batch_factor, self.on_select, self.wrapper = coreset.model, 1, coreset.on_select, None

    def step(self, big: dict) -> None:
        (self.accum if self.done < self.switch else self.coreset).step(big)
        self.done += 1


class SelectionCounts:
    """Over a coreset arm's steps: the share of the coreset that were duplicates (rows whose
    original is another row), against their share of the large batches; then ``inner``."""

    def __init__(self, original: torch.Tensor, inner=None):
        self.dup = original != torch.arange(original.shape[0])
        self.inner, self.c = inner, {"selected": 0, "selected_dup": 0, "seen": 0, "seen_dup": 0}

    def __call__(self, big: dict, coreset) -> None:
        d = self.dup[big["index"]]
        self.c["selected"] += len(coreset)
        self.c["selected_dup"] += int(d[coreset.indices].sum())
        self.c["seen"] += d.numel()
        self.c["seen_dup"] += int(d.sum())
        if self.inner is not None:
            self.inner(big, coreset)

    def report(self) -> dict:
        c = self.c
        out = {} if self.inner is None else self.inner.report()
        if c["seen_dup"]:
            out["selected_duplicate_share"] = c["selected_dup"] / max(1, c["selected"])
            out["batch_duplicate_share"] = c["seen_dup"] / c["seen"]
        return out


def run_args(config: str, ratio: str, eval_size: int = 200) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_setup_options(parser, steps=0)
    args = parser.parse_args([])
    data = CONFIGS[config]
    args.batch, args.k = RATIOS[ratio]
    args.rows, args.duplicate_share, args.near_share, args.data_seed = data.rows, data.duplicates, 0.5, DATA_SEED
    args.pool = data.rows if config == "quick" else max(args.pool, data.rows)  # quick: a small pool, fast
    args.eval_size = eval_size
    args.noise, args.noise_rate, args.noise_placement, args.noise_seed = (
        (None, None, None, None) if data.noise is None else (*data.noise, NOISE_SEED)
    )
    return args


def make_arm(name: str, seed: int, ctx, original: torch.Tensor, steps_per_epoch: int):
    """The trainer of ``name`` (a schedule of this script's or an arm of ``lib.finetune.ARMS``)."""
    trainer = make_trainer(ARMS["default" if name == "accum_then_default" else name], seed, ctx)
    if trainer.wrapper is not None:
        inner = trainer.on_select or NoiseCounts(torch.zeros(original.shape[0], dtype=torch.bool))
        trainer.on_select = SelectionCounts(original, inner)
    if name == "accum_then_default":
        return Scheduled(trainer, steps_per_epoch)
    return trainer


def run_one(job: tuple, eval_size: int = 200) -> dict:
    """Train arm ``name`` with ``seed`` on ``config`` at ``ratio``; its curve and selection report."""
    name, seed, config, ratio = job
    torch.set_num_threads(1)
    args = run_args(config, ratio, eval_size)
    ctx, original = finite_context(args)
    per_epoch = args.rows // args.batch
    steps = int(round(arm_epochs(name, args.batch, args.k) * per_epoch))
    every = max(1, int(round(per_epoch / evals_per_epoch(name, args.batch, args.k))))
    trainer = make_arm(name, seed, ctx, original, per_epoch)
    start = time.time()
    curve, _ = train(
        trainer, BatchStream(ctx.mixture.train, seed + 1), steps, args.batch, lambda m: evaluate(m, ctx.mixture), every
    )
    keep = ("step", "measured_time", "accuracy_mixture", "accuracy_macro", "loss_mixture", "loss_macro")
    on_select = getattr(trainer, "on_select", None)
    return {
        "arm": name,
        "seed": seed,
        "config": config,
        "ratio": ratio,
        "batch": args.batch,
        "k": args.k,
        "rows": args.rows,
        "steps_per_epoch": per_epoch,
        "steps": steps,
        "curve": [{key: p[key] for key in keep if key in p} for p in curve],
        "selection_report": None if on_select is None else on_select.report(),
        "seconds": time.time() - start,
    }


def read_runs(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def run_grid(groups: list, seeds: list[int], results: Path, eval_size: int = 200) -> None:
    """Every (ratio, config, seed, arm) of ``groups`` not yet in ``runs.jsonl``, one at a time."""
    results.mkdir(parents=True, exist_ok=True)
    path = results / "runs.jsonl"
    done = {(r["arm"], r["seed"], r["config"], r["ratio"]) for r in read_runs(path)}
    todo = [
        (arm, seed, config, ratio)
        for ratio, configs, arms in groups
        for config in configs
        for seed in seeds
        for arm in arms
        if (arm, seed, config, ratio) not in done
    ]
    print(f"{len(todo)} runs to go ({len(done)} done)", flush=True)
    for job in todo:
        result = run_one(job, eval_size)
        with path.open("a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"  {job[0]} seed {job[1]} {job[2]} k/B {job[3]}: {result['seconds']:.0f} s", flush=True)


# --- cost: seconds per step (measured) and FLOPs per step (counted) -------------------------------
COST_ARMS = ["default", "random_k", "stratified_k", "accum_B"]


def measure_costs(ratios: list[str], rounds: int, results: Path) -> dict:
    """Seconds per step of the cost arms at each k/B, round-robin on the same batches in one
    process (the 2k clean set; a step's cost does not depend on which rows it gets)."""
    torch.set_num_threads(1)
    out = {}
    for ratio in ratios:
        config = "quick" if ratio == "quick" else "2k clean"
        args = run_args(config, ratio, eval_size=8)
        ctx, original = finite_context(args)
        trainers = {a: make_trainer(ARMS[a], 0, ctx) for a in COST_ARMS}
        out[ratio] = round_robin_costs(trainers, BatchStream(ctx.mixture.train, 12345), args.batch, rounds)
        print(ratio, {a: f"{c * 1000:.1f} ms" for a, c in out[ratio].items()}, flush=True)
    results.mkdir(parents=True, exist_ok=True)
    path = results / "costs.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    data = stamped({"seconds_per_step": {**old.get("seconds_per_step", {}), **out}, "rounds": rounds}, "finite_data")
    data["produced_by"] = stamped({}, "finite_data")["produced_by"]  # re-measured: re-dated
    path.write_text(json.dumps(data, indent=1))
    return data


def step_flops(arm: str, batch: int, k: int) -> float:
    """FLOPs of one step of ``arm``, from the base's shape (``step_time.token_flops``: hidden 128,
    2 layers, vocabulary 34, LoRA r = 8 on every linear, T = 21 tokens per row, padding included).
    Per token: forward F; backward Bw = the linear layers' and the head's input gradients (1x their
    forward: LoRA freezes the weights), the adapters' 2x, attention 2.5x; the sketch's backward S
    (to the last block's v_proj LoRA-B: the head, the top block's o_proj and MLP, one block's
    attention). accumulation B (F + Bw); random k: k (F + Bw); stratified k: k (F + Bw), plus a
    no-grad forward B F if the library's ``selection="random"`` makes a pass over the batch
    (``reads_losses``; it does not); the default: B (F + S) + k (F + Bw)."""
    from coreset_optim.datasets.tasks import SEQ_LEN
    from lib.finetune import LORA_TARGETS
    from step_time import ATTENTION_BACKWARD, tiny_shape, token_flops

    from coreset_optim.methods.registry import method_class

    shape = tiny_shape()
    f = token_flops(shape, SEQ_LEN, True, LORA_TARGETS)
    fwd = f["linear"] + f["attention"] + f["head"] + f["lora"]
    att_back = ATTENTION_BACKWARD * f["attention"]
    bwd = f["linear"] + f["head"] + att_back + 2 * f["lora"]
    sketch = f["head"] + f["top_block"] + att_back / shape.layers
    per = {
        "accum_B": batch * (fwd + bwd),
        "random_k": k * (fwd + bwd),
        "stratified_k": batch * fwd * getattr(method_class("random"), "reads_losses", True) + k * (fwd + bwd),
        "default": batch * (fwd + sketch) + k * (fwd + bwd),
    }
    return per[arm] * SEQ_LEN


def cumulative(arm: str, step: float, per_epoch: int, per_step: dict[str, float]) -> float:
    """Cost (seconds or FLOPs) of ``step`` steps of ``arm``; the schedule: accumulation's epoch 1."""
    if arm == "accum_then_default":
        first = min(step, per_epoch)
        return first * per_step["accum_B"] + (step - first) * per_step["default"]
    return step * per_step[arm]


def steps_for(arm: str, budget: float, per_epoch: int, per_step: dict[str, float]) -> float:
    """The inverse of :func:`cumulative`: the (fractional) step at which ``arm`` has spent ``budget``."""
    if arm == "accum_then_default":
        first = per_epoch * per_step["accum_B"]
        if budget <= first:
            return budget / per_step["accum_B"]
        return per_epoch + (budget - first) / per_step["default"]
    return budget / per_step[arm]


# --- the report ---------------------------------------------------------------------------------
KEY = "accuracy_mixture"
# What if a step cost what it costs at an 8B Llama's proportions: step / accumulation measured by
# step_time.py (benchmarks/results/step_time/step_time.md, 8b LoRA T = 128, k = B/4): default 0.72,
# random k 0.24; stratified k (selection="random", no pass) as random k. k/B = 1/4 only.
LLM_BASIS = "8b-LoRA step costs"
LLM_COSTS = {"default": 0.72, "accum_B": 1.0, "random_k": 0.24, "stratified_k": 0.24}
MIN_EFFECT = 0.005  # a paired mean difference below this is no difference, whatever the spread


def verdict(diffs: list[float]) -> tuple[str, str]:
    """Paired by seed: (cell, word). "ahead" / "behind" when every seed agrees and the mean
    exceeds both the seed spread and :data:`MIN_EFFECT`; otherwise "tie"."""
    if len(diffs) < 2:
        return "n/a", "n/a"
    m, sd = statistics.mean(diffs), statistics.stdev(diffs)
    if abs(m) < MIN_EFFECT or abs(m) <= sd or not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
        return f"{m:+.3f} ± {sd:.3f}", "tie"
    word = "ahead" if m > 0 else "behind"
    return f"{m:+.3f} ± {sd:.3f} **{word}**", word


class Readings:
    """Each run's accuracy at the default's epoch e under each basis: equal steps, equal
    wall-clock (measured seconds per step), equal FLOPs (counted)."""

    BASES = ("steps", "wall-clock", "FLOPs")

    def __init__(self, runs: list[dict], costs: dict | None):
        self.by = {(r["ratio"], r["config"], r["arm"], r["seed"]): r for r in runs}
        self.costs = costs or {}

    def per_step(self, basis: str, ratio: str) -> dict[str, float] | None:
        b, k = RATIOS[ratio]
        if basis == LLM_BASIS:
            return LLM_COSTS if ratio == "1/4" else None
        if basis == "FLOPs":
            return {a: step_flops(a, b, k) for a in COST_ARMS}
        return self.costs.get(ratio)

    def value(self, ratio: str, config: str, arm: str, seed: int, epoch: float, basis: str) -> float | None:
        run = self.by.get((ratio, config, arm, seed))
        if run is None:
            return None
        per_epoch = run["steps_per_epoch"]
        step = epoch * per_epoch
        if basis == "steps":
            return value_at_step(run, step, KEY)
        per = self.per_step(basis, ratio)
        if per is None:
            return None
        budget = cumulative("default", step, per_epoch, per)
        return value_at_step(run, steps_for(arm, budget, per_epoch, per), KEY)

    def seeds(self, ratio: str, config: str, arm: str) -> list[int]:
        return sorted(s for (r, c, a, s) in self.by if (r, c, a) == (ratio, config, arm))

    def values(self, ratio, config, arm, epoch, basis) -> dict[int, float]:
        out = {s: self.value(ratio, config, arm, s, epoch, basis) for s in self.seeds(ratio, config, arm)}
        return {s: v for s, v in out.items() if v is not None}

    def cell(self, ratio, config, arm, epoch, basis) -> str:
        seeds = self.seeds(ratio, config, arm)
        vals = self.values(ratio, config, arm, epoch, basis)
        if not seeds:
            return "not run"
        if len(vals) < len(seeds):
            return "n/a (past its run)"
        return mean_sd_text(list(vals.values()))

    def diff(self, ratio, config, arm, ref, epoch, basis) -> tuple[str, str]:
        a = self.values(ratio, config, arm, epoch, basis)
        b = self.values(ratio, config, ref, epoch, basis)
        return verdict([a[s] - b[s] for s in sorted(a) if s in b])


def groups_present(runs: list[dict]) -> list[tuple[str, list[str], list[str]]]:
    """(ratio, configs, arms) present in ``runs``, in the grid's order."""
    out = []
    for ratio in RATIOS:
        configs = [c for c in CONFIGS if any(r["ratio"] == ratio and r["config"] == c for r in runs)]
        arms = [a for a in MAIN_ARMS if any(r["ratio"] == ratio and r["arm"] == a for r in runs)]
        if configs:
            out.append((ratio, configs, arms))
    return out


def report(results: Path) -> str:
    runs = read_runs(results / "runs.jsonl")
    costs_path = results / "costs.json"
    costs_data = json.loads(costs_path.read_text()) if costs_path.exists() else None
    costs = costs_data["seconds_per_step"] if costs_data else None
    rd = Readings(runs, costs)
    produced = stamped({}, "finite_data")["produced_by"]
    out = [
        md_header(produced),
        "# Finite data, several epochs, duplicates: the default against accumulation (`benchmarks/finite_data.py`)",
        "",
        "Fine-tuning benchmark set-up (LoRA r = 8 on every linear of the committed base, 7-source mixture, AdamW lr "
        "3e-3) on a finite set of N rows drawn once (duplicates: half exact copies, half near duplicates with one "
        "input symbol changed and the answer recomputed; label noise applied to the set, duplicates included). An "
        "epoch is a fresh permutation of the N rows cut into large batches of B. Mixture-weighted exact-match accuracy "
        "on the clean held-out sets (200 rows per source), mean ± sd over training seeds "
        f"{SEEDS} (same set, noise seed {NOISE_SEED}, data seed {DATA_SEED}). `default` is `anchored_consensus`; "
        "`accum_then_default` accumulates B in epoch 1 and runs the default from epoch 2.",
        "",
        f"Runs present: {len(runs)} (`runs.jsonl`).",
        "",
    ]
    out += cost_section(costs_data)
    for ratio, configs, arms in groups_present(runs):
        b, k = RATIOS[ratio]
        out += [f"## k/B = {ratio} (B = {b}, k = {k})", ""]
        for basis in Readings.BASES:
            out += [f"### Equal {basis}: each arm at the default's {basis} after e epochs", ""]
            if basis != "steps" and rd.per_step(basis, ratio) is None:
                out += ["No costs measured for this k/B.", ""]
                continue
            out += ["| training set | e | " + " | ".join(arms) + " |", "|---|---|" + "---|" * len(arms)]
            for config in configs:
                for e in range(1, EPOCHS + 1):
                    cells = [rd.cell(ratio, config, a, e, basis) for a in arms]
                    out.append(f"| {config} | {e} | " + " | ".join(cells) + " |")
            out.append("")
        out += [
            "### Default minus accumulated B, paired by seed (mean ± sd; **ahead** / **behind**: every seed agrees "
            f"and the mean exceeds the spread and {MIN_EFFECT})",
            "",
            "| training set | e | equal steps | equal wall-clock | equal FLOPs | equal cost at 8b-LoRA step costs "
            "| accum_then_default - accum_B, "
            "wall-clock | default - stratified k, wall-clock | default - random k, equal steps "
            "| default - stratified k, equal steps |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for config in configs:
            for e in range(1, EPOCHS + 1):
                row = [rd.diff(ratio, config, "default", "accum_B", e, basis)[0] for basis in Readings.BASES]
                row.append(rd.diff(ratio, config, "default", "accum_B", e, LLM_BASIS)[0])
                row.append(rd.diff(ratio, config, "accum_then_default", "accum_B", e, "wall-clock")[0])
                row.append(rd.diff(ratio, config, "default", "stratified_k", e, "wall-clock")[0])
                row.append(rd.diff(ratio, config, "default", "random_k", e, "steps")[0])
                row.append(rd.diff(ratio, config, "default", "stratified_k", e, "steps")[0])
                out.append(f"| {config} | {e} | " + " | ".join(row) + " |")
        out.append("")
    out += summary_section(rd, runs)
    out += selection_section(runs)
    out += [
        "## Curves",
        "",
        "`finite_data.png`: mixture accuracy against FLOPs, per k/B and training set (mean over seeds).",
        "",
    ]
    text = "\n".join(out) + "\n"
    (results / "finite_data.md").write_text(text)
    plot(runs, rd, results / "finite_data.png")
    return text


def summary_section(rd: Readings, runs: list[dict]) -> list[str]:
    """Per regime and epoch count, at equal wall-clock and at equal FLOPs: the best arm (highest
    mean) and the default against accumulated B (paired by seed)."""
    out = [
        "## Summary: which arm to run, at equal wall-clock and at equal FLOPs",
        "",
        "Best arm: the highest mean at the default's cost after e epochs (the runner-up within its seed spread "
        "is named after it); default - accum B: paired by seed. 8b-LoRA step costs (k/B = 1/4 only): each arm's "
        "curve read as if its step cost what `benchmarks/results/step_time/step_time.md` measured at an 8B Llama's "
        "proportions (LoRA, T = 128): default 0.72, random and stratified k 0.24 of accumulation (a projection "
        "from this model's curves, not a measurement at that shape).",
        "",
        "| k/B | training set | e | best, wall-clock | default - accum B, wall-clock | best, FLOPs "
        "| default - accum B, FLOPs | best, 8b-LoRA step costs | default - accum B, 8b-LoRA step costs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for ratio, configs, arms in groups_present(runs):
        for config in configs:
            for e in range(1, EPOCHS + 1):
                row = [ratio, config, str(e)]
                for basis in ("wall-clock", "FLOPs", LLM_BASIS):
                    if rd.per_step(basis, ratio) is None:
                        row += ["n/a", "n/a"]
                        continue
                    means = {}
                    for a in arms:
                        v = rd.values(ratio, config, a, e, basis)
                        if v and len(v) == len(rd.seeds(ratio, config, a)):
                            means[a] = (statistics.mean(v.values()), statistics.stdev(v.values()) if len(v) > 1 else 0)
                    ranked = sorted(means, key=lambda a: -means[a][0])
                    cell = "n/a"
                    if ranked:
                        best = ranked[0]
                        cell = f"{best} {means[best][0]:.3f}"
                        close = [
                            a for a in ranked[1:] if means[best][0] - means[a][0] <= max(means[best][1], means[a][1])
                        ]
                        if close:
                            cell += " (~ " + ", ".join(close) + ")"
                    missing = [a for a in arms if a not in means and rd.seeds(ratio, config, a)]
                    if missing:
                        cell += " (past their runs: " + ", ".join(missing) + ")"
                    row += [cell, rd.diff(ratio, config, "default", "accum_B", e, basis)[0]]
                out.append("| " + " | ".join(row) + " |")
    out.append("")
    return out


def cost_section(costs_data: dict | None) -> list[str]:
    out = [
        "## Cost of a step",
        "",
        "FLOPs counted from the model's shape (`step_flops`: hidden 128, 2 layers, vocabulary 34, LoRA r = 8 on "
        "every linear, T = 21; LoRA backward = input gradients + adapters, the sketch's backward to the last "
        "block's v_proj); seconds measured round-robin in one process on the same batches (`costs.json`, "
        "the 2-core CPU shared with another job). Each as a ratio to accumulating B.",
        "",
        "| k/B | arm | FLOPs / step | FLOPs / accum | measured ms / step | measured / accum |",
        "|---|---|---|---|---|---|",
    ]
    sec = costs_data["seconds_per_step"] if costs_data else {}
    for ratio, (b, k) in RATIOS.items():
        if ratio == "quick":
            continue
        fa = step_flops("accum_B", b, k)
        for arm in COST_ARMS:
            f = step_flops(arm, b, k)
            s = sec.get(ratio, {})
            ms = f"{s[arm] * 1000:.1f}" if arm in s else "not measured"
            rel = f"{s[arm] / s['accum_B']:.2f}" if arm in s else "n/a"
            out.append(f"| {ratio} | {arm} | {f / 1e9:.3f} G | {f / fa:.2f} | {ms} | {rel} |")
    out.append("")
    return out


def selection_section(runs: list[dict]) -> list[str]:
    out = [
        "## What the coreset trained on (over all steps)",
        "",
        "| k/B | training set | arm | duplicates in the coreset | duplicates in the batch | corrupted share of the "
        "coreset |",
        "|---|---|---|---|---|---|",
    ]
    for ratio, configs, arms in groups_present(runs):
        for config in configs:
            for arm in ("default", "stratified_k", "accum_then_default"):
                reps = [
                    r["selection_report"]
                    for r in runs
                    if (r["ratio"], r["config"], r["arm"]) == (ratio, config, arm) and r["selection_report"]
                ]
                if not reps:
                    continue
                cells = [
                    mean_sd_text([x[key] for x in reps if key in x])
                    for key in ("selected_duplicate_share", "batch_duplicate_share", "selected_corrupted_share")
                ]
                if CONFIGS[config].noise is None:
                    cells[2] = "(clean)"
                out.append(f"| {ratio} | {config} | {arm} | " + " | ".join(cells) + " |")
    out.append("")
    return out


def plot(runs: list[dict], rd: Readings, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(ratio, c) for ratio, configs, _ in groups_present(runs) for c in configs]
    if not panels:
        return
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (ratio, config) in zip(axes.flat, panels):
        b, k = RATIOS[ratio]
        per = {a: step_flops(a, b, k) for a in COST_ARMS}
        per_epoch = next(r["steps_per_epoch"] for r in runs if (r["ratio"], r["config"]) == (ratio, config))
        for arm in MAIN_ARMS:
            rs = [r for r in runs if (r["ratio"], r["config"], r["arm"]) == (ratio, config, arm)]
            if not rs:
                continue
            steps = [p["step"] for p in rs[0]["curve"]]
            x = [cumulative(arm, s, rs[0]["steps_per_epoch"], per) / 1e12 for s in steps]
            y = [statistics.mean(value_at_step(r, s, KEY) for r in rs) for s in steps]
            ax.plot(x, y, label=arm, marker=".")
        limit = cumulative("default", EPOCHS * per_epoch, per_epoch, per) / 1e12
        ax.set_xlim(0, limit * 1.05)
        ax.set_title(f"{config}, k/B {ratio}", fontsize=9)
        ax.set_xlabel("training TFLOPs (counted)")
        ax.set_ylabel("mixture accuracy")
    axes.flat[0].legend(fontsize=7)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--grid", action="store_true", help="run the grid's missing runs (resumable)")
    ap.add_argument("--costs", action="store_true", help="measure seconds per step round-robin, per k/B")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--report", action="store_true")
    ap.add_argument("--quick", action="store_true", help="a tiny grid in a temporary folder (smoke check)")
    ap.add_argument("--results", type=Path, default=None)
    a = ap.parse_args()
    if a.quick:
        global EPOCHS
        EPOCHS = 2
        results = a.results or Path(tempfile.mkdtemp(prefix="finite_data_quick_"))
        measure_costs(["quick"], 1, results)
        run_grid([("quick", ["quick"], MAIN_ARMS)], [0], results, eval_size=4)
        print(report(results))
        print(f"quick results in {results}")
        return
    results = a.results or RESULTS
    if a.costs:
        measure_costs([r for r in RATIOS if r != "quick"], a.rounds, results)
    if a.grid:
        run_grid(GRID, SEEDS, results)
    if a.report:
        print(report(results))


if __name__ == "__main__":
    main()
