"""Coreset step time / CoLM's ideal as the model gets deeper (LoRA and full fine-tuning).

c: ``select()`` k of B + ``step()``; d (ideal): a no-grad forward of B + forward/backward of k
+ ``step()``; with ``--without-reference``, also c0: the same ``select()`` with the default's
reference switched off (``reference=None``: no base-model forward; LoRA only, full fine-tuning has
no reference), on its own copy of the model. They alternate step by step in one process per
(depth, mode), after a warm-up step each; the figure is the median over steps of the
side-by-side ratio c/d of the process's CPU time (one torch thread, so CPU time is compute time;
wall time on this shared machine also counts waiting for a core, and its ratio is recorded too). Model: random-init
Llama, hidden 128, 4 heads (2 key/value), MLP 384, vocabulary 2,000, 32 tokens; B = 64, k = 16;
AdamW. LoRA: r = 8 on q/v (sketch: the last v_proj's LoRA-B, the default). Full fine-tuning:
every parameter trained, sketch target given by ``--full-target`` (default: the library's
default, the last trained Linear, i.e. lm_head).

Usage: ``python benchmarks/depth.py [--depths 2,4,8,16] [--steps 6]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from coreset_optim import CoresetOptimizer  # noqa: E402
from lib.data import token_batch  # noqa: E402
from lib.models import llama, next_token_loss, with_lora  # noqa: E402
from lib.options import add_step_options  # noqa: E402
from lib.results import machine_info, md_header, results_dir, save_json  # noqa: E402


def build(layers: int, mode: str, vocab: int, seq_len: int):
    model = llama(vocab, 128, layers, 4, 2, 384, positions=seq_len)
    if mode == "lora":
        model = with_lora(model, 8, ["q_proj", "v_proj"])
    return model, next_token_loss(model)


def run(layers: int, mode: str, args) -> dict:
    model, loss_fn = build(layers, mode, args.vocab, args.seq_len)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    options = {"sketch_modules": args.full_target} if mode == "full" and args.full_target else {}
    if args.reference_every is not None:
        options["reference_every"] = args.reference_every
    if args.noise_gate is not None:
        options["noise_gate"] = args.noise_gate
    wrapper = CoresetOptimizer(opt, model, coreset_size=args.k, **options)
    k, big = args.k, args.batch
    plain = None
    if args.without_reference and mode == "lora":
        model0, loss0 = build(layers, mode, args.vocab, args.seq_len)
        opt0 = torch.optim.AdamW([p for p in model0.parameters() if p.requires_grad], lr=1e-4)
        plain = (CoresetOptimizer(opt0, model0, coreset_size=args.k, reference=None, **options), loss0)

    def coreset(batch, wrapper=wrapper, loss_fn=loss_fn):
        cs = wrapper.select(batch, loss_fn, sources=batch["source"])
        wrapper.step()
        wrapper.zero_grad(set_to_none=True)
        return cs.timings

    def ideal(batch):
        model.eval()
        with torch.no_grad():
            loss_fn(batch)
        model.train()
        sub = {"input_ids": batch["input_ids"][:k]}
        loss_fn(sub).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    batches = [token_batch(big, args.seq_len, vocab=args.vocab, seed=i) for i in range(args.steps + 1)]
    coreset(batches[0])
    ideal(batches[0])
    if plain is not None:
        coreset(batches[0], *plain)
    ratios, wall_ratios, times, stages, reference_ratios = [], [], {"c": [], "d": [], "c0": []}, [], []
    for b in batches[1:]:
        w0, c0 = time.perf_counter(), time.process_time()
        stages.append(coreset(b))
        wc, cc = time.perf_counter() - w0, time.process_time() - c0
        if plain is not None:
            c0 = time.process_time()
            coreset(b, *plain)
            times["c0"].append(time.process_time() - c0)
            reference_ratios.append(cc / times["c0"][-1])
        w0, c0 = time.perf_counter(), time.process_time()
        ideal(b)
        wd, cd = time.perf_counter() - w0, time.process_time() - c0
        times["c"].append(cc)
        times["d"].append(cd)
        ratios.append(cc / cd)
        wall_ratios.append(wc / wd)
        stages[-1]["wall"] = wc
    sketch_share = statistics.median(s["sketch"] / s["wall"] for s in stages)
    row = {
        "layers": layers,
        "mode": mode,
        "target": [t.name for t in wrapper.sketch_layers],
        "sketch_numel": sum(t.numel for t in wrapper.sketch_layers),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "c_median_s": statistics.median(times["c"]),
        "d_median_s": statistics.median(times["d"]),
        "sketch_share_of_c": sketch_share,
        "ratios": ratios,
        "wall_ratio_median": statistics.median(wall_ratios),
        "wall_ratios": wall_ratios,
        "reference": getattr(wrapper.selection, "implausible_share", None) is not None,
        "with_without_reference_ratios": reference_ratios,
        "with_without_reference_median": statistics.median(reference_ratios) if reference_ratios else None,
        # over all steps (a pass on one selection in reference_every shows in the sum, not the median)
        "with_without_reference_total": sum(times["c"]) / sum(times["c0"]) if times["c0"] else None,
        "reference_passes": sum("reference" in t for t in stages),
        "gate_open_at_end": getattr(wrapper.selection, "gate_open", None),
    }
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("ratios")}), flush=True)
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--depths", default="2,4,8,16")
    parser.add_argument("--modes", default="lora,full")
    parser.add_argument("--full-target", default=None)
    parser.add_argument("--vocab", type=int, default=2000)
    add_step_options(parser, batch=64, k=16, seq_len=32)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--name", default="depth")
    parser.add_argument("--out", default=str(results_dir("depth")))
    parser.add_argument("--replot", action="store_true", help="redraw the .png from the saved JSON")
    parser.add_argument(
        "--without-reference", action="store_true", help="also time the default without its reference (LoRA)"
    )
    parser.add_argument(
        "--reference-every", type=int, default=None, help="the default's reference_every (None: its own default)"
    )
    parser.add_argument(
        "--noise-gate", type=float, default=None, help="the default's noise_gate (1.0: shut, 0.0: open)"
    )
    args = parser.parse_args(argv)
    if args.replot:
        plot(json.loads((Path(args.out) / f"{args.name}.json").read_text()), Path(args.out) / f"{args.name}.png")
        return
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    result = {"machine": machine_info("cpu", args.threads), "args": vars(args), "rows": []}
    for mode in args.modes.split(","):
        for layers in [int(d) for d in args.depths.split(",")]:
            result["rows"].append(run(layers, mode, args))
    result["machine"]["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    result = save_json(out / f"{args.name}.json", result, "depth")
    lines = [
        md_header(result["produced_by"]) + f"# Coreset step / CoLM ideal vs depth ({args.name})",
        "",
        f"Produced by `benchmarks/depth.py`; B = {args.batch}, k = {args.k}, {args.seq_len} tokens, "
        f"vocabulary {args.vocab}, hidden 128; {args.steps} alternating steps per row; "
        + ("" if args.reference_every is None else f"the default with reference_every={args.reference_every}; ")
        + ("" if args.noise_gate is None else f"noise_gate={args.noise_gate}; ")
        + "machine: "
        f"{result['machine']['cpu']}, {args.threads} torch thread, load average "
        f"{result['machine']['load_average_start'][0]:.1f} at start, "
        f"{result['machine']['load_average_end'][0]:.1f} at end (shared machine).",
        "",
        "| mode | layers | sketch target | c / d (CPU time) median | range | wall-time c / d | c CPU s | d CPU s "
        "| sketch share of c (wall) | reference passes | c / c without it (CPU time): median, total |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        vs, total = r.get("with_without_reference_median"), r.get("with_without_reference_total")
        lines.append(
            f"| {r['mode']} | {r['layers']} | {', '.join(r['target'])[:60]} | {r['ratio_median']:.2f} | "
            f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f} | {r['wall_ratio_median']:.2f} | "
            f"{r['c_median_s']:.3f} | {r['d_median_s']:.3f} | "
            f"{r['sketch_share_of_c']:.0%} | {r.get('reference_passes', 0)} of {len(r['ratios'])} | "
            f"{'n/a' if vs is None else f'{vs:.2f}, {total:.2f}'} |"
        )
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    plot(result, out / f"{args.name}.png")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, style in (("lora", "o-"), ("full", "s-")):
        rows = sorted((r for r in result["rows"] if r["mode"] == mode), key=lambda r: r["layers"])
        if not rows:
            continue
        xs = [r["layers"] for r in rows]
        ax.plot(
            xs,
            [r["ratio_median"] for r in rows],
            style,
            label=f"{mode} (sketch: {rows[0]['target'][0].split('.')[-2] if mode == 'lora' else rows[0]['target'][0]})",
        )
        ax.fill_between(xs, [r["ratio_min"] for r in rows], [r["ratio_max"] for r in rows], alpha=0.15)
    ax.axhline(1.10, color="green", ls=":", lw=1, label="target 1.10")
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_xticks([2, 4, 8, 16])
    ax.set_xticklabels(["2", "4", "8", "16"])
    ax.set_xlabel("decoder layers")
    ax.set_ylabel("coreset step / CoLM ideal (CPU time)")
    ax.set_title("median and range over steps, B = 64, k = 16", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
