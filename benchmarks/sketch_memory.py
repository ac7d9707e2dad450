"""Peak memory of one full fine-tuning step: the bounded coreset step against plain steps, and
against today's whole-gradient sketch (the path this replaced), as the sketch layer grows.

Each configuration runs in a fresh process: the model (random init, no hub), AdamW over every
parameter, one warm-up step of the same kind (so Adam's state exists and first-call caches are
filled), then one measured step. Memory above base = peak RSS during the measured step minus the
RSS just before it (the peak is reset through /proc/self/clear_refs; glibc returns every freed
block of 64 KiB or more to the OS, so RSS follows live tensors). On CUDA: the allocator's peak
minus what was allocated before.

Configurations: ``plain_k`` (forward/backward of k examples + step), ``plain_B`` (of all B),
``coreset`` (``select()`` k of B + step, through the bounded path), ``today`` (the same step
with the sketch made as before: every example's whole gradient of the sketch layer, a normalized
copy, top-coordinate compression of that; the same method with its sketches built whole,
``lib/whole_rows.py``, only where it fits in memory).

Usage: ``python benchmarks/sketch_memory.py [--out benchmarks/results/sketch_memory] [--device cpu]``.
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
from lib.models import FULL_MODELS as MODELS  # noqa: E402
from lib.options import add_step_options  # noqa: E402
from lib.results import machine_info, md_header, provenance, save_json  # noqa: E402
from lib.workers import spawn  # noqa: E402


def run_worker(args) -> dict:
    import torch

    from coreset_optim import CoresetOptimizer
    from lib.data import token_batch
    from lib.models import full_model
    from lib.steps import coreset_step, plain_step
    from lib.whole_rows import whole_rows

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, loss_fn = full_model(args.model, args.seq_len, args.vocab, args.hidden)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    options = {} if args.sketch is None else {"sketch": args.sketch}
    if args.block_bytes is not None:
        options["sketch_block_bytes"] = args.block_bytes
    if args.sketch_batch_size is not None:
        options["sketch_batch_size"] = args.sketch_batch_size
    wrapper = CoresetOptimizer(opt, model, coreset_size=args.k, sketch_modules=args.target, **options)
    if args.worker == "today":  # the same method with its sketches made as before: whole rows
        wrapper = CoresetOptimizer(
            opt, model, coreset_size=args.k, sketch_modules=args.target, selection=whole_rows(wrapper.selection)
        )

    def step(batch):
        if args.worker in ("plain_k", "plain_B"):
            plain_step(opt, loss_fn, batch, args.k if args.worker == "plain_k" else args.batch)
        else:  # coreset, today
            coreset_step(wrapper, loss_fn, batch, sources=batch["source"])

    vocab = model.config.vocab_size
    batches = []
    for i in range(2):
        b = token_batch(args.batch, args.seq_len, vocab=vocab, seed=i)
        b["input_ids"] = b["input_ids"].to(device)
        batches.append(b)
    t0 = time.perf_counter()
    step(batches[0])  # warm-up: Adam's state, caches
    warm_s = time.perf_counter() - t0
    peak, base, step_s = measure_peak(lambda: step(batches[1]), device)
    targets = [(t.name, t.numel) for t in wrapper.sketch_layers]
    return {
        "config": args.worker,
        "model": args.model,
        "vocab": vocab,
        "hidden": model.config.hidden_size,
        "batch": args.batch,
        "k": args.k,
        "seq_len": args.seq_len,
        "target": targets,
        "sketch": wrapper.selection.sketch,
        "block_bytes": wrapper.selection.sketch_block_bytes,
        "sketch_batch_size": wrapper.selection.sketch_batch_size,
        "sketch_dim": wrapper.selection.sketch_dim,
        "peak_above_base_bytes": peak,
        "base_bytes": base,
        "step_s": step_s,
        "warm_s": warm_s,
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def run_config(args, config: str, model: str, **extra) -> dict:
    """One configuration in a fresh process (``extra``: its other options)."""
    row = spawn(
        __file__,
        config,
        args.threads,
        model=model,
        batch=args.batch,
        k=args.k,
        seq_len=args.seq_len,
        device=args.device,
        **extra,
    )
    print(
        json.dumps({k: row[k] for k in ("config", "model", "vocab", "hidden", "target", "sketch")}),
        f"{row['peak_above_base_bytes'] / 2**20:.0f} MiB",
        f"{row['step_s']:.1f} s",
        flush=True,
    )
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker")
    parser.add_argument("--model", default="gpt2-768")
    parser.add_argument("--vocab", type=int)
    parser.add_argument("--hidden", type=int)
    parser.add_argument("--target")
    parser.add_argument("--sketch")
    parser.add_argument("--block-bytes", type=int)
    parser.add_argument("--sketch-batch-size", type=int)
    add_step_options(parser, batch=32, k=8, seq_len=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--parts", default="targets,sweep")
    parser.add_argument(
        "--today-limit-gb",
        type=float,
        default=4.0,
        help="run today's whole-gradient path only where B x layer x 4 bytes x 3 fits in this",
    )
    parser.add_argument("--out", default=str(HERE / "results" / "sketch_memory"))
    parser.add_argument("--replot", action="store_true", help="rewrite the .md/.png from the saved JSON")
    args = parser.parse_args(argv)
    if args.replot:
        save(json.loads((Path(args.out) / "sketch_memory.json").read_text()), Path(args.out))
        return
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    out = Path(args.out)
    result = {
        "produced_by": provenance("sketch_memory"),
        "machine": machine_info(args.device, args.threads),
        "args": vars(args),
        "targets": [],
        "sweep": [],
    }
    parts = args.parts.split(",")
    if "targets" in parts:
        # The target figures: default sketch target (the last trained Linear), B=32, k=8.
        for model in MODELS:
            for _ in range(args.repeats):
                for config in ("plain_k", "plain_B", "coreset"):
                    result["targets"].append(run_config(args, config, model))
        save(result, out)
    if "projection" in parts:
        # The same targets with sketch="projection" (examples streamed chunk by chunk).
        result["targets_projection"] = [
            run_config(args, "coreset", model, sketch="projection") for model in MODELS for _ in range(args.repeats)
        ]
        save(result, out)
    if "chunks" in parts:
        # The hidden-256 Llama with smaller sketch chunks (the sketch pass's working set shrinks).
        result["chunks"] = [
            run_config(args, "coreset", "llama-32k-256", sketch=sketch, sketch_batch_size=4)
            for sketch in ("exact", "projection")
            for _ in range(args.repeats)
        ]
        save(result, out)
    if "sweep" in parts:
        # Memory vs layer size: lm_head of a 2-layer Llama (hidden 256) as the vocabulary grows.
        for vocab in (2000, 4000, 8000, 16000, 32000):
            today_bytes = 3 * args.batch * vocab * 256 * 4
            configs = ["plain_k", "plain_B", "coreset"] + (
                ["today"] if today_bytes <= args.today_limit_gb * 2**30 else []
            )
            for config in configs:
                result["sweep"].append(run_config(args, config, "llama-32k-256", vocab=vocab))
                if config == "coreset":
                    result["sweep"].append(run_config(args, config, "llama-32k-256", vocab=vocab, sketch="projection"))
        save(result, out)
    result["machine"]["load_average_end"] = os.getloadavg()
    save(result, out)


def save(result: dict, out: Path) -> None:
    result = save_json(out / "sketch_memory.json", result, "sketch_memory")  # a replot keeps its "produced_by"
    write_markdown(result, out / "sketch_memory.md")
    if result["sweep"]:
        plot(result, out / "sketch_memory.png")


MB = 2**20


def _label(row: dict) -> str:
    if row["config"] in ("coreset", "today"):
        kind = "projection" if row["sketch"] == "projection" else "top coordinates"
        return f"{row['config']} ({kind})"
    return row["config"]


def target_summary(result: dict) -> dict:
    """Per model: each configuration's peak (MiB, min-max over repeats) and the target ratios
    (each repeat's coreset over the same repeat's plain step, min-max)."""
    out = {}
    for model in dict.fromkeys(r["model"] for r in result["targets"]):
        rows = [r for r in result["targets"] if r["model"] == model]
        by = {
            c: [r["peak_above_base_bytes"] / MB for r in rows if r["config"] == c]
            for c in ("plain_k", "plain_B", "coreset")
        }
        if not all(by.values()):
            continue
        n = min(len(v) for v in by.values())
        ref = next(r for r in rows if r["config"] == "coreset")
        buffer = ref["batch"] * ref["sketch_dim"] * 4 / MB
        over_k = [by["coreset"][i] / by["plain_k"][i] for i in range(n)]
        over_k_buffer = [(by["coreset"][i] - buffer) / by["plain_k"][i] for i in range(n)]
        over_b = [by["coreset"][i] / by["plain_B"][i] for i in range(n)]
        k_over_b = [by["plain_k"][i] / by["plain_B"][i] for i in range(n)]
        out[model] = {
            "mib": {c: (min(v), max(v)) for c, v in by.items()},
            "target": ref["target"],
            "buffer_mib": buffer,
            "coreset_over_k": (min(over_k), max(over_k)),
            "coreset_minus_buffer_over_k": (min(over_k_buffer), max(over_k_buffer)),
            "coreset_over_B": (min(over_b), max(over_b)),
            "k_over_B": (min(k_over_b), max(k_over_b)),
            "step_s": {c: statistics.median(r["step_s"] for r in rows if r["config"] == c) for c in by},
        }
    return out


def write_markdown(result: dict, path: Path) -> None:
    a, m = result["args"], result["machine"]
    lines = [
        md_header(result["produced_by"]) + "# Peak memory of a full fine-tuning step: bounded sketches",
        "",
        f"Produced by `benchmarks/sketch_memory.py`: B = {a['batch']}, k = {a['k']}, {a['seq_len']} tokens, "
        f"AdamW over every parameter, default options (sketch_dim 2560, block budget 32 MiB); each row a fresh "
        f"process, peak RSS of one step above the RSS before it (after a warm-up step). Machine: {m['cpu']}, "
        f"{m['torch_threads']} torch thread, load average {m['load_average_start'][0]:.1f} at start "
        "(shared with other jobs: times are indicative only).",
        "",
    ]
    summary = target_summary(result)
    if summary:
        lines += [
            "## Targets (default sketch target: the last trained Linear, lm_head)",
            "",
            "| model | sketch layer (values) | plain k MiB | plain B MiB | coreset MiB | coreset / plain k | "
            "(coreset - B x sketch_dim x 4) / plain k | coreset / plain B | plain k / plain B |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for model, r in summary.items():
            mib = r["mib"]
            rng = lambda t: f"{t[0]:.2f}" if abs(t[1] - t[0]) < 0.005 else f"{t[0]:.2f}-{t[1]:.2f}"  # noqa: E731
            lines.append(
                f"| {model} | {r['target'][0][0]} ({r['target'][0][1]:,}) | "
                f"{mib['plain_k'][0]:.0f}-{mib['plain_k'][1]:.0f} | "
                f"{mib['plain_B'][0]:.0f}-{mib['plain_B'][1]:.0f} | {mib['coreset'][0]:.0f}-{mib['coreset'][1]:.0f} | "
                f"{rng(r['coreset_over_k'])} | {rng(r['coreset_minus_buffer_over_k'])} | {rng(r['coreset_over_B'])} | "
                f"{rng(r['k_over_B'])} |"
            )
        if result.get("targets_projection"):
            lines += ["", 'With `sketch="projection"` (same models; ratio to the median plain k above):', ""]
            for model in summary:
                mib = [r["peak_above_base_bytes"] / MB for r in result["targets_projection"] if r["model"] == model]
                k = statistics.median(
                    r["peak_above_base_bytes"] / MB
                    for r in result["targets"]
                    if r["model"] == model and r["config"] == "plain_k"
                )
                if mib:
                    lines.append(
                        f"- {model}: {min(mib):.0f}-{max(mib):.0f} MiB, {min(mib) / k:.2f}-{max(mib) / k:.2f}x plain k"
                    )
        if result.get("chunks"):
            k = statistics.median(
                r["peak_above_base_bytes"] / MB
                for r in result["targets"]
                if r["model"] == "llama-32k-256" and r["config"] == "plain_k"
            )
            lines += ["", "llama-32k-256 with `sketch_batch_size=4` (ratio to the median plain k above):", ""]
            for sketch in ("exact", "projection"):
                mib = [r["peak_above_base_bytes"] / MB for r in result["chunks"] if r["sketch"] == sketch]
                lines.append(
                    f"- sketch={sketch}: {min(mib):.0f}-{max(mib):.0f} MiB, "
                    f"{min(mib) / k:.2f}-{max(mib) / k:.2f}x plain k"
                )
        lines += ["", "Ranges: over the repeats (each ratio taken within one repeat). Median step seconds:", ""]
        for model, r in summary.items():
            lines.append(f"- {model}: " + ", ".join(f"{c} {t:.1f} s" for c, t in r["step_s"].items()))
        lines.append("")
    if result["sweep"]:
        lines += [
            "## Memory vs layer size (lm_head of a 2-layer Llama, hidden 256, vocabulary V)",
            "",
            "| V | lm_head values | " + " | ".join(SWEEP_LABELS) + " |",
            "|---|---|" + "---|" * len(SWEEP_LABELS),
        ]
        for vocab in sorted({r["vocab"] for r in result["sweep"]}):
            cells = []
            for label in SWEEP_LABELS:
                hit = [r for r in result["sweep"] if r["vocab"] == vocab and _label(r) == label]
                cells.append(f"{hit[0]['peak_above_base_bytes'] / MB:.0f}" if hit else "-")
            lines.append(f"| {vocab:,} | {vocab * 256:,} | " + " | ".join(cells) + " |")
        lines += ["", f"MiB above base; '-': not run (today's path would need more than {a['today_limit_gb']} GB).", ""]
    path.write_text("\n".join(lines))


SWEEP_LABELS = ["plain_k", "plain_B", "coreset (top coordinates)", "coreset (projection)", "today (top coordinates)"]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, style in zip(SWEEP_LABELS, ("k--", "k:", "o-", "s-", "x-")):
        rows = sorted((r for r in result["sweep"] if _label(r) == label), key=lambda r: r["vocab"])
        if rows:
            ax.plot(
                [r["vocab"] * 256 for r in rows], [r["peak_above_base_bytes"] / MB for r in rows], style, label=label
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sketch layer size (lm_head values)")
    ax.set_ylabel("peak memory above base (MiB)")
    a = result["args"]
    ax.set_title(f"full fine-tuning step, B = {a['batch']}, k = {a['k']}, {a['seq_len']} tokens", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
