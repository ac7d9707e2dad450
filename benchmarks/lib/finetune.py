"""The fine-tuning benchmarks' set-up (finetune.py, finetune_slice.py, target_curvature.py): LoRA
on the committed pretrained base, the imbalanced 7-source mixture (label noise in the training
pool when asked), the arms they train and how each one steps, and task accuracy.

An arm is one way of training (:class:`Arm`): a baseline sampler or batch, or ``CoresetOptimizer``
with its options; :data:`ARMS` names the fine-tuning benchmark's. Every pool row carries its
number in ``index`` (sliced with the batch, never given to the model), and ``Context.corrupted``
marks the rows the label noise made wrong: what the noise report needs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from coreset_optim import CoresetOptimizer
from coreset_optim.datasets.base_model import load_base
from coreset_optim.datasets.evaluation import evaluate_tasks, macro, mixture_weighted
from coreset_optim.datasets.noise import corrupt_mixture
from coreset_optim.datasets.tasks import FinetuneMixture, make_finetune_mixture
from coreset_optim.integrations.causal_lm import causal_lm_per_example_loss

from .models import with_lora
from .samplers import fixed_indices, tempered_indices
from .options import add_run_options
from .training import BatchStream, Trainer

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LAST_BLOCK_ALL = r".*layers\.1\..*lora_[AB]\.default"


@dataclass
class Arm:
    """One way of training. ``kind``: random | stratified | tempered | fixed | accum | full |
    coreset. ``options``: for ``CoresetOptimizer`` (coreset, stratified), ``temperature``
    (tempered), ``weights`` and ``balanced`` (fixed). ``steps``: multiple of the benchmark's step
    count this arm runs (cheap arms run longer, for equal wall-clock). ``target``: for
    ``selection="target"``, which held-out batch it aims at (a key of :data:`TARGETS`).
    ``optimizer``, ``k``: None for the benchmark's."""

    kind: str
    options: dict = field(default_factory=dict)
    steps: float = 1.0
    target: str | None = None
    optimizer: str | None = None
    k: int | None = None


GM = {"selection": "gradient_matching"}
SKILLS = {"sort": 1, "reverse": 1, "rotr": 1, "succ": 1}
ARMS: dict[str, Arm] = {
    "random_k": Arm("random", steps=4.5),
    "stratified_k": Arm("stratified", {"selection": "random"}, steps=2.0),
    "balanced_k": Arm("tempered", {"temperature": float("inf")}, steps=2.0),
    "temperature2_k": Arm("tempered", {"temperature": 2.0}),
    "accum_B": Arm("accum", steps=1.5),
    "batch_B": Arm("full"),
    "default": Arm("coreset"),  # the library's default preset
    "in_batch": Arm("coreset", {"reference": None}),  # the default without its reference (the rule before)
    # the default of round three (its gate on the share of implausible rows, at 0.40), and that rule
    # with its reference on every step
    "gate_implausible_40": Arm("coreset", {"gate_statistic": "implausible"}),
    "reference_every_1": Arm("coreset", {"gate_statistic": "implausible", "reference_every": 1}),
    "gradient_matching": Arm("coreset", GM),  # the default before selection="loss"
    "trimmed_loss": Arm("coreset", {"selection": "trimmed_loss"}),  # loss without the high-loss cluster
    "loss": Arm("coreset", {"selection": "loss"}),  # highest loss per source
    "consensus_loss": Arm("coreset", {"selection": "consensus_loss"}),  # loss among agreeing examples
    "consensus_positive": Arm("coreset", {"selection": "consensus_loss_positive"}),
    "consensus_half": Arm("coreset", {"selection": "consensus_loss_half"}),
    "consensus_product": Arm("coreset", {"selection": "consensus_loss_product"}),
    "consensus_unit": Arm("coreset", {"selection": "consensus_loss_unit"}),
    "consensus_trim": Arm("coreset", {"selection": "consensus_loss_trim"}),
    "consensus_lowhalf": Arm("coreset", {"selection": "consensus_loss_lowhalf"}),
    "consensus_lowhalf_half": Arm("coreset", {"selection": "consensus_loss_lowhalf_half"}),
    "colm": Arm("coreset", {"preset": "colm"}),
    "fl_l1": Arm("coreset", {"selection": "facility_location", "similarity": "l1"}),
    "fl_cosine": Arm("coreset", {"selection": "facility_location", "similarity": "cosine"}),
    "gm_unconstrained": Arm("coreset", {"selection": "gradient_matching_unconstrained"}),
    "gm_last_block": Arm("coreset", {**GM, "sketch_modules": LAST_BLOCK_ALL}),
    "gm_no_keep": Arm("coreset", {**GM, "keep_sources": None}),
    "gm_uniform_within": Arm("coreset", {"selection": "gradient_matching_uniform"}),
    "balanced_stratified": Arm("stratified", {"selection": "random", "temperature": float("inf")}),
    "balanced_gm": Arm("coreset", {**GM, "temperature": float("inf")}),
    "temperature2_stratified": Arm("stratified", {"selection": "random", "temperature": 2.0}),
    "temperature2_gm": Arm("coreset", {**GM, "temperature": 2.0}),
    "default_8bit": Arm("coreset", optimizer="adamw8bit"),
    "gm_8bit": Arm("coreset", GM, optimizer="adamw8bit"),
    "random_k_8bit": Arm("random", optimizer="adamw8bit"),
    "stratified_k_8bit": Arm("stratified", {"selection": "random"}, optimizer="adamw8bit"),
    "accum_B_8bit": Arm("accum", optimizer="adamw8bit"),
    "default_k32": Arm("coreset", k=32),
    "gm_k32": Arm("coreset", GM, k=32),
    "random_k32": Arm("random", k=32),
    "stratified_k32": Arm("stratified", {"selection": "random"}, k=32),
    # Target-aware selection (issue 12): the held-out tasks' target split (disjoint from their
    # evaluation split) as the target; h = curvature. "target" and most variants select with
    # one greedy over the batch (per_source=False, measured first); *_per_source: per-source budgets.
    "target": Arm("coreset", {"selection": "target", "per_source": False}, target="target_split"),
    "target_h1": Arm("coreset", {"selection": "target", "curvature": 1.0, "per_source": False}, target="target_split"),
    "target_h100": Arm(
        "coreset", {"selection": "target", "curvature": 100.0, "per_source": False}, target="target_split"
    ),
    "per_source": Arm("coreset", {"selection": "target", "per_source": True}, target="target_split"),
    "target_last_block": Arm(
        "coreset", {"selection": "target", "sketch_modules": LAST_BLOCK_ALL, "per_source": False}, target="target_split"
    ),
    "target_last_block_per_source": Arm(
        "coreset", {"selection": "target", "sketch_modules": LAST_BLOCK_ALL, "per_source": True}, target="target_split"
    ),
    # A target spread evenly over the training sources (8 examples of each, from the training pool:
    # disjoint from evaluation): does aiming at it beat balanced random k on the macro metric?
    "target_spread": Arm("coreset", {"selection": "target", "per_source": False}, target="spread"),
    # Fixed source reweightings toward the skills the held-out tasks need (an oracle: it knows that
    # sort_reverse needs sort and reverse, rotr_succ needs rotr and succ): k of the large batch with
    # budgets in proportion to count * weight, random within a source, unweighted mean.
    "skills_k": Arm("fixed", {"weights": SKILLS}, steps=3.0),
    "skills_balanced_k": Arm("fixed", {"weights": SKILLS, "balanced": True}, steps=3.0),
    "skills_mixed_k": Arm(
        "fixed",
        {"weights": {"sort": 4, "reverse": 1, "rotr": 4, "succ": 1, "copy": 0.25, "dedupe": 0.5, "max": 0.5}},
        steps=3.0,
    ),
}


@dataclass
class Context:
    """What every arm of a run trains and is scored on. ``target``: the target split (held-out
    examples for ``selection="target"``, disjoint from evaluation). ``corrupted``:
    ``BoolTensor[N]``, the pool rows whose answer the label noise made wrong (None: a clean pool);
    ``mixture.train["index"]`` numbers the pool rows, so a batch's rows can be matched to it."""

    mixture: FinetuneMixture
    target: dict
    args: argparse.Namespace
    corrupted: torch.Tensor | None = None


def spread_target(ctx: Context, per_source: int = 8) -> dict:
    """``per_source`` examples of every training source (the first ones of the pool)."""
    train = ctx.mixture.train
    rows = torch.cat(
        [torch.nonzero(train["source"] == s).flatten()[:per_source] for s in range(len(ctx.mixture.names))]
    )
    return {key: train[key][rows] for key in ("input_ids", "labels")}


# Arm.target -> the held-out batch of selection="target"
TARGETS: dict[str, Callable[[Context], dict]] = {"target_split": lambda ctx: ctx.target, "spread": spread_target}


def add_setup_options(parser: argparse.ArgumentParser, steps: int) -> None:
    """The options of a fine-tuning run: batch, k, steps, seeds, lr, LoRA rank, optimizer, pool and
    split sizes."""
    add_run_options(parser, steps)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--pool", type=int, default=20000)
    parser.add_argument("--eval-size", type=int, default=200)
    parser.add_argument("--target-size", type=int, default=32)


def default_args() -> argparse.Namespace:
    """The fine-tuning benchmark's set-up with its defaults (no label noise)."""
    parser = argparse.ArgumentParser()
    add_setup_options(parser, steps=300)
    return parser.parse_args([])


def noise_settings(args) -> dict | None:
    """The run's label-noise settings, or None for the clean pool."""
    if not getattr(args, "noise", None):
        return None
    return {"model": args.noise, "rate": args.noise_rate, "placement": args.noise_placement, "seed": args.noise_seed}


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


def noise_record(ctx: Context) -> dict | None:
    """What a result keeps of the noise: settings and corrupted rows per source (the mask itself is
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


class NoiseCounts:
    """Under label noise, over a coreset arm's steps: the selected rows that were corrupted, and
    the suspect report against the truth (called after every selection)."""

    def __init__(self, corrupted: torch.Tensor):
        self.corrupted = corrupted
        self.counts = dict.fromkeys(
            ("selected", "selected_corrupted", "flagged", "flagged_corrupted", "corrupted_seen", "seen"), 0
        )

    def __call__(self, big: dict, coreset) -> None:
        truth = self.corrupted[big["index"]]
        c = self.counts
        c["selected"] += len(coreset)
        c["selected_corrupted"] += int(truth[coreset.indices].sum())
        c["corrupted_seen"] += int(truth.sum())
        if coreset.suspects is not None:
            c["seen"] += int(truth.numel())
            c["flagged"] += int(coreset.suspects.sum())
            c["flagged_corrupted"] += int((coreset.suspects & truth).sum())

    def report(self) -> dict:
        """Share of the trained-on examples that were corrupted; the suspects' precision and recall."""
        c = self.counts
        out = {"selected_corrupted_share": c["selected_corrupted"] / max(1, c["selected"])}
        if c["seen"]:  # the method judged: the share flagged (on clean data, every flag is a false one)
            out["flagged_share"] = c["flagged"] / c["seen"]
        if c["flagged"] and c["corrupted_seen"]:
            out["suspect_precision"] = c["flagged_corrupted"] / c["flagged"]
            out["suspect_recall"] = c["flagged_corrupted"] / c["corrupted_seen"]
        return out


def lora_model(seed: int, rank: int):
    """The committed base with fresh LoRA adapters (attention and MLP), initialised from ``seed``."""
    base = load_base()
    torch.manual_seed(seed)
    model = with_lora(base, rank, LORA_TARGETS, lora_dropout=0.0)
    model.train()
    return model


def make_optimizer(name: str, params, lr: float):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=0.0, min_8bit_size=0)
    raise ValueError(f"optimizer must be adamw or adamw8bit, got {name!r}")


def make_trainer(arm: Arm, seed: int, ctx: Context) -> Trainer:
    """``arm``'s trainer: the base with LoRA from ``seed``, its optimizer and training step."""
    args = ctx.args
    k = arm.k or args.k
    model = lora_model(seed, args.rank)
    opt = make_optimizer(arm.optimizer or args.optimizer, [p for p in model.parameters() if p.requires_grad], args.lr)
    gen = torch.Generator().manual_seed(seed + 7)
    o, kind, wrapper, sample, on_select = arm.options, arm.kind, None, None, None
    if kind in ("coreset", "stratified"):
        kind, wrapper = "coreset", CoresetOptimizer(opt, model, coreset_size=k, seed=seed, **o)
        if arm.target is not None:
            wrapper.selection.set_target(TARGETS[arm.target](ctx))
        on_select = None if ctx.corrupted is None else NoiseCounts(ctx.corrupted)
    elif kind == "tempered":
        kind, sample = "sample", lambda big: tempered_indices(big["source"], k, o["temperature"], gen)
    elif kind == "fixed":
        names, balanced = ctx.mixture.names, o.get("balanced", False)
        kind, sample = "sample", lambda big: fixed_indices(big["source"], names, k, o["weights"], balanced, gen)
    loss_fn = lambda b: causal_lm_per_example_loss(model(input_ids=b["input_ids"]), b["labels"])  # noqa: E731
    return Trainer(kind, k, model, opt, loss_fn, wrapper=wrapper, sample=sample, on_select=on_select)


def evaluate(model, mixture: FinetuneMixture) -> dict:
    """Exact match of the greedy answer and answer loss per source, mixture-weighted and macro."""
    res = evaluate_tasks(model, mixture.eval)
    out = {"accuracy": res["accuracy"], "loss": res["loss"]}
    for metric in ("accuracy", "loss"):
        out[f"{metric}_mixture"] = mixture_weighted(res[metric], mixture.names, mixture.shares)
        out[f"{metric}_macro"] = macro(res[metric], mixture.names)
    return out


# --- checks of the set-up (finetune.py --check) -----------------------------------------------
def require(ok: bool, what: str) -> None:
    if not ok:
        raise AssertionError(what)


def check_noise_in_pool_only(clean: Context, noisy: Context) -> None:
    """The label noise changed training-pool answers only, ``noisy.corrupted`` marks exactly the
    changed rows, and the pool rows are numbered in order."""
    changed = (clean.mixture.train["labels"] != noisy.mixture.train["labels"]).any(1)
    require(noisy.corrupted is not None and bool(noisy.corrupted.any()), "the noise corrupted no row")
    require(torch.equal(changed, noisy.corrupted), "the corrupted mask differs from the rows the noise changed")
    n = noisy.mixture.train["input_ids"].shape[0]
    require(torch.equal(noisy.mixture.train["index"], torch.arange(n)), "the pool's index is not 0..N-1")
    for name, data in clean.mixture.eval.items():
        require(torch.equal(noisy.mixture.eval[name]["labels"], data["labels"]), f"the noise changed eval {name}")
    require(torch.equal(noisy.target["labels"], clean.target["labels"]), "the noise changed the target split")


def check_rows_keep_their_index(arm: Arm, ctx: Context) -> int:
    """One training step of ``arm``: every sub-batch its loss sees (whatever it selected) still
    pairs each row with its pool index; a batch without ``index`` must be the target split of a
    target arm. Returns how many sub-batches of pool rows it saw (at least one)."""
    trainer = make_trainer(arm, 0, ctx)
    pool, inner, seen = ctx.mixture.train, trainer.loss_fn, []
    target = set() if arm.target is None else {tuple(r) for r in TARGETS[arm.target](ctx)["input_ids"].tolist()}

    def checked(batch):
        if "index" not in batch:  # (chunks of) the target of selection="target": not pool rows
            ok = all(tuple(r) in target for r in batch["input_ids"].tolist())
            require(ok, "a batch without pool index that is not the target split")
            return inner(batch)
        require(torch.equal(pool["input_ids"][batch["index"]], batch["input_ids"]), "input_ids lost their index")
        require(torch.equal(pool["labels"][batch["index"]], batch["labels"]), "labels lost their index")
        seen.append(batch["index"])
        return inner(batch)

    trainer.loss_fn = checked
    trainer.step(BatchStream(pool, 1).next(ctx.args.batch))
    require(bool(seen), "the loss saw no pool rows")
    return len(seen)


# --- a finite training set (finite_data.py) ---------------------------------------------------
def _prompt_keys(splits: dict) -> set:
    """(op tokens, input tokens) of every row of the evaluation or target splits: a near duplicate
    must not become one of them."""
    from coreset_optim.datasets.tasks import SEP

    keys = set()
    for data in splits.values():
        for row in data["input_ids"].tolist():
            keys.add(tuple(row[: row.index(SEP)]))
    return keys


def near_duplicate(task, symbols: list[int], g: torch.Generator, avoid: set) -> list[int] | None:
    """The row's input with one symbol changed (position and new symbol drawn from ``g``) whose
    prompt is not in ``avoid``: None after 20 tries."""
    from coreset_optim.datasets.tasks import NUM_SYMBOLS, encode

    for _ in range(20):
        s = list(symbols)
        pos = int(torch.randint(len(s), (1,), generator=g))
        s[pos] = (s[pos] + 1 + int(torch.randint(NUM_SYMBOLS - 1, (1,), generator=g))) % NUM_SYMBOLS
        if tuple(encode(task.ops, s, None)[:-1]) not in avoid:  # the prompt without SEP
            return s
    return None


def finite_set(
    mixture: FinetuneMixture, rows: int, duplicate_share: float = 0.0, near_share: float = 0.5, seed: int = 0
) -> tuple[dict, torch.Tensor]:
    """A finite training set of ``rows`` rows, and each row's original (``LongTensor[rows]``: its
    own position for an original row, the copied row's for a duplicate).

    The first ``rows - round(rows * duplicate_share)`` rows of ``mixture.train`` (the pool is
    shuffled: a uniform draw, in the pool's shares) are the originals; the rest are duplicates of
    originals drawn uniformly (with replacement, from ``seed``): a share ``near_share`` of them
    near duplicates (one input symbol changed, the answer recomputed by the row's task, so still a
    correct example, and never a prompt of the evaluation or target splits), the others exact
    copies. Rows in that order (originals, exact copies, near duplicates); the training stream
    shuffles them. Fields: ``input_ids``, ``labels``, ``source``."""
    from coreset_optim.datasets.noise import parse_pool
    from coreset_optim.datasets.tasks import SOURCES, encode, to_batch

    dups = int(round(rows * duplicate_share))
    unique = rows - dups
    if not 0 <= duplicate_share < 1 or unique > mixture.train["source"].shape[0] or unique < 1:
        raise ValueError(f"cannot make {rows} rows with {duplicate_share} duplicates from the pool")
    base = {key: mixture.train[key][:unique] for key in ("input_ids", "labels", "source")}
    g = torch.Generator().manual_seed(seed)
    of = torch.randint(unique, (dups,), generator=g)
    near = int(round(dups * near_share))
    exact, near_of = of[: dups - near], of[dups - near :]
    parsed = parse_pool({key: base[key][near_of] for key in ("input_ids", "labels", "source")}) if near else None
    tasks = [s.task for s in SOURCES]
    avoid = _prompt_keys(mixture.eval) | _prompt_keys(mixture.target)
    new_rows, prompts, kept = [], [], []
    for i in range(near):
        task = tasks[parsed.source[i]]
        s = near_duplicate(task, parsed.inputs[i], g, avoid)
        if s is None:  # no acceptable change: an exact copy instead
            s = parsed.inputs[i]
        prompt = encode(task.ops, s, None)
        new_rows.append(encode(task.ops, s, task.answer(s)))
        prompts.append(len(prompt))
        kept.append(int(near_of[i]))
    parts = [base, {key: base[key][exact] for key in base}]
    if near:
        nb = to_batch(new_rows, prompts)
        parts.append({**nb, "source": base["source"][near_of]})
    train = {key: torch.cat([p[key] for p in parts]) for key in base}
    original = torch.cat([torch.arange(unique), exact, torch.tensor(kept, dtype=torch.long)])
    return train, original


def finite_context(args) -> tuple[Context, torch.Tensor]:
    """:func:`build_context` for a finite training set: ``args.rows`` rows drawn once from a clean
    pool of ``args.pool`` (:func:`finite_set`, ``args.duplicate_share`` duplicates, data seed
    ``args.data_seed``), then the label noise of ``args`` applied to the set itself (every row,
    duplicates included, corrupted independently at the noise rate). Returns the context (its
    ``mixture.train`` is the set, rows numbered in ``index``) and each row's original."""
    from coreset_optim.datasets.noise import corrupt_pool
    from coreset_optim.datasets.tasks import SOURCES

    mixture = make_finetune_mixture(args.pool, args.eval_size, args.target_size, seed=0)
    train, original = finite_set(mixture, args.rows, args.duplicate_share, args.near_share, args.data_seed)
    noise, corrupted = noise_settings(args), None
    if noise is not None:
        tasks = [s.task for s in SOURCES]
        train, corrupted = corrupt_pool(train, tasks, noise["model"], noise["rate"], noise["placement"], noise["seed"])
    train = {**train, "index": torch.arange(train["source"].shape[0])}
    mixture = replace(mixture, train=train)
    target = {key: torch.cat([mixture.target[t][key] for t in mixture.held_out]) for key in ("input_ids", "labels")}
    return Context(mixture, target, args, corrupted), original
