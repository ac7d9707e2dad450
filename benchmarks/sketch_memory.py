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
copy, top-coordinate compression of that; reimplemented here from the library's whole-gradient
functions, only where it fits in memory).

Usage: ``python benchmarks/sketch_memory.py [--out benchmarks/results/sketch_memory] [--device cpu]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from e2e import _release_host_memory, _set_malloc_mmap_threshold, _status_kb, machine_info  # noqa: E402

MODELS = {
    # name: (family, vocab, hidden, layers, heads, intermediate)
    "gpt2-768": ("gpt2", 50257, 768, 2, 4, 3072),
    "llama-32k-512": ("llama", 32000, 512, 2, 8, 1376),
    "llama-32k-256": ("llama", 32000, 256, 2, 4, 688),
}


def build_model(name: str, seq_len: int, vocab: int | None = None, hidden: int | None = None):
    import torch
    import torch.nn.functional as F

    family, v, h, layers, heads, inter = MODELS[name]
    vocab, hidden = vocab or v, hidden or h
    torch.manual_seed(0)
    if family == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        model = GPT2LMHeadModel(
            GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=seq_len)
        )
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        model = LlamaForCausalLM(
            LlamaConfig(
                vocab_size=vocab,
                hidden_size=hidden,
                intermediate_size=inter if hidden == h else 2 * hidden,
                num_hidden_layers=layers,
                num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 2),
                max_position_embeddings=seq_len,
            )
        )

    def loss_fn(batch: dict) -> torch.Tensor:
        ids = batch["input_ids"]
        logits = model(input_ids=ids).logits[:, :-1]
        tokens = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        return tokens.view(ids.shape[0], -1).mean(1)

    return model, loss_fn


def make_step(config: str, model, loss_fn, opt, wrapper, k: int, big: int, target):
    import torch

    from common import select_whole_rows
    from coreset_optim.batching import index_batch
    from coreset_optim.precondition.normalize import normalize_sketches
    from coreset_optim.sketch.capture import exact_sketches, sketch_params

    def plain(batch, n):
        sub = index_batch(batch, torch.arange(n))
        loss_fn(sub).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if config == "plain_k":
        return lambda batch: plain(batch, k)
    if config == "plain_B":
        return lambda batch: plain(batch, big)
    if config == "coreset":

        def coreset(batch):
            wrapper.select(batch, loss_fn, sources=batch["source"])
            wrapper.step()
            wrapper.zero_grad(set_to_none=True)

        return coreset

    def today(batch):  # select() as it was: whole per-example gradients, then normalize, then compress
        method = wrapper.selection
        targets = wrapper.sketch_layers
        raw, losses = exact_sketches(model, targets, batch, loss_fn, big, k)
        valid = torch.isfinite(losses) & torch.isfinite(raw).all(1)
        normalized = normalize_sketches(raw, opt, sketch_params(targets), method.normalize)
        select_whole_rows(wrapper, batch, loss_fn, normalized, valid, losses, big, k)
        del raw, normalized
        opt.step()
        opt.zero_grad(set_to_none=True)

    return today


def run_worker(args) -> dict:
    import torch

    from coreset_optim import CoresetOptimizer
    from tinyllm import make_batch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, loss_fn = build_model(args.model, args.seq_len, args.vocab, args.hidden)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    options = {} if args.sketch is None else {"sketch": args.sketch}
    if args.block_bytes is not None:
        options["sketch_block_bytes"] = args.block_bytes
    if args.sketch_batch_size is not None:
        options["sketch_batch_size"] = args.sketch_batch_size
    wrapper = CoresetOptimizer(opt, model, coreset_size=args.k, sketch_modules=args.target, **options)
    step = make_step(args.worker, model, loss_fn, opt, wrapper, args.k, args.batch, args.target)
    vocab = model.config.vocab_size
    batches = []
    for i in range(2):
        b = make_batch(args.batch, args.seq_len, vocab=vocab, seed=i)
        b["input_ids"] = b["input_ids"].to(device)
        batches.append(b)
    t0 = time.perf_counter()
    step(batches[0])  # warm-up: Adam's state, caches
    warm_s = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        _set_malloc_mmap_threshold(65536)
        _release_host_memory()
        base = _status_kb("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    t0 = time.perf_counter()
    step(batches[1])
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _status_kb("VmHWM") * 1024 - base
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
        "step_s": time.perf_counter() - t0,
        "warm_s": warm_s,
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def spawn(args, config: str, model: str, **extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(args.threads)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        config,
        "--model",
        model,
        "--batch",
        str(args.batch),
        "--k",
        str(args.k),
        "--seq-len",
        str(args.seq_len),
        "--device",
        args.device,
        "--threads",
        str(args.threads),
    ]
    for key, value in extra.items():
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {config} {model} {extra} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
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
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
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
    from common import provenance

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
                    result["targets"].append(spawn(args, config, model))
        save(result, out)
    if "projection" in parts:
        # The same targets with sketch="projection" (examples streamed chunk by chunk).
        result["targets_projection"] = [
            spawn(args, "coreset", model, sketch="projection") for model in MODELS for _ in range(args.repeats)
        ]
        save(result, out)
    if "chunks" in parts:
        # The hidden-256 Llama with smaller sketch chunks (the sketch pass's working set shrinks).
        result["chunks"] = [
            spawn(args, "coreset", "llama-32k-256", sketch=sketch, sketch_batch_size=4)
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
                result["sweep"].append(spawn(args, config, "llama-32k-256", vocab=vocab))
                if config == "coreset":
                    result["sweep"].append(spawn(args, config, "llama-32k-256", vocab=vocab, sketch="projection"))
        save(result, out)
    result["machine"]["load_average_end"] = os.getloadavg()
    save(result, out)


def save(result: dict, out: Path) -> None:
    from common import stamped

    result = stamped(result, "sketch_memory")  # a replot keeps the saved "produced_by"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sketch_memory.json").write_text(json.dumps(result, indent=1))
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
    from common import md_header

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
