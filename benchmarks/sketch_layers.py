"""Which layer to sketch for full fine-tuning, and is the bounded sketch as good as the whole one?

A 2-layer random-init Llama (vocabulary 32,000, hidden 256), full fine-tuning with AdamW, after
a few plain training steps (so Adam's moments are meaningful). For each evaluation batch (B = 32,
k = 8, 32 tokens, three kinds of sequences as sources) and each way of choosing the coreset, the
gradient-matching error is

    || (g_coreset - g_batch) / (sqrt(v_hat) + eps) || / || g_batch / (sqrt(v_hat) + eps) ||

over *every* parameter: g_batch the mean gradient of the batch, g_coreset the gradient select()
accumulates (sum_j w_j grad_j / N), both divided elementwise by Adam's denominator (what the
step uses). Also timed: the sketch stage of select() (seconds, this loaded 2-core machine).

Ways compared: select() sketching lm_head (top coordinates; CountSketch projection), the last
block's down_proj, v_proj, o_proj, and all seven Linear layers of the last block; random k
(uniform weights); and today's whole-gradient path on lm_head (every per-example gradient
materialized, then normalized and compressed; top coordinates and the former randint-hashed
CountSketch: ``lib/whole_rows.py``, through select()), to check the bounded path is not worse.

Usage: ``python benchmarks/sketch_layers.py [--seeds 3] [--batches 3]``.
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
from coreset_optim.methods.registry import build_method  # noqa: E402
from lib.data import token_batch  # noqa: E402
from lib.models import full_model  # noqa: E402
from lib.options import add_step_options  # noqa: E402
from lib.results import machine_info, md_header, results_dir, save_json  # noqa: E402
from lib.whole_rows import whole_rows  # noqa: E402

LAST = "model.layers.1"
WAYS = {
    # name: select() options ("whole": the default method with its sketches built whole, lib/whole_rows.py)
    "lm_head (top coordinates)": {"sketch_modules": "lm_head"},
    "lm_head (projection)": {"sketch_modules": "lm_head", "sketch": "projection"},
    "last down_proj": {"sketch_modules": f"{LAST}.mlp.down_proj"},
    "last v_proj": {"sketch_modules": f"{LAST}.self_attn.v_proj"},
    "last o_proj": {"sketch_modules": f"{LAST}.self_attn.o_proj"},
    "last block, all Linear": {"sketch_modules": rf"{LAST.replace('.', '[.]')}[.].*_proj"},
    "random k": {"selection": "random"},
    "today: lm_head whole (top coordinates)": {"sketch_modules": "lm_head", "whole": "top coordinates"},
    "today: lm_head whole (old projection)": {"sketch_modules": "lm_head", "whole": "old projection"},
}


def coreset_optimizer(opt, model, k: int, seed: int, options: dict) -> CoresetOptimizer:
    """The wrapper of one way: ``options`` for ``CoresetOptimizer``, or with ``"whole"`` the default
    method whose sketches are built whole (top coordinates, or the former CountSketch)."""
    options = dict(options)
    whole = options.pop("whole", None)
    if whole is not None:
        options["selection"] = whole_rows(build_method(), old_projection=whole == "old projection")
    return CoresetOptimizer(opt, model, coreset_size=k, seed=seed, **options)


def denominator(opt, p):
    state, group = opt.state[p], opt.param_groups[0]
    v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
    return v_hat.sqrt() + group["eps"]


def run_seed(seed: int, args) -> list[dict]:
    model, loss_fn = full_model("llama-32k-256", args.seq_len, vocab=args.vocab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    vocab = model.config.vocab_size
    for i in range(args.warm_steps):  # plain training, so Adam's moments are meaningful
        b = token_batch(args.batch, args.seq_len, vocab=vocab, seed=1000 * seed + i)
        opt.zero_grad()
        loss_fn(b).mean().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    params = list(model.parameters())
    scale = [denominator(opt, p) for p in params]
    rows = []
    for j in range(args.batches):
        batch = token_batch(args.batch, args.seq_len, vocab=vocab, seed=1000 * seed + 500 + j)
        loss_fn(batch).mean().backward()
        full = [p.grad / s for p, s in zip(params, scale)]
        norm = torch.sqrt(sum((f * f).sum() for f in full))
        opt.zero_grad(set_to_none=True)
        for name, options in WAYS.items():
            if args.ways and name not in args.ways.split(";"):
                continue
            wrapper = coreset_optimizer(opt, model, args.k, seed, options)
            t0 = time.perf_counter()
            cs = wrapper.select(batch, loss_fn, sources=batch["source"])
            indices, sketch_s = cs.indices, cs.timings.get("sketch", 0.0)
            total_s = time.perf_counter() - t0
            err = torch.sqrt(sum(((p.grad / s - f) ** 2).sum() for p, s, f in zip(params, scale, full))) / norm
            opt.zero_grad(set_to_none=True)
            rows.append(
                {
                    "seed": seed,
                    "batch": j,
                    "way": name,
                    "error": float(err),
                    "sketch_s": sketch_s,
                    "select_s": total_s,
                    "indices": indices.tolist(),
                }
            )
            print(seed, j, f"{name:42s} err {float(err):.4f} sketch {sketch_s:.2f}s", flush=True)
    return rows


def summarize(rows: list[dict]) -> dict:
    out = {}
    for name in WAYS:
        mine = [r for r in rows if r["way"] == name]
        if not mine:
            continue
        per_seed = {}
        for r in mine:
            per_seed.setdefault(r["seed"], []).append(r["error"])
        seed_means = [statistics.mean(v) for v in per_seed.values()]
        out[name] = {
            "error_mean": statistics.mean(seed_means),
            "error_seed_min": min(seed_means),
            "error_seed_max": max(seed_means),
            "sketch_s_median": statistics.median(r["sketch_s"] for r in mine),
        }
    same = [
        a["indices"] == b["indices"]
        for a, b in zip(
            [r for r in rows if r["way"] == "lm_head (top coordinates)"],
            [r for r in rows if r["way"] == "today: lm_head whole (top coordinates)"],
        )
    ]
    if same:
        out["bounded_equals_today_top_coordinates"] = f"{sum(same)} of {len(same)} coresets identical"
    return out


def write_markdown(result: dict, path: Path) -> None:
    s = result["summary"]
    lines = [
        md_header(result["produced_by"]) + "# Sketch target for full fine-tuning, and bounded vs whole sketches",
        "",
        f"Produced by `benchmarks/sketch_layers.py` ({result['args']['seeds']} seeds x "
        f"{result['args']['batches']} batches; 2-layer Llama, vocabulary {result['args']['vocab']}, "
        f"hidden 256, B = {result['args']['batch']}, k = {result['args']['k']}, "
        f"{result['args']['seq_len']} tokens; machine: {result['machine']['cpu']}, "
        f"{result['machine']['torch_threads']} torch thread, load average "
        f"{result['machine']['load_average_start'][0]:.1f} at start).",
        "",
        "Error: Adam-normalized gradient-matching error over all parameters (lower is better), mean "
        "over seeds of the per-seed mean over batches, with the range of the per-seed means. "
        "Sketch: median seconds of select()'s sketch stage (today's path: its sketch + normalize + "
        "compress inputs).",
        "",
        "| way | error | seed range | sketch s |",
        "|---|---|---|---|",
    ]
    for name in (n for n in WAYS if n in s):
        r = s[name]
        lines.append(
            f"| {name} | {r['error_mean']:.4f} | {r['error_seed_min']:.4f}-{r['error_seed_max']:.4f} "
            f"| {r['sketch_s_median']:.2f} |"
        )
    if "today: lm_head whole (top coordinates)" in s:
        lines += [
            "",
            f"Bounded vs today's top coordinates on lm_head: {s['bounded_equals_today_top_coordinates']}.",
            "",
        ]
    path.write_text("\n".join(lines))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=32000)
    add_step_options(parser, batch=32, k=8, seq_len=32)
    parser.add_argument("--warm-steps", type=int, default=5)
    parser.add_argument("--ways", default="", help="';'-separated subset of the ways (default: all)")
    parser.add_argument("--name", default="sketch_layers")
    parser.add_argument("--out", default=str(results_dir("sketch_layers")))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    result = {"machine": machine_info("cpu", args.threads), "args": vars(args)}
    rows = []
    for seed in range(args.seeds):
        rows += run_seed(seed, args)
    result["rows"] = rows
    result["summary"] = summarize(rows)
    result["machine"]["load_average_end"] = os.getloadavg()
    out = Path(args.out)
    result = save_json(out / f"{args.name}.json", result, "sketch_layers")
    write_markdown(result, out / f"{args.name}.md")
    print(json.dumps(result["summary"], indent=1))


if __name__ == "__main__":
    main()
