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

Add a method: ``METHODS["name"] = Method("coreset", {CoresetOptimizer options}, target=...)``;
``target(ctx)`` returns the held-out batch of a target method (``selection.set_target``); ``ctx.target`` is the
held-out tasks' target split (a batch with input_ids/labels), disjoint from their evaluation split.

Label noise (``--noise MODEL --noise-rate R --noise-placement per_source|concentrated``): wrong answers
in the training pool only (:mod:`coreset_optim.datasets.noise`); scores stay on the clean held-out data,
and the results are saved under a name that carries the settings (``finetune_noise-random_tokens-0.2``).
Every training row carries its pool row in ``index`` (sliced with the batch, never given to the model),
and ``ctx.corrupted`` marks the pool rows with wrong answers: what a report of rejected rows needs.

Run: PYTHONPATH=. python benchmarks/finetune.py            (the full benchmark)
     PYTHONPATH=. python benchmarks/finetune.py --quick    (a few minutes)
     PYTHONPATH=. python benchmarks/finetune.py --quick --noise random_tokens --noise-rate 0.2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ActivationMeter, BatchStream, machine, register_experiments, results_dir, md_header, stamped  # noqa: E402

from coreset_optim import CoresetOptimizer  # noqa: E402
from coreset_optim.mixture.budget import tempered_split
from coreset_optim.datasets.base_model import load_base  # noqa: E402
from coreset_optim.datasets.evaluation import evaluate_tasks, macro, mixture_weighted  # noqa: E402
from coreset_optim.datasets.noise import NOISE_MODELS, PLACEMENTS, check_noise, corrupt_mixture  # noqa: E402
from coreset_optim.datasets.tasks import FinetuneMixture, make_finetune_mixture  # noqa: E402
from coreset_optim.integrations.causal_lm import causal_lm_per_example_loss  # noqa: E402
from coreset_optim.methods.gradient_matching import GradientMatching
from coreset_optim.methods.base import SketchedMethod
from coreset_optim.methods.registry import register_method, METHODS as METHOD_REGISTRY
from coreset_optim.methods.suspects import hardest_first

RESULTS = results_dir("finetune")  # benchmarks/results/finetune/
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAST_BLOCK_ALL = r".*layers\.1\..*lora_[AB]\.default"


@dataclass
class Method:
    """``kind``: random | stratified | tempered | accum | full | coreset. ``options``: for
    CoresetOptimizer (coreset, stratified) or ``temperature`` (tempered). ``steps``: multiple of
    the benchmark's step count this method runs (cheap methods run longer, for equal wall-clock)."""

    kind: str
    options: dict = field(default_factory=dict)
    steps: float = 1.0
    target: Callable | None = None  # ctx -> the held-out batch of selection="target"
    optimizer: str | None = None  # None: the benchmark's --optimizer
    k: int | None = None  # None: the benchmark's --k


GM = {"selection": "gradient_matching"}
METHODS: dict[str, Method] = {
    "random_k": Method("random", steps=4.5),
    "stratified_k": Method("stratified", {"selection": "random"}, steps=2.0),
    "balanced_k": Method("tempered", {"temperature": float("inf")}, steps=2.0),
    "temperature2_k": Method("tempered", {"temperature": 2.0}),
    "accum_B": Method("accum", steps=1.5),
    "batch_B": Method("full"),
    "default": Method("coreset"),  # the library's default: selection="loss" since this benchmark
    "gradient_matching": Method("coreset", GM),  # the default before it
    "trimmed_loss": Method("coreset", {"selection": "trimmed_loss"}),  # loss without the high-loss cluster
    "loss": Method("coreset", {"selection": "loss"}),  # highest loss per source, named (not "the default")
    "consensus_loss": Method("coreset", {"selection": "consensus_loss"}),  # loss among agreeing examples
    "consensus_positive": Method("coreset", {"selection": "consensus_loss_positive"}),
    "consensus_half": Method("coreset", {"selection": "consensus_loss_half"}),
    "consensus_product": Method("coreset", {"selection": "consensus_loss_product"}),
    "consensus_unit": Method("coreset", {"selection": "consensus_loss_unit"}),
    "consensus_trim": Method("coreset", {"selection": "consensus_loss_trim"}),
    "consensus_lowhalf": Method("coreset", {"selection": "consensus_loss_lowhalf"}),
    "consensus_lowhalf_half": Method("coreset", {"selection": "consensus_loss_lowhalf_half"}),
    "colm": Method("coreset", {"preset": "colm"}),
    "fl_l1": Method("coreset", {"selection": "facility_location", "similarity": "l1"}),
    "fl_cosine": Method("coreset", {"selection": "facility_location", "similarity": "cosine"}),
    "gm_unconstrained": Method("coreset", {"selection": "gradient_matching_unconstrained"}),
    "gm_last_block": Method("coreset", {**GM, "sketch_modules": LAST_BLOCK_ALL}),
    "gm_no_keep": Method("coreset", {**GM, "keep_sources": None}),
    "gm_uniform_within": Method("coreset", {"selection": "gradient_matching_uniform"}),
    "balanced_stratified": Method("stratified", {"selection": "random", "temperature": float("inf")}),
    "balanced_gm": Method("coreset", {**GM, "temperature": float("inf")}),
    "temperature2_stratified": Method("stratified", {"selection": "random", "temperature": 2.0}),
    "temperature2_gm": Method("coreset", {**GM, "temperature": 2.0}),
    "default_8bit": Method("coreset", optimizer="adamw8bit"),
    "gm_8bit": Method("coreset", GM, optimizer="adamw8bit"),
    "random_k_8bit": Method("random", optimizer="adamw8bit"),
    "stratified_k_8bit": Method("stratified", {"selection": "random"}, optimizer="adamw8bit"),
    "accum_B_8bit": Method("accum", optimizer="adamw8bit"),
    "default_k32": Method("coreset", k=32),
    "gm_k32": Method("coreset", GM, k=32),
    "random_k32": Method("random", k=32),
    "stratified_k32": Method("stratified", {"selection": "random"}, k=32),
    # Target-aware selection (issue 12): the held-out tasks' target split (disjoint from their
    # evaluation split) as the target; h = curvature. "target" and most variants select with
    # one greedy over the batch (per_source=False, measured first); *_per_source: per-source budgets.
    "target": Method("coreset", {"selection": "target", "per_source": False}, target=lambda ctx: ctx.target),
    "target_h1": Method(
        "coreset",
        {"selection": "target", "curvature": 1.0, "per_source": False},
        target=lambda ctx: ctx.target,
    ),
    "target_h100": Method(
        "coreset",
        {"selection": "target", "curvature": 100.0, "per_source": False},
        target=lambda ctx: ctx.target,
    ),
    "per_source": Method("coreset", {"selection": "target", "per_source": True}, target=lambda ctx: ctx.target),
    "target_last_block": Method(
        "coreset",
        {"selection": "target", "sketch_modules": LAST_BLOCK_ALL, "per_source": False},
        target=lambda ctx: ctx.target,
    ),
    "target_last_block_per_source": Method(
        "coreset",
        {"selection": "target", "sketch_modules": LAST_BLOCK_ALL, "per_source": True},
        target=lambda ctx: ctx.target,
    ),
    # A target spread evenly over the training sources (8 examples of each, from the training pool:
    # disjoint from evaluation): does aiming at it beat balanced random k on the macro metric?
    "target_spread": Method(
        "coreset",
        {"selection": "target", "per_source": False},
        target=lambda ctx: spread_target(ctx),
    ),
    # Fixed source reweightings toward the skills the held-out tasks need (an oracle: it knows that
    # sort_reverse needs sort and reverse, rotr_succ needs rotr and succ): k of the large batch with
    # budgets in proportion to count * weight, random within a source, unweighted mean.
    "skills_k": Method("fixed", {"weights": {"sort": 1, "reverse": 1, "rotr": 1, "succ": 1}}, steps=3.0),
    "skills_balanced_k": Method(
        "fixed", {"weights": {"sort": 1, "reverse": 1, "rotr": 1, "succ": 1}, "balanced": True}, steps=3.0
    ),
    "skills_mixed_k": Method(
        "fixed",
        {"weights": {"sort": 4, "reverse": 1, "rotr": 4, "succ": 1, "copy": 0.25, "dedupe": 0.5, "max": 0.5}},
        steps=3.0,
    ),
}
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


def gradient_matching_uniform(x, k, *, watch=None, **_):
    """Experiment only: gradient matching's examples, each weighted n / k (uniform within a source)."""
    from coreset_optim.methods.gradient_matching import greedy_matching

    chosen, _ = greedy_matching(x, k)
    return chosen, torch.full((k,), x.shape[0] / k)


def agreement(x: torch.Tensor) -> torch.Tensor:
    """Cosine of each row with the mean of the other rows of its source (leave-one-out)."""
    n = x.shape[0]
    others = (x.sum(0, keepdim=True) - x) / max(1, n - 1)
    return torch.nn.functional.cosine_similarity(x, others, dim=1)


def consensus_loss(x, k, *, losses, rows, mode="positive", **_):
    """Experiment: highest loss among the rows that agree with their source's consensus."""
    n = rows.numel()
    local = losses.to(rows.device).index_select(0, rows).double()
    a = agreement(x.double())
    if mode in ("lowhalf", "lowhalf_half"):  # votes from the source's lower-loss half only (small-loss criterion)
        u = torch.nn.functional.normalize(x.double(), dim=1)
        voter = (local <= local.median()).double()[:, None]
        a = torch.nn.functional.cosine_similarity(x.double(), (u * voter).sum(0, keepdim=True) - u * voter, dim=1)
        ok = a > 0 if mode == "lowhalf" else a >= a.median()
    elif mode == "unit":  # each other example one vote: the sum of their unit vectors
        u = torch.nn.functional.normalize(x.double(), dim=1)
        ok = torch.nn.functional.cosine_similarity(x.double(), u.sum(0, keepdim=True) - u, dim=1) > 0
    elif mode == "trim":  # agreeing and not in the high-loss cluster
        from coreset_optim.methods.trimmed_loss import high_loss_cluster

        ok = (a > 0) & ~high_loss_cluster(local)
    elif mode == "positive":
        ok = a > 0
    elif mode == "half":
        ok = a >= a.median()
    else:  # product
        key = local * a.clamp(min=0)
        return torch.sort(key, descending=True, stable=True).indices[:k], torch.full((k,), n / k)
    return hardest_first(local, k, ~ok), torch.full((k,), n / k)


@dataclass(kw_only=True)
class GradientMatchingUniform(GradientMatching):
    """Experiment only: gradient matching's examples, each weighted n / k."""

    name: ClassVar[str] = "gradient_matching_uniform"

    def choose(self, x, k, **context):
        return gradient_matching_uniform(x, k, **context)


@dataclass(kw_only=True)
class ConsensusVariant(SketchedMethod):
    """Experiment: :func:`consensus_loss` with the agreement rule ``mode`` (one registered
    subclass per mode, ``consensus_loss_<mode>``; no suspects reported)."""

    mode: ClassVar[str] = "positive"

    def choose(self, x, k, **context):
        return consensus_loss(x, k, mode=self.mode, **context)


def register_finetune_experiments() -> None:
    register_experiments()
    register_method(GradientMatchingUniform)
    for mode in ("positive", "half", "product", "unit", "trim", "lowhalf", "lowhalf_half"):
        name = f"consensus_loss_{mode}"
        if name not in METHOD_REGISTRY:
            register_method(type(f"ConsensusLoss_{mode}", (ConsensusVariant,), {"name": name, "mode": mode}))


@dataclass
class Context:
    """``corrupted``: ``BoolTensor[N]``, the pool rows whose answer the label noise made wrong (None:
    a clean pool); ``mixture.train["index"]`` numbers the pool rows, so a batch's rows can be matched to it."""

    mixture: FinetuneMixture
    target: dict
    args: argparse.Namespace
    corrupted: torch.Tensor | None = None


def lora_model(seed: int, rank: int):
    """The committed base with fresh LoRA adapters (attention and MLP), initialised from ``seed``."""
    from peft import LoraConfig, get_peft_model

    base = load_base()
    torch.manual_seed(seed)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=LORA_TARGETS, lora_dropout=0.0))
    model.train()
    return model


def make_optimizer(name: str, params, lr: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0, min_8bit_size=0)
    raise ValueError(f"optimizer must be adamw or adamw8bit, got {name!r}")


def tempered_indices(source: torch.Tensor, k: int, temperature: float, g: torch.Generator) -> torch.Tensor:
    """``k`` rows of a batch, per-source budgets from :func:`tempered_split`, random within a source."""
    num = int(source.max()) + 1
    counts = torch.bincount(source, minlength=num).tolist()
    alloc = tempered_split(counts, k, temperature)
    picked = []
    for s, a in enumerate(alloc):
        if a:
            rows = torch.nonzero(source == s).flatten()
            picked.append(rows[torch.randperm(rows.numel(), generator=g)[:a]])
    return torch.cat(picked).sort().values


def spread_target(ctx, per_source: int = 8) -> dict:
    """``per_source`` examples of every training source (the first ones of the pool)."""
    train = ctx.mixture.train
    rows = torch.cat(
        [torch.nonzero(train["source"] == s).flatten()[:per_source] for s in range(len(ctx.mixture.names))]
    )
    return {key: train[key][rows] for key in ("input_ids", "labels")}


def fixed_indices(
    source: torch.Tensor, names: list[str], k: int, weights: dict, balanced: bool, g: torch.Generator
) -> torch.Tensor:
    """``k`` rows of a batch, source s getting a budget in proportion to ``count_s * weight_s``
    (``balanced``: ``weight_s`` alone, among the sources present), floors then one at a time, capped at
    the source's count (the rest goes to the other weighted sources, then to any), random within."""
    counts = torch.bincount(source, minlength=len(names)).tolist()
    w = [float(weights.get(n, 0.0)) if c else 0.0 for n, c in zip(names, counts)]
    score = [wi if balanced else wi * c for wi, c in zip(w, counts)]
    alloc = [0] * len(names)
    left = k
    for _ in range(2):  # weighted sources first, then every source for what is left
        while left > 0:
            open_ = [s for s in range(len(names)) if alloc[s] < counts[s] and score[s] > 0]
            if not open_:
                break
            total = sum(score[s] for s in open_)
            raw = {s: left * score[s] / total for s in open_}
            give = {s: min(int(raw[s]), counts[s] - alloc[s]) for s in open_}
            if sum(give.values()) == 0:  # hand out one by one, largest remainder first
                s = max(open_, key=lambda s: (raw[s] - int(raw[s]), score[s], -s))
                give = {s: 1}
            for s, n in give.items():
                alloc[s] += n
                left -= n
        score = [1.0 if c else 0.0 for c in counts]
    picked = []
    for s, a in enumerate(alloc):
        if a:
            rows = torch.nonzero(source == s).flatten()
            picked.append(rows[torch.randperm(rows.numel(), generator=g)[:a]])
    return torch.cat(picked).sort().values


class Trainer:
    """One method's model, optimizer and training step on a large batch."""

    def __init__(self, name: str, seed: int, ctx: Context):
        args = ctx.args
        self.name, self.method = name, METHODS[name]
        self.k = self.method.k or args.k
        self.model = lora_model(seed, args.rank)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.method.optimizer or args.optimizer, params, args.lr)
        self.meter = ActivationMeter(self.model)
        model = self.model
        self.loss_fn = self.meter.wrap(
            lambda b: causal_lm_per_example_loss(model(input_ids=b["input_ids"]), b["labels"])
        )
        self.gen = torch.Generator().manual_seed(seed + 7)
        self.wrapper = None
        if self.method.kind in ("coreset", "stratified"):
            self.wrapper = CoresetOptimizer(self.opt, self.model, coreset_size=self.k, seed=seed, **self.method.options)
        if self.method.target is not None:
            self.wrapper.selection.set_target(self.method.target(ctx))
        self.names = ctx.mixture.names
        self.corrupted = ctx.corrupted
        # Under label noise: rows trained on that were corrupted, and the suspect report against truth.
        self.noise_counts = {
            "selected": 0,
            "selected_corrupted": 0,
            "flagged": 0,
            "flagged_corrupted": 0,
            "corrupted_seen": 0,
        }

    def step(self, big: dict) -> None:
        k, kind, loss_fn = self.k, self.method.kind, self.loss_fn
        if kind == "random":
            loss_fn({key: v[:k] for key, v in big.items()}).mean().backward()
        elif kind == "tempered":
            idx = tempered_indices(big["source"], k, self.method.options["temperature"], self.gen)
            loss_fn({key: v[idx] for key, v in big.items()}).mean().backward()
        elif kind == "fixed":
            o = self.method.options
            idx = fixed_indices(big["source"], self.names, k, o["weights"], o.get("balanced", False), self.gen)
            loss_fn({key: v[idx] for key, v in big.items()}).mean().backward()
        elif kind == "full":
            loss_fn(big).mean().backward()
        elif kind == "accum":
            n = big["input_ids"].shape[0]
            for start in range(0, n, k):
                (loss_fn({key: v[start : start + k] for key, v in big.items()}).sum() / n).backward()
        else:
            coreset = self.wrapper.select(big, loss_fn, sources=big["source"])
            if self.corrupted is not None:
                self.count_noise(big, coreset)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)

    def count_noise(self, big: dict, coreset) -> None:
        """Add this step's selected-and-corrupted and suspect-vs-corrupted counts."""
        truth = self.corrupted[big["index"]]
        c = self.noise_counts
        c["selected"] += len(coreset)
        c["selected_corrupted"] += int(truth[coreset.indices].sum())
        c["corrupted_seen"] += int(truth.sum())
        if coreset.suspects is not None:
            c["flagged"] += int(coreset.suspects.sum())
            c["flagged_corrupted"] += int((coreset.suspects & truth).sum())


def noise_report(counts: dict) -> dict:
    """Share of the trained-on examples that were corrupted; the suspects' precision and recall."""
    out = {"selected_corrupted_share": counts["selected_corrupted"] / max(1, counts["selected"])}
    if counts["flagged"] or counts["flagged_corrupted"]:
        out["suspect_precision"] = counts["flagged_corrupted"] / max(1, counts["flagged"])
        out["suspect_recall"] = counts["flagged_corrupted"] / max(1, counts["corrupted_seen"])
    return out


def build_context(args) -> Context:
    """The mixture (training pool with label noise if ``args.noise``; evaluation and target splits
    always clean), each pool row numbered in ``train["index"]``, and the held-out tasks' target."""
    mixture = make_finetune_mixture(args.pool, args.eval_size, args.target_size, seed=0)
    noise, corrupted = noise_settings(args), None
    if noise is not None:
        mixture, corrupted = corrupt_mixture(mixture, noise["model"], noise["rate"], noise["placement"], noise["seed"])
    mixture = replace(mixture, train={**mixture.train, "index": torch.arange(mixture.train["source"].shape[0])})
    target = {key: torch.cat([mixture.target[t][key] for t in mixture.held_out]) for key in ("input_ids", "labels")}
    return Context(mixture, target, args, corrupted)


def noise_settings(args) -> dict | None:
    """The run's label-noise settings, or None for the clean pool."""
    if not getattr(args, "noise", None):
        return None
    return {"model": args.noise, "rate": args.noise_rate, "placement": args.noise_placement, "seed": args.noise_seed}


def result_name(out: str, noise: dict | None) -> str:
    """``out`` for a clean pool; with noise, ``out`` plus the settings (placement and seed when not
    the defaults), so that noisy results never overwrite clean ones or each other."""
    if noise is None:
        return out
    name = f"{out}_noise-{noise['model']}-{noise['rate']:g}"
    if noise["placement"] != "per_source":
        name += f"-{noise['placement']}"
    return name + (f"-seed{noise['seed']}" if noise["seed"] else "")


def noise_record(ctx: Context) -> dict | None:
    """What the JSON keeps of the noise: settings and corrupted rows per source (the mask itself is
    :func:`corrupt_mixture` of the same settings)."""
    noise = noise_settings(ctx.args)
    if noise is None:
        return None
    source, names = ctx.mixture.train["source"], ctx.mixture.names
    per = torch.bincount(source[ctx.corrupted], minlength=len(names)).tolist()
    return {
        **noise,
        "corrupted": int(ctx.corrupted.sum()),
        "pool": int(source.shape[0]),
        "corrupted_per_source": dict(zip(names, per)),
        "applied_to": "training pool only; evaluation clean",
    }


def evaluate(model, mixture: FinetuneMixture) -> dict:
    res = evaluate_tasks(model, mixture.eval)
    out = {"accuracy": res["accuracy"], "loss": res["loss"]}
    for metric in ("accuracy", "loss"):
        out[f"{metric}_mixture"] = mixture_weighted(res[metric], mixture.names, mixture.shares)
        out[f"{metric}_macro"] = macro(res[metric], mixture.names)
    return out


def run(name: str, seed: int, args, progress: Callable | None = None) -> dict:
    """Train ``name`` from the base with ``seed``; evaluate every ``eval_every`` steps.
    ``progress(name, step, total)`` is called after every step."""
    torch.set_num_threads(1)
    register_finetune_experiments()
    ctx = build_context(args)
    trainer = Trainer(name, seed, ctx)
    total = int(round(args.steps * METHODS[name].steps)) if args.equal_time else args.steps
    stream = BatchStream(ctx.mixture.train, seed + 1)
    curve = [{"step": 0, **evaluate(trainer.model, ctx.mixture)}]
    spent = 0.0
    for step in range(1, total + 1):
        big = stream.next(args.batch)
        t0 = time.perf_counter()
        trainer.step(big)
        spent += time.perf_counter() - t0
        if step % args.eval_every == 0 or step == total:
            curve.append({"step": step, "measured_time": spent, **evaluate(trainer.model, ctx.mixture)})
        if progress is not None:
            progress(name, step, total)
    result = {"method": name, "seed": seed, "steps": total, "curve": curve, "activation_bytes": trainer.meter.peak}
    if trainer.corrupted is not None and trainer.wrapper is not None:
        result["noise_report"] = noise_report(trainer.noise_counts)
    return result


def _run_star(a):
    return run(*a)


def step_costs(methods: list[str], args, rounds: int) -> dict[str, float]:
    """Median seconds per training step of each method, measured round-robin."""
    torch.set_num_threads(1)
    register_finetune_experiments()
    ctx = build_context(args)
    trainers = {m: Trainer(m, 0, ctx) for m in methods}
    stream = BatchStream(ctx.mixture.train, 12345)
    times: dict[str, list[float]] = {m: [] for m in methods}
    for r in range(rounds + 2):
        big = stream.next(args.batch)
        for m, t in trainers.items():
            t0 = time.perf_counter()
            t.step(big)
            if r >= 2:  # warm-up rounds: optimizer state, allocator
                times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}


# --- summary ----------------------------------------------------------------------------------
def at_step(curve, step):
    return next(c for c in curve if c["step"] == step)


def value(point: dict, key: str):
    """``accuracy_mixture`` etc., or ``accuracy:<source>`` for one source."""
    if ":" in key:
        metric, name = key.split(":", 1)
        return point[metric][name]
    return point[key]


def at_time(curve, t, key):
    """Linear interpolation of ``key`` at wall-clock ``t``; None beyond the run."""
    if t > curve[-1]["time"] + 1e-9:
        return None
    for a, b in zip(curve, curve[1:]):
        if a["time"] <= t <= b["time"]:
            f = 0.0 if b["time"] == a["time"] else (t - a["time"]) / (b["time"] - a["time"])
            return value(a, key) + f * (value(b, key) - value(a, key))
    return value(curve[0], key)


def mean_sd(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "per_seed": xs}


def summarize(runs: list[dict], costs: dict, mixture: FinetuneMixture, steps: int) -> dict:
    for r in runs:
        r["seconds_per_step"] = costs[r["method"]]
        for c in r["curve"]:
            c["time"] = c["step"] * costs[r["method"]]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    keys = ["accuracy_mixture", "accuracy_macro", "loss_mixture", "loss_macro"]
    keys += [f"accuracy:{n}" for n in mixture.names + mixture.held_out]
    keys += [f"loss:{n}" for n in mixture.names + mixture.held_out]
    out: dict = {"steps": steps, "smallest_source": mixture.names[-1], "methods": {}}
    for m in methods:
        rs = sorted((r for r in runs if r["method"] == m), key=lambda r: r["seed"])
        s = {key: mean_sd([value(at_step(r["curve"], steps), key) for r in rs]) for key in keys}
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
                    vals.append(None if o is None else at_time(o["curve"], at_step(r["curve"], steps)["time"], key))
                eq[f"{ref}:{key}"] = None if any(v is None for v in vals) else mean_sd(vals)
        s["references_at_equal_time"] = eq
    return out


def paired(ms: dict, a: str, b: str, key: str) -> dict | None:
    """Per-seed ``a - b`` of ``key`` (same seeds, same batches), mean and sd."""
    if a not in ms or b not in ms or ms[a]["seeds"] != ms[b]["seeds"]:
        return None
    return mean_sd([x - y for x, y in zip(ms[a][key]["per_seed"], ms[b][key]["per_seed"])])


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


def fmt(s: dict, digits: int = 3) -> str:
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"


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
        "| method | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
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


def mean_curve(runs: list[dict], m: str, key: str):
    rs = [r for r in runs if r["method"] == m]
    n = min(len(r["curve"]) for r in rs)
    pts = list(zip(*[r["curve"][:n] for r in rs]))
    return (
        [p[0]["step"] for p in pts],
        [statistics.mean(c["time"] for c in p) for p in pts],
        [statistics.mean(value(c, key) for c in p) for p in pts],
    )


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
            xs, ts, ys = mean_curve(runs, m, key)
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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--pool", type=int, default=20000)
    ap.add_argument("--eval-size", type=int, default=200)
    ap.add_argument("--target-size", type=int, default=32)
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


def main(argv=None) -> None:
    args = parse_args(argv)
    methods = args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; known: {list(METHODS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    jobs = [(m, s, args) for m in methods for s in seeds]  # method-major: a cut-short run loses the last methods
    start = time.time()
    runs = []
    RESULTS.mkdir(parents=True, exist_ok=True)
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
        # --jobs 1: in this process (no worker start-up; what the tiny test runs)
        with mp.get_context("spawn").Pool(args.jobs) if args.jobs > 1 else nullcontext() as pool:
            for r in pool.imap_unordered(_run_star, jobs) if pool else map(_run_star, jobs):
                runs.append(r)
                last = r["curve"][-1]
                print(
                    f"[{time.time() - start:5.0f}s] {len(runs)}/{total} {r['method']} seed {r['seed']}: "
                    f"acc mixture {last['accuracy_mixture']:.3f} macro {last['accuracy_macro']:.3f}",
                    file=sys.stderr,
                    flush=True,
                )
                (RESULTS / f"{args.out}.partial.json").write_text(json.dumps({"args": vars(args), "runs": runs}))
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
                "kind": METHODS[m].kind,
                "options": {k: str(v) for k, v in METHODS[m].options.items()},
                "optimizer": METHODS[m].optimizer or args.optimizer,
                "k": METHODS[m].k or args.k,
            }
            for m in methods
        },
        "costs_seconds_per_step": costs,
        "summary": summary,
        "runs": runs,
    }
    payload = stamped(payload, "finetune")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.out}.json").write_text(json.dumps(payload, indent=1))
    md = md_header(payload["produced_by"]) + markdown(summary, ctx.mixture, args, noise_record(ctx))
    (RESULTS / f"{args.out}.md").write_text(md)
    plot(runs, summary, ctx.mixture, RESULTS / f"{args.out}.png")
    print(md)
    (RESULTS / f"{args.out}.partial.json").unlink(missing_ok=True)
    print(f"total {time.time() - start:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
