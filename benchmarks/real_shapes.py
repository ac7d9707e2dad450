"""Peak memory and time of one coreset step at the shapes users train: 128-2048 tokens,
vocabularies of 32k, 50k and 128k, LoRA and full fine-tuning, every selection method.

Question: does a coreset step of k from B stay near a plain step of k in memory (and near CoLM's
ideal in time) once the logits dominate, with the library's defaults and no memory option set?

Each configuration runs in a fresh process (random init from a config, no hub): AdamW, one
warm-up step on a 16-token batch (Adam's state exists), then one measured step on the real batch.
Memory above base = peak RSS during the measured step minus the RSS just before it (the peak reset
through /proc/self/clear_refs; freed blocks of 64 KiB or more go back to the OS, so RSS follows
live tensors). Time = that step's wall-clock (shared 2-core machine: read the ratios, which are
measured in one run, not the seconds).

Configurations (B = 32 examples, k = 8 unless given):
  plain_k / plain_B   forward/backward of k (or B) examples with the model's own loss + step
                      (``model(..., labels=...).loss``: what a user's loop does)
  plain_k_lib         the same step of k with the library's chunked per-example loss (the coreset
                      step's loss: isolates what selection adds from what the loss saves)
  accum_B             B in micro-batches of k (the model's own loss), one step
  ideal               CoLM's ideal: a no-grad forward of B (in chunks of k) + forward/backward of
                      k, both with the library's loss (what any coreset step must do)
  coreset:<selection> ``select()`` k of B with ``causal_lm_loss_fn`` + step, only ``selection``
                      set (``target``: 8 held-out examples)

Usage: ``PYTHONPATH=. python benchmarks/real_shapes.py [--quick]``
Results: benchmarks/results/real_shapes/real_shapes.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lib.data import labeled_batch as batch  # noqa: E402
from lib.memory import measure_peak, status_kb  # noqa: E402
from lib.options import add_step_options  # noqa: E402
from lib.results import machine_info, md_header, results_dir, save_json  # noqa: E402
from lib.workers import WorkerFailed, spawn  # noqa: E402

# name: (family, vocab); hidden 64, 2 layers: the logits, not the blocks, are what grows with T.
MODELS = {"llama-32k": ("llama", 32000), "gpt2-50k": ("gpt2", 50257), "llama-128k": ("llama", 128256)}
HIDDEN, LAYERS = 64, 2
SELECTIONS = ["loss", "consensus_loss", "trimmed_loss", "random", "gradient_matching", "facility_location", "target"]


def build(model_name: str, seq_len: int, lora: bool):
    from lib.models import gpt2, llama, with_lora

    family, vocab = MODELS[model_name]
    if family == "gpt2":
        model, modules = gpt2(vocab, HIDDEN, LAYERS, 4, positions=max(seq_len, 16)), ["c_attn"]
    else:
        model = llama(vocab, HIDDEN, LAYERS, 4, 2, 2 * HIDDEN, positions=max(seq_len, 16))
        modules = ["q_proj", "v_proj"]
    model.config.use_cache = False
    return with_lora(model, 8, modules, lora_dropout=0.0) if lora else model


def make_step(config: str, model, opt, k: int, big: int):
    import torch

    from coreset_optim import CoresetOptimizer
    from coreset_optim.batching import index_batch
    from coreset_optim.integrations.causal_lm import causal_lm_loss_fn

    def hf_backward(b: dict, scale: float) -> None:
        out = model(input_ids=b["input_ids"], labels=b["labels"])
        (out.loss * scale).backward()

    def plain(b: dict, n: int) -> None:
        hf_backward(index_batch({"input_ids": b["input_ids"], "labels": b["labels"]}, torch.arange(n)), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if config == "plain_k":
        return lambda b: plain(b, k)
    loss_fn = causal_lm_loss_fn(model)

    def plain_lib(b: dict, n: int) -> None:  # the same step with the library's chunked per-example loss
        loss_fn(index_batch({"input_ids": b["input_ids"], "labels": b["labels"]}, torch.arange(n))).nanmean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if config == "plain_k_lib":
        return lambda b: plain_lib(b, k)
    if config == "plain_B":
        return lambda b: plain(b, big)
    if config == "accum_B":

        def accum(b: dict) -> None:
            for s in range(0, big, k):
                hf_backward({"input_ids": b["input_ids"][s : s + k], "labels": b["labels"][s : s + k]}, k / big)
            opt.step()
            opt.zero_grad(set_to_none=True)

        return accum
    if config == "ideal":

        def ideal(b: dict) -> None:
            fields = {"input_ids": b["input_ids"], "labels": b["labels"]}
            was = model.training
            model.eval()
            with torch.no_grad():
                for s in range(0, big, k):
                    loss_fn(index_batch(fields, torch.arange(s, min(s + k, big))))
            model.train(was)
            plain_lib(b, k)

        return ideal
    selection = config.split(":", 1)[1]
    wrapper = CoresetOptimizer(opt, model, coreset_size=k, selection=selection)
    if selection == "target":
        wrapper.selection.set_target(
            {key: v for key, v in batch(8, 16, model.config.vocab_size, 99).items() if key != "source"}
        )

    def coreset(b: dict) -> None:
        wrapper.select({"input_ids": b["input_ids"], "labels": b["labels"]}, loss_fn, sources=b["source"])
        wrapper.step()
        wrapper.zero_grad(set_to_none=True)

    coreset.wrapper = wrapper
    return coreset


def run_worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = build(args.model, args.seq_len, args.lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step = make_step(args.worker, model, opt, args.k, args.batch)
    vocab = model.config.vocab_size
    step(batch(args.batch, 16, vocab, 0))  # warm-up: Adam's state
    real = batch(args.batch, args.seq_len, vocab, 1)
    base = status_kb("VmRSS") * 1024
    peak, _, seconds = measure_peak(lambda: step(real))
    wrapper = getattr(step, "wrapper", None)
    row = {
        "config": args.worker,
        "model": args.model,
        "lora": args.lora,
        "vocab": vocab,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "k": args.k,
        "peak_above_base_bytes": peak,
        "base_bytes": base,
        "step_s": seconds,
    }
    if wrapper is not None:
        sketch = getattr(wrapper.selection, "sketch", None)  # loss, trimmed_loss, random: no sketch option
        row.update(sketch=sketch, sketch_modules=[t.name for t in wrapper.sketch_layers])
    return row


def run_config(args, config: str, model: str, seq_len: int, lora: bool) -> dict | None:
    """One configuration in a fresh process; None (and a line saying why) when it fails."""
    try:
        row = spawn(__file__, config, args.threads, model=model, seq_len=seq_len, batch=args.batch, k=args.k, lora=lora)
    except WorkerFailed as e:
        print(f"FAILED {config} {model} T={seq_len} lora={lora}: {e}", flush=True)
        return None
    print(
        f"{model:10s} {'lora' if lora else 'full'} T={seq_len:5d} {config:28s} "
        f"{row['peak_above_base_bytes'] / 2**30:6.2f} GiB {row['step_s']:6.1f} s",
        flush=True,
    )
    return row


def fits(model: str, seq_len: int, n: int) -> bool:
    """Whether a plain step of n examples fits this 24 GiB machine (logits + the loss's float32
    copy + their gradient, about 3 x n x T x vocab x 4 bytes, with margin)."""
    return 3.5 * n * seq_len * MODELS[model][1] * 4 < 18 * 2**30


def grid(quick: bool) -> list[tuple[str, int, list[str]]]:
    """(model, T, selections). Beyond the first shape, one selection per kind of pass (random and
    facility location make the same passes as loss and gradient matching): 2 shared CPU cores."""
    if quick:
        return [("llama-32k", 128, SELECTIONS)]
    few = ["loss", "consensus_loss", "gradient_matching", "target"]
    curve = ["loss", "consensus_loss"]  # more sequence lengths, for the plot
    return [
        ("llama-32k", 512, SELECTIONS),
        ("llama-32k", 2048, few),
        ("gpt2-50k", 512, few),
        ("llama-128k", 512, few),
        ("llama-32k", 128, curve),
        ("llama-32k", 1024, curve),
    ]


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (model, lora, T, method): memory / plain k, / plain B, time / ideal, / accumulation."""
    out = []
    key = lambda r: (r["model"], r["lora"], r["seq_len"])  # noqa: E731
    shapes = sorted({key(r) for r in rows}, key=lambda s: (s[0], s[1], s[2]))
    for shape in shapes:
        by = {r["config"]: r for r in rows if key(r) == shape}
        plain_k, plain_b, plain_lib = by.get("plain_k"), by.get("plain_B"), by.get("plain_k_lib")
        ideal, accum = by.get("ideal"), by.get("accum_B")
        for name, r in by.items():
            if not name.startswith("coreset:"):
                continue
            mem = r["peak_above_base_bytes"]
            out.append(
                {
                    "model": shape[0],
                    "lora": shape[1],
                    "seq_len": shape[2],
                    "selection": name.split(":")[1],
                    "sketch": r.get("sketch"),
                    "coreset_gib": mem / 2**30,
                    "plain_k_gib": plain_k and plain_k["peak_above_base_bytes"] / 2**30,
                    "plain_B_gib": plain_b and plain_b["peak_above_base_bytes"] / 2**30,
                    "over_plain_k": plain_k and mem / plain_k["peak_above_base_bytes"],
                    "over_plain_k_lib": plain_lib and mem / plain_lib["peak_above_base_bytes"],
                    "over_plain_B": plain_b and mem / plain_b["peak_above_base_bytes"],
                    "time_over_ideal": ideal and r["step_s"] / ideal["step_s"],
                    "time_over_accum": accum and r["step_s"] / accum["step_s"],
                }
            )
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    f = lambda x, d=2: "n/a" if x is None else f"{x:.{d}f}"  # noqa: E731
    lines = [
        "# Coreset step at real shapes: memory and time (`benchmarks/real_shapes.py`)",
        "",
        f"Written by `benchmarks/real_shapes.py` at commit {result['produced_by']['commit']}, {result['when']}, "
        f"on {m.get('cpu')} "
        f"({m.get('cores', m.get('cpu_count'))} cores, {result['threads']} thread per process; a shared machine). "
        f"B = {result['batch']}, k = {result['k']}, hidden {HIDDEN}, {LAYERS} layers, random init, AdamW; "
        "LoRA r = 8 on q/v (GPT-2: c_attn). Peak RSS of the measured step above the RSS before it; one step "
        "per configuration, each in a fresh process. 'plain B' is n/a where it does not fit in 24 GiB.",
        "",
        "| model | tuning | T | selection | sketch | coreset GiB | plain k GiB | plain B GiB | / plain k "
        "| / plain k, same loss | / plain B | time / ideal | time / accum B |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result["summary"]:
        lines.append(
            f"| {s['model']} | {'LoRA' if s['lora'] else 'full'} | {s['seq_len']} | {s['selection']} | "
            f"{s['sketch'] or '-'} | {f(s['coreset_gib'])} | {f(s['plain_k_gib'])} | {f(s['plain_B_gib'])} | "
            f"{f(s['over_plain_k'])} | {f(s.get('over_plain_k_lib'))} | {f(s['over_plain_B'])} | "
            f"{f(s['time_over_ideal'])} | {f(s['time_over_accum'])} |"
        )
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path, model: str = "llama-32k") -> None:
    """Peak memory above base vs tokens per example, for one model: the plain steps and the
    coreset steps (LoRA and full fine-tuning side by side)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["model"] == model]
    lines = {
        "plain_B": "plain step of B",
        "plain_k": "plain step of k (model's loss)",
        "plain_k_lib": "plain step of k (chunked loss)",
        "coreset:consensus_loss": "coreset k of B (default)",
        "coreset:loss": "coreset k of B (selection='loss')",
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), squeeze=False)
    for ax, lora in zip(axes[0], (True, False)):
        for config, label in lines.items():
            pts = sorted(
                (r["seq_len"], r["peak_above_base_bytes"] / 2**30)
                for r in rows
                if r["config"] == config and r["lora"] == lora
            )
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_title(
            f"{model}, {'LoRA' if lora else 'full fine-tuning'}, B = {result['batch']}, k = {result['k']}", fontsize=9
        )
        ax.set_xlabel("tokens per example")
        ax.set_ylabel("peak memory above base (GiB)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker")
    parser.add_argument("--model", default="llama-32k", choices=list(MODELS))
    add_step_options(parser, batch=32, k=8, seq_len=512)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--resume", action="store_true", help="keep the rows of the existing results, run the rest")
    parser.add_argument("--out", default=str(results_dir("real_shapes") / "real_shapes"))
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    out = Path(args.out).with_suffix(".json")
    rows = json.loads(out.read_text())["rows"] if args.resume and out.exists() else []
    done = {(r["config"], r["model"], r["seq_len"], r["lora"]) for r in rows}
    for model, seq_len, selections in grid(args.quick):
        for lora in (True, False):
            configs = ["plain_k", "plain_k_lib", "ideal", "accum_B"] + (
                ["plain_B"] if fits(model, seq_len, args.batch) else []
            )
            configs += [f"coreset:{s}" for s in selections]
            for config in configs:
                if (config, model, seq_len, lora) in done:
                    continue
                row = run_config(args, config, model, seq_len, lora)
                if row is not None:
                    rows.append(row)
            save(args, rows)  # after every shape: a cut-short run keeps what it measured
    print(markdown(save(args, rows)))


def save(args, rows: list[dict]) -> dict:
    out = Path(args.out)
    result = save_json(
        out.with_suffix(".json"),
        {
            "machine": machine_info("cpu", args.threads),
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "threads": args.threads,
            "batch": args.batch,
            "k": args.k,
            "rows": rows,
            "summary": summarize(rows),
        },
        "real_shapes",
    )
    out.with_suffix(".md").write_text(md_header(result["produced_by"]) + markdown(result))
    plot(result, out.with_suffix(".png"))
    return result


if __name__ == "__main__":
    main()
