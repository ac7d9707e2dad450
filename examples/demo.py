"""The demo: what select() does, then what it buys when fine-tuning a pretrained model.

Part 1: the committed pretrained base (a small Llama, loaded with from_pretrained) gets LoRA
adapters and takes a few steps on coresets of its 7-source instruction mixture. Each step: a large
batch of 64, select() picks 16 of them (by default, per source, the highest-loss examples among
those whose Adam-normalized gradient agrees with the rest of their source; small sources whole;
weighted), backpropagates only those, then step(). Prints what was selected, the weights, the
per-source counts and the examples flagged as suspect.

Part 2: the short version of benchmarks/finetune.py (one seed, DEMO_STEPS steps, default 100):
random k, stratified random k (the coreset's per-source budgets, random examples), balanced random
k (equal examples per source), the default coreset and batch B accumulated in chunks of k, with a
progress bar, a table of exact-match accuracy
(mixture-weighted and macro) and a PNG of per-source accuracy vs steps and vs wall-clock
(demo_output/finetune.png).

Part 3: the same with 20 % of the training answers replaced by random tokens (scored on clean
held-out answers): random k, highest-loss selection (the default before) and the default.
One seed: the figures it prints show what the library does, they do not measure it (the
three-seed results are in benchmarks/results/finetune/). The progress bar shows the elapsed time.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

import finetune as bench  # noqa: E402

from coreset_optim import CoresetOptimizer  # noqa: E402
from coreset_optim.datasets.tasks import decode  # noqa: E402
from coreset_optim.integrations.causal_lm import causal_lm_per_example_loss  # noqa: E402

hf_logging.disable_progress_bar()  # the base is loaded once per method: keep the demo's own bar readable

METHODS = ["random_k", "stratified_k", "balanced_k", "default", "accum_B"]
NOISY_METHODS = ["random_k", "loss", "default"]
LABELS = {
    "loss": "highest loss (selection='loss')",
    "random_k": "random k",
    "stratified_k": "stratified random k (selection='random')",
    "balanced_k": "balanced random k",
    "default": "coreset k of B (default)",
    "accum_B": "batch B, accumulated",
}


def part1(args) -> None:
    ctx = bench.build_context(args)
    names = ctx.mixture.names
    model = bench.lora_model(seed=0, rank=args.rank)
    opt = CoresetOptimizer(
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr), model, coreset_size=args.k
    )
    print(opt, "\n")
    print("an example of each source:")
    for n in names:
        print(f"  {n:<8} {decode(ctx.mixture.eval[n]['input_ids'][0].tolist())}")
    print()

    def loss_fn(batch: dict) -> torch.Tensor:
        """One loss per example: the mean cross-entropy of its answer tokens."""
        return causal_lm_per_example_loss(model(input_ids=batch["input_ids"]), batch["labels"])

    stream = bench.BatchStream(ctx.mixture.train, 1)
    for step in range(3):
        big = stream.next(args.batch)
        t0 = time.perf_counter()
        coreset = opt.select(big, loss_fn, sources=[names[s] for s in big["source"].tolist()])
        opt.step()
        opt.zero_grad()
        seconds = time.perf_counter() - t0
        counts = ", ".join(
            f"{name} {c.selected}/{c.in_batch}{' (kept)' if c.kept_whole else ''}"
            for name, c in coreset.source_counts.items()
        )
        # The default keeps each source's hardest agreeing examples, so the weighted coreset loss is
        # above the batch mean: it is the loss being trained on, not an estimate of the batch's.
        print(
            f"step {step}: batch mean loss {coreset.batch_loss:.3f}  weighted coreset loss {coreset.loss:.3f}  "
            f"({seconds * 1000:.0f} ms)"
        )
        print(f"  selected {coreset.indices.tolist()}")
        print(f"  weights  {[round(w, 2) for w in coreset.weights.tolist()]} (sum {coreset.weights.sum():.0f} = N)")
        print(f"  per source (selected/in batch): {counts}")
        print(f"  suspects (gradient against their source's): {torch.nonzero(coreset.suspects).flatten().tolist()}")


class Progress:
    """A one-line text progress bar on stderr (no dependency)."""

    def __init__(self, total: int):
        self.total, self.done, self.start = total, 0, time.time()

    def __call__(self, method: str, step: int, steps: int) -> None:
        self.done += 1
        if step % 10 and step != steps:
            return
        frac = self.done / self.total
        print(
            f"\r[{'#' * int(30 * frac):<30}] {100 * frac:5.1f}%  {LABELS[method]:<42} step {step:4d}/{steps}  "
            f"{time.time() - self.start:5.0f}s",
            end="",
            file=sys.stderr,
            flush=True,
        )


def part2(args, methods: list[str] = METHODS, plot_name: str = "finetune.png") -> None:
    progress = Progress(len(methods) * args.steps)
    runs = [bench.run(m, 0, args, progress) for m in methods]
    print("\nmeasuring time per step (methods in turn) ...", file=sys.stderr)
    costs = bench.step_costs(methods, args, rounds=6)
    ctx = bench.build_context(args)
    summary = bench.summarize(runs, costs, ctx.mixture, args.steps)
    ms, small = summary["methods"], summary["smallest_source"]
    rows = [("method", "accuracy (mixture)", "accuracy (macro)", f"{small} (0.8 %)", "ms/step", "activation MiB")]
    for m in methods:
        s = ms[m]
        rows.append(
            (
                LABELS[m],
                f"{s['accuracy_mixture']['mean']:.3f}",
                f"{s['accuracy_macro']['mean']:.3f}",
                f"{s['accuracy:' + small]['mean']:.3f}",
                f"{s['ms_per_step']:.1f}",
                f"{s['activation_mib']:.2f}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(
        f"\nB={args.batch}, k={args.k}, {args.steps} steps, seed 0: exact-match accuracy on held-out examples "
        "(mixture: weighted by the training shares; macro: each source once)"
    )
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    out = Path(os.environ.get("DEMO_OUTPUT", ROOT / "demo_output")) / plot_name
    out.parent.mkdir(parents=True, exist_ok=True)
    bench.plot(runs, summary, ctx.mixture, out, methods=methods)
    print(f"\nplot saved to {out}")
    print("The full benchmark (3 seeds, more methods): PYTHONPATH=. python benchmarks/finetune.py")


def main() -> None:
    torch.set_num_threads(1)
    steps = int(os.environ.get("DEMO_STEPS", 100))
    args = bench.parse_args(
        ["--steps", str(steps), "--seeds", "0", "--no-equal-time", "--eval-every", str(max(5, steps // 5))]
    )
    print("Part 1: select() on the pretrained base with LoRA\n")
    part1(args)
    print(f"\nPart 2: fine-tuning {steps} steps, five ways (the short version of benchmarks/finetune.py)\n")
    part2(args)
    noisy = bench.parse_args(
        [
            "--steps",
            str(steps),
            "--seeds",
            "0",
            "--no-equal-time",
            "--eval-every",
            str(max(5, steps // 5)),
            "--noise",
            "random_tokens",
            "--noise-rate",
            "0.2",
        ]
    )
    print(
        f"\nPart 3: the same with 20 % of the training answers replaced by random tokens, {steps} steps, "
        "scored on clean held-out answers\n"
    )
    part2(noisy, NOISY_METHODS, "finetune_noisy.png")


if __name__ == "__main__":
    main()
