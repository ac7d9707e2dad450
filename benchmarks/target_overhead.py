"""Extra time per step of selection="target" (a 16-example target) over a default coreset step.

Tiny Llama + LoRA (lib/models.py's tiny_lora_llama), B = 64, k = 16, T = 64, CPU, one thread. Every
configuration runs select() + step() on the same batches, interleaved round-robin
(lib/timing.py's interleave), median seconds per step. Writes target_overhead.{json,md} in
benchmarks/results/target_overhead/ (the committed run was renamed target_overhead_run4_stream.*).

    PYTHONPATH=$PWD python benchmarks/target_overhead.py [--reps 15] [--size h128-l4]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from coreset_optim import CoresetOptimizer
from lib.data import token_batch
from lib.models import tiny_lora_llama
from lib.results import md_header, results_dir, save_json
from lib.timing import THREADS, interleave

RESULTS = results_dir("target_overhead")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--size", default="h128-l4")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--target", type=int, default=16)
    args = parser.parse_args()
    T = 64
    configs = {
        "default": {},
        "target": dict(selection="target"),
        "target_curvature": dict(selection="target", curvature=1.0),
        "target_refresh2": dict(selection="target", refresh=2),
        "target_refresh4": dict(selection="target", refresh=4),
    }
    batches = [token_batch(args.batch, T, seed=i) for i in range(8)]
    target = token_batch(args.target, T, seed=999)
    del target["source"]
    steps, timings = {}, {}
    for name, options in configs.items():
        model, loss_fn = tiny_lora_llama(args.size, seq_len=T)
        inner = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        opt = CoresetOptimizer(inner, model, coreset_size=args.k, source_key="source", **options)
        if options.get("selection") == "target":
            opt.selection.set_target(target)
        counter = [0]
        timings[name] = []

        def step(opt=opt, loss_fn=loss_fn, counter=counter, name=name):
            cs = opt.select(batches[counter[0] % len(batches)], loss_fn)
            opt.step()
            opt.zero_grad()
            counter[0] += 1
            timings[name].append(cs.timings)

        steps[name] = step
    medians = interleave(steps, args.reps, warmup=2)
    base = medians["default"]
    rows = {}
    for name, seconds in medians.items():
        stages = timings[name][2:]
        rows[name] = {
            "s_per_step": seconds,
            "ratio_to_default": seconds / base,
            "target_stage_ms": 1e3 * statistics.median(t.get("prepare", 0.0) for t in stages),
            "sketch_ms": 1e3 * statistics.median(t.get("sketch", 0.0) for t in stages),
            "greedy_ms": 1e3 * statistics.median(t.get("greedy", 0.0) for t in stages),
        }
    meta = dict(size=args.size, B=args.batch, k=args.k, target=args.target, T=T, reps=args.reps, threads=THREADS)
    data = save_json(RESULTS / "target_overhead.json", {"meta": meta, "rows": rows}, "target_overhead", indent=2)
    lines = [
        f"Tiny Llama {args.size} + LoRA, B={args.batch}, k={args.k}, T={T}, target of {args.target} examples, "
        f"CPU, {THREADS} thread, {args.reps} interleaved rounds (median; shared 2-core machine).",
        "",
        "| configuration | s / step | ratio to default | target stage ms | sketch ms | greedy ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['s_per_step']:.3f} | {r['ratio_to_default']:.3f} | {r['target_stage_ms']:.1f} | "
            f"{r['sketch_ms']:.1f} | {r['greedy_ms']:.1f} |"
        )
    (RESULTS / "target_overhead.md").write_text(md_header(data["produced_by"]) + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
