"""What a ``selection="random"`` step costs next to a plain random-k step, now that it makes no
pass over the large batch (issue 22, item 4: target <= 1.1x).

Arms, stepped round-robin in one process on the same large batches (``lib.training.round_robin_costs``:
two warm-up rounds, then the median seconds per step of each arm):

  random_k      a plain step: forward/backward of k rows of the batch (mean loss), AdamW's step
  random        ``CoresetOptimizer(selection="random")``: select() (no pass), then the step
  random_pass   the behaviour before: the same method with the no-grad loss pass over the whole
                batch (:class:`RandomWithPass`, registered here as ``"random_with_pass"``)

``random`` and ``random_pass`` draw with the same seed on the same batches: the script checks that
they chose the same rows at every step.

Set-ups:

  finetune  the fine-tuning benchmark's (``lib.finetune``): LoRA on every linear of the committed
            base, its per-example answer loss, B = 64, k = 16, sources stratified
  llama     one real shape: a random-init Llama (LlamaConfig; hidden 256, 4 layers, vocabulary
            32,000), LoRA r = 8 on q, v, next-token loss, T = 512, B = 16, k = 4, three sources

One torch thread (a shared 2-core machine): read the ratios, not the seconds.

Usage: ``PYTHONPATH=. python benchmarks/random_cost.py [--rounds-finetune 200] [--rounds-llama 6]`` (about 3 minutes)
Results: benchmarks/results/random_cost/random_cost.{json,md}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import ClassVar

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lib import timing  # noqa: E402,F401  (sets torch's threads: BENCH_THREADS, default 1)
from lib.finetune import Arm, build_context, default_args, make_trainer  # noqa: E402
from lib.models import SIZES, llama, next_token_loss, with_lora  # noqa: E402
from lib.results import machine_info, md_header, results_dir, save_json, table_head  # noqa: E402
from lib.training import BatchStream, Trainer, round_robin_costs  # noqa: E402

from coreset_optim import CoresetOptimizer  # noqa: E402
from coreset_optim.methods.baselines import RandomSubset  # noqa: E402
from coreset_optim.methods.registry import METHODS, register_method  # noqa: E402

ARMS = ("random_k", "random", "random_pass")
LLAMA = dict(size="h256-l4", vocab=32_000, seq_len=512, batch=16, k=4, sources=3, lora_r=8)


@dataclasses.dataclass(kw_only=True)
class RandomWithPass(RandomSubset):
    """``selection="random"`` as it was: the same draws after a no-grad loss pass over the batch."""

    name: ClassVar[str] = "random_with_pass"
    reads_losses: ClassVar[bool] = True


if RandomWithPass.name not in METHODS:
    register_method(RandomWithPass)


class SameDraws:
    """Each selection's indices, per arm, to check that both coreset arms drew the same rows."""

    def __init__(self) -> None:
        self.indices: dict[str, list[list[int]]] = {"random": [], "random_pass": []}

    def recorder(self, arm: str):
        return lambda big, coreset: self.indices[arm].append(coreset.indices.tolist())

    def same(self) -> bool:
        a, b = self.indices["random"], self.indices["random_pass"]
        return len(a) == len(b) > 0 and a == b


def finetune_trainers(draws: SameDraws) -> tuple[dict[str, Trainer], BatchStream, int, dict]:
    """The fine-tuning benchmark's arms (seed 0) and its batch stream."""
    args = default_args()
    ctx = build_context(args)
    trainers = {
        "random_k": make_trainer(Arm("random"), 0, ctx),
        "random": make_trainer(Arm("stratified", {"selection": "random"}), 0, ctx),
        "random_pass": make_trainer(Arm("stratified", {"selection": "random_with_pass"}), 0, ctx),
    }
    for arm in ("random", "random_pass"):
        trainers[arm].on_select = draws.recorder(arm)
    setup = {"batch": args.batch, "k": args.k, "lora_rank": args.rank, "model": "committed base, LoRA on every linear"}
    return trainers, BatchStream(ctx.mixture.train, 12345), args.batch, setup


def llama_trainer(kind: str, selection: str | None, on_select=None) -> Trainer:
    """A LoRA Llama of :data:`LLAMA`'s shape (seed 0) and one arm's step on it."""
    c = LLAMA
    hidden, layers, heads, kv_heads, inter = SIZES[c["size"]]
    model = with_lora(
        llama(c["vocab"], hidden, layers, heads, kv_heads, inter, positions=c["seq_len"]),
        c["lora_r"],
        ["q_proj", "v_proj"],
    )
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    wrapper = (
        None if selection is None else CoresetOptimizer(opt, model, coreset_size=c["k"], seed=0, selection=selection)
    )
    return Trainer(kind, c["k"], model, opt, next_token_loss(model), wrapper=wrapper, on_select=on_select)


def llama_trainers(draws: SameDraws, rounds: int) -> tuple[dict[str, Trainer], BatchStream, int, dict]:
    """The real shape's arms and a stream of random token sequences in :data:`LLAMA`'s sources."""
    c = LLAMA
    g = torch.Generator().manual_seed(0)
    pool = c["batch"] * (rounds + 3)
    train = {
        "input_ids": torch.randint(0, c["vocab"], (pool, c["seq_len"]), generator=g),
        "source": torch.randint(0, c["sources"], (pool,), generator=g),
    }
    trainers = {
        "random_k": llama_trainer("random", None),
        "random": llama_trainer("coreset", "random", draws.recorder("random")),
        "random_pass": llama_trainer("coreset", "random_with_pass", draws.recorder("random_pass")),
    }
    return trainers, BatchStream(train, 12345), c["batch"], dict(c)


def measure(name: str, build, rounds: int) -> dict:
    draws = SameDraws()
    trainers, stream, batch, setup = build(draws)
    t0 = time.perf_counter()
    seconds = round_robin_costs(trainers, stream, batch, rounds)
    ref = seconds["random_k"]
    print(f"{name}: {seconds} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return {
        "setup": setup,
        "rounds": rounds,
        "seconds_per_step": seconds,
        "ratio_to_random_k": {arm: s / ref for arm, s in seconds.items()},
        "same_draws_as_the_pass": draws.same(),
        "steps_compared": len(draws.indices["random"]),
    }


def markdown(data: dict) -> str:
    m = data["machine"]
    extra = [r["ratio_to_random_k"]["random_pass"] - r["ratio_to_random_k"]["random"] for r in data["setups"].values()]
    pass_share = f"{min(extra):.1f}x to {max(extra):.1f}x"
    lines = [md_header(data["produced_by"]), '# `selection="random"` step cost (issue 22, item 4)', ""]
    lines += [
        "Median seconds per step over the rounds (two warm-up rounds first), the arms stepped",
        "round-robin in one process on the same batches, one torch thread; target: random / random_k <= 1.1.",
        "",
    ]
    lines += table_head(
        "set-up",
        "random_k (s)",
        "random (s)",
        "random with the pass (s)",
        "random / random_k",
        "with the pass / random_k",
        "same draws",
    )
    for name, r in data["setups"].items():
        s, q = r["seconds_per_step"], r["ratio_to_random_k"]
        lines.append(
            f"| {name} | {s['random_k']:.3f} | {s['random']:.3f} | {s['random_pass']:.3f} | "
            f"{q['random']:.2f}x | {q['random_pass']:.2f}x | "
            f"{r['same_draws_as_the_pass']} ({r['steps_compared']} steps) |"
        )
    lines += [
        "",
        "- finetune: " + ", ".join(f"{k} {v}" for k, v in data["setups"]["finetune"]["setup"].items()),
        "- llama: " + ", ".join(f"{k} {v}" for k, v in data["setups"]["llama"]["setup"].items()),
        f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}, one torch thread; load average "
        f"{m['load_average_start'][0]:.2f} at the start, {data['load_average_end'][0]:.2f} at the end",
        "",
        "random_k steps on the first k rows of each (uniformly drawn) batch; random and random with the pass",
        "draw k rows stratified by source with the same seed, so they train on the same rows (checked: same",
        f"draws). The pass cost {pass_share} a plain step of k here; without it the step is a plain step plus",
        "bookkeeping (source counts, the per-source draw, the finiteness check of the coreset's losses).",
        "",
        "Reproduce: `PYTHONPATH=. python benchmarks/random_cost.py`",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds-finetune", type=int, default=200)
    parser.add_argument("--rounds-llama", type=int, default=6)
    parser.add_argument("--replot", action="store_true", help="rewrite the .md from the saved .json")
    args = parser.parse_args()
    out = results_dir("random_cost")
    if args.replot:
        (out / "random_cost.md").write_text(markdown(json.loads((out / "random_cost.json").read_text())))
        return
    torch.set_num_threads(1)
    info = machine_info("cpu", torch.get_num_threads())
    setups = {
        "finetune": measure("finetune", finetune_trainers, args.rounds_finetune),
        "llama": measure("llama", lambda d: llama_trainers(d, args.rounds_llama), args.rounds_llama),
    }
    data = {"machine": info, "setups": setups, "load_average_end": os.getloadavg()}
    data = save_json(out / "random_cost.json", data, "random_cost")
    (out / "random_cost.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()
