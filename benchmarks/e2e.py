"""End-to-end memory and time of one training step: a coreset step against its alternatives.

Configurations (large batch B, coreset size k), each measured in its own process:

  a  ordinary training with batch k          b  ordinary training with batch B
  c  a coreset step: select() k of B         d  CoLM's ideal: no-grad forward of B + fwd/bwd of k
  e  batch B by gradient accumulation in micro-batches of k

Time: median wall time per step (after a warm-up step). Memory attributable to the step, measured
after the timed steps in the same process: peak RSS during a few more steps minus the RSS just
before them (the peak is reset through /proc/self/clear_refs; glibc is then told to return every
freed block of 64 KiB or more to the OS, so cached memory neither hides a step's needs nor
inflates them). On CUDA: the allocator's peak minus what was allocated before.

The machine is shared and noisy, so times come from one process per k in which the five
configurations alternate step by step (a, b, c, d, e, a, b, ...), repeated in a few processes;
every time figure in the summary is a median of side-by-side ratios. A second part shrinks the model
and alternates c and e steps in one process, to find where the coreset step stops beating accumulation.

Usage: ``python benchmarks/e2e.py [--rounds 2] [--steps 5] [--out benchmarks/results/e2e]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lib.memory import measure_peak  # noqa: E402
from lib.results import machine_info, save_json  # noqa: E402
from lib.workers import spawn  # noqa: E402

CONFIGS = ("a", "b", "c", "d", "e")
LABELS = {
    "a": "batch k",
    "b": "batch B",
    "c": "coreset k of B",
    "d": "ideal: no-grad fwd B + fwd/bwd k",
    "e": "accumulate B in micro-batches of k",
}
STAGES = ("prepare", "sketch", "compress", "similarity", "greedy", "weights", "backward", "total")


# --- worker: one configuration in this process ------------------------------------------------
def make_step(config: str, model, loss_fn, optimizer, k: int, big: int):
    """The training step of one configuration, as a function of the large batch."""
    import torch

    from coreset_optim.batching import index_batch

    def first(batch, n):
        return index_batch(batch, slice(0, n))

    if config == "a":

        def step(batch):
            loss_fn(first(batch, k)).mean().backward()
    elif config == "b":

        def step(batch):
            loss_fn(batch).mean().backward()
    elif config == "c":

        def step(batch):
            return optimizer.select(batch, loss_fn)
    elif config == "d":

        def step(batch):
            with torch.no_grad():
                loss_fn(batch)
            loss_fn(first(batch, k)).mean().backward()
    elif config == "e":

        def step(batch):
            for start in range(0, big, k):
                (loss_fn(index_batch(batch, slice(start, start + k))).sum() / big).backward()
    else:
        raise ValueError(f"config must be one of {CONFIGS}, got {config!r}")

    def full_step(batch):
        out = step(batch)
        optimizer.step()
        optimizer.zero_grad()
        return out

    return full_step


def build_optimizer(config: str, model, k: int, use_8bit: bool = False):
    import torch

    from coreset_optim import CoresetOptimizer

    params = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.AdamW(params, lr=1e-3)
    if config != "c":
        return inner
    return CoresetOptimizer(inner, model, coreset_size=k, source_key="source")


def run_worker(args) -> dict:
    import torch

    from lib.data import token_batch
    from lib.models import tiny_lora_llama

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model, loss_fn = tiny_lora_llama(args.size, seq_len=args.seq_len)
    model.to(device)
    configs = args.worker.split(",")
    opts = {c: build_optimizer(c, model, args.k) for c in configs}
    steps = {c: make_step(c, model, loss_fn, opts[c], args.k, args.batch) for c in configs}

    def batch_for(i):
        b = token_batch(args.batch, args.seq_len, seed=i)
        b["input_ids"] = b["input_ids"].to(device)
        return b

    batches = [batch_for(i) for i in range(args.warmup + args.steps)]

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for i in range(args.warmup):
        for c in configs:
            steps[c](batches[i])
    sync()
    times = {c: [] for c in configs}
    stage_rows = []
    for i in range(args.warmup, args.warmup + args.steps):
        for c in configs:  # alternating configurations step by step when several share a process
            sync()
            t0 = time.perf_counter()
            out = steps[c](batches[i])
            sync()
            times[c].append(time.perf_counter() - t0)
            if c == "c":
                stage_rows.append(out.timings)

    # Memory, after the timed steps: from here on glibc returns every block of 64 KiB or more to
    # the OS when it is freed (slower: pages fault in again, which is why timing came first), so
    # RSS follows the live tensors and the peak over these steps is what a step needs.
    def memory_steps():
        for i in range(args.mem_steps):
            for c in configs:
                steps[c](batches[i % len(batches)])

    peak, base, _ = measure_peak(memory_steps, device)
    stages = {}
    if stage_rows:
        stages = {s: statistics.median(r.get(s, 0.0) for r in stage_rows) for s in STAGES}
    return {
        "configs": configs,
        "size": args.size,
        "k": args.k,
        "batch": args.batch,
        "times": times,
        "median_s": {c: statistics.median(t) for c, t in times.items() if t},
        "peak_bytes": peak,
        "base_bytes": base,
        "stages_s": stages,
        "stage_rows": stage_rows,
        "num_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "num_params": sum(p.numel() for p in model.parameters()),
    }


# --- driver -----------------------------------------------------------------------------------
def run_configs(config: str, k: int, args, size: str | None = None, steps: int | None = None) -> dict:
    """Run configurations (comma-separated: alternating step by step) in a fresh process."""
    return spawn(
        __file__,
        config,
        args.threads,
        k=k,
        batch=args.batch,
        size=size or args.size,
        seq_len=args.seq_len,
        steps=args.steps if steps is None else steps,
        warmup=args.warmup,
        device=args.device,
        mem_steps=args.mem_steps,
    )


def summarize(time_runs: dict[int, list[dict]], mem_runs: dict[str, dict], ks: list[int]) -> dict:
    """Medians and target ratios. Times: all configurations alternate step by step in one process
    (several rounds); a ratio is the median over steps of (num step / den step) taken side by side.
    Memory: one process per configuration."""
    out = {}
    for k in ks:
        runs = time_runs[k]
        times = {c: [t for r in runs for t in r["times"][c]] for c in CONFIGS}

        def time_ratio(num, den):
            return statistics.median(a / b for a, b in zip(times[num], times[den]))

        def mem(c):
            return mem_runs["b" if c == "b" else f"{c}{k}"]["peak_bytes"]

        rows = {
            c: {
                "label": LABELS[c],
                "time_s": statistics.median(times[c]),
                "time_s_steps": times[c],
                "peak_mb": mem(c) / 2**20,
            }
            for c in CONFIGS
        }
        stage_rows = [r["stage_rows"] for r in runs]
        stage_rows = [row for rows_ in stage_rows for row in rows_]
        stages = {s: statistics.median(row.get(s, 0.0) for row in stage_rows) for s in STAGES}
        selection = sum(stages[s] for s in ("prepare", "compress", "similarity", "greedy", "weights"))
        outside = stages["total"] - sum(stages[s] for s in STAGES if s != "total")
        out[k] = {
            "configs": rows,
            "stages_s": stages,
            "ratios": {
                "mem_c_over_a": mem("c") / mem("a"),
                "mem_c_over_b": mem("c") / mem("b"),
                "time_c_over_d": time_ratio("c", "d"),
                "time_c_over_e": time_ratio("c", "e"),
                "time_c_over_b": time_ratio("c", "b"),
                "time_d_over_e": time_ratio("d", "e"),
                "selection_stages_over_c": selection / stages["total"],
                "select_bookkeeping_over_c": outside / stages["total"],
                "sketch_over_backward_k": stages["sketch"] / stages["backward"],
            },
        }
    return out


def sweep(args, sizes: list[str], k: int) -> list[dict]:
    """Per model size, c and e alternating in one process: where does c stop beating e?"""
    rows = []
    for size in sizes:
        r = run_configs("c,e", k, args, size=size, steps=args.sweep_steps)
        ratios = [c / e for c, e in zip(r["times"]["c"], r["times"]["e"])]
        rows.append(
            {
                "size": size,
                "num_params": r["num_params"],
                "time_c_s": r["median_s"]["c"],
                "time_e_s": r["median_s"]["e"],
                "time_c_over_e": statistics.median(ratios),
                "stages_s": r["stages_s"],
            }
        )
        print(f"sweep {size}: c/e = {rows[-1]['time_c_over_e']:.2f}", file=sys.stderr)
    return rows


def write_markdown(result: dict, path: Path) -> None:
    from lib.results import md_header

    m = result["machine"]
    lines = [
        md_header(result["produced_by"]) + "# End-to-end step: memory and time",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({m['torch_threads']} torch threads), {m['device']}, "
        f"torch {m['torch']}; load average {m['load_average_start'][0]:.1f} at start, "
        f"{m['load_average_end'][0]:.1f} at end (shared machine: figures are ratios measured in one run).",
        f"Model: tiny Llama {result['size']} + LoRA r=8 on q/v ({result['num_params']:,} params, "
        f"{result['num_trainable']:,} trained), sequences of {result['seq_len']} tokens, B = {result['batch']}. "
        f"Time: the five configurations alternate step by step in one process, {result['rounds']} "
        f"processes x {result['steps']} steps each; ratios are medians of side-by-side step ratios. "
        "Memory: one process per configuration (peak RSS over 2 steps minus RSS before them).",
        "",
    ]
    for k, s in result["summary"].items():
        lines += [f"## k = {k}", "", "| config | time per step (s) | step peak memory (MB) |", "|---|---|---|"]
        for c, row in s["configs"].items():
            lines.append(f"| ({c}) {row['label']} | {row['time_s']:.3f} | {row['peak_mb']:.1f} |")
        r = s["ratios"]
        st = s["stages_s"]
        lines += [
            "",
            "| ratio | measured | target |",
            "|---|---|---|",
            f"| memory c / a | {r['mem_c_over_a']:.2f} | <= 1.2 |",
            f"| memory c / b | {r['mem_c_over_b']:.2f} | <= 0.5 |",
            f"| time c / d | {r['time_c_over_d']:.2f} | <= 1.10 |",
            f"| time c / e | {r['time_c_over_e']:.2f} | <= 0.65 at k = B/4 |",
            f"| selection stages (normalize..weights) / c | {r['selection_stages_over_c']:.3f} | < 0.05 |",
            f"| select() bookkeeping outside stages / c | {r['select_bookkeeping_over_c']:.3f} | - |",
            f"| time d / e (the ideal against accumulation) | {r['time_d_over_e']:.2f} | - |",
            "",
            "Stages of (c), median seconds: " + ", ".join(f"{name} {st[name]:.4f}" for name in STAGES),
            "",
        ]
    if result.get("sweep"):
        lines += [
            f"## Shrinking the model (k = {result['sweep_k']}, c and e alternating in one process)",
            "",
            "| model | params | c (s) | e (s) | c / e |",
            "|---|---|---|---|---|",
        ]
        for row in result["sweep"]:
            lines.append(
                f"| {row['size']} | {row['num_params']:,} | {row['time_c_s']:.3f} | "
                f"{row['time_e_s']:.3f} | {row['time_c_over_e']:.2f} |"
            )
        lines.append("")
    path.write_text("\n".join(lines))


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = list(result["summary"])
    fig, axes = plt.subplots(1, 3 if result.get("sweep") else 2, figsize=(15, 4.2))
    width = 0.8 / len(ks)
    for i, k in enumerate(ks):
        rows = result["summary"][k]["configs"]
        xs = [j + i * width for j in range(len(CONFIGS))]
        axes[0].bar(xs, [rows[c]["peak_mb"] for c in CONFIGS], width, label=f"k = {k}")
        axes[1].bar(xs, [rows[c]["time_s"] for c in CONFIGS], width, label=f"k = {k}")
    for ax, title in zip(axes[:2], ("step peak memory (MB)", "time per step (s)")):
        ax.set_xticks([j + width * (len(ks) - 1) / 2 for j in range(len(CONFIGS))])
        ax.set_xticklabels(["a: batch k", "b: batch B", "c: coreset", "d: ideal", "e: accum."], fontsize=8)
        ax.set_title(title)
        ax.legend()
    if result.get("sweep"):
        ax = axes[2]
        sw = result["sweep"]
        ax.plot([r["num_params"] for r in sw], [r["time_c_over_e"] for r in sw], "o-")
        ax.axhline(1.0, color="grey", ls="--", lw=1)
        ax.axhline(0.65, color="green", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("model parameters")
        ax.set_title(f"time c / e vs model size (k = {result['sweep_k']})")
    fig.suptitle(f"B = {result['batch']}, tiny Llama {result['size']} + LoRA, {result['machine']['cpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--ks", default="32,64", help="coreset sizes (comma-separated)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", default="h128-l4")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2, help="timing processes per k")
    p.add_argument("--steps", type=int, default=5, help="timed steps per configuration and process")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mem-steps", type=int, default=2)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per worker (1: on a shared, loaded machine OpenMP spinning "
        "with 2 threads made steps 10x slower)",
    )
    p.add_argument("--sweep-sizes", default="h32-l1,h64-l1,h64-l2,h128-l2,h128-l4,h128-l8,h256-l4")
    p.add_argument("--sweep-steps", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(HERE / "results" / "e2e"))
    args = p.parse_args(argv)

    if args.worker:
        print(json.dumps(run_worker(args)))
        return

    ks = [int(x) for x in args.ks.split(",")]
    info = machine_info(args.device, args.threads)
    mem_runs = {"b": run_configs("b", ks[0], args, steps=0)}
    for k in ks:
        for c in ("a", "c", "d", "e"):
            mem_runs[f"{c}{k}"] = run_configs(c, k, args, steps=0)
    print("memory done", file=sys.stderr)
    time_runs = {k: [] for k in ks}
    for r in range(args.rounds):
        for k in ks:
            time_runs[k].append(run_configs(",".join(CONFIGS), k, args))
        print(f"time round {r + 1}/{args.rounds} done", file=sys.stderr)
    summary = summarize(time_runs, mem_runs, ks)
    sizes = [s for s in args.sweep_sizes.split(",") if s]
    sweep_rows = sweep(args, sizes, ks[0]) if sizes else []
    info["load_average_end"] = os.getloadavg()
    first = mem_runs["b"]
    result = {
        "machine": info,
        "size": args.size,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "rounds": args.rounds,
        "steps": args.steps,
        "num_params": first["num_params"],
        "num_trainable": first["num_trainable"],
        "summary": summary,
        "sweep_k": ks[0],
        "sweep": sweep_rows,
        "raw_memory": mem_runs,
        "raw_time": time_runs,
    }
    out = Path(args.out)
    stem = "e2e" if args.device == "cpu" else f"e2e_{args.device}"
    result = save_json(out / f"{stem}.json", result, "e2e", default=str)
    write_markdown(result, out / f"{stem}.md")
    plot(result, out / f"{stem}.png")
    print((out / f"{stem}.md").read_text())


if __name__ == "__main__":
    main()
