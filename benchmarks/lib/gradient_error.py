"""The gradient-matching measurement (gradient_matching.py, gradient_matching_count_weight.py): how
well each selection's weighted coreset gradient matches the large batch's, over every trainable
parameter in the optimizer's Adam-normalized space, along a training run of the synthetic mixture
(the scripts' docstrings say more); "bound" rows run greedy matching on the exact all-parameter
gradients."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from coreset_optim import CoresetOptimizer
from coreset_optim.datasets.synthetic import make_mixture
from coreset_optim.methods.registry import build_method
from coreset_optim.mixture.budget import small_sources
from coreset_optim.mixture.choose import select_from_sketches
from coreset_optim.mixture.sources import encode_sources
from coreset_optim.precondition.moments import read_adam_moments
from coreset_optim.precondition.normalize import adam_normalize

from . import experiments  # noqa: F401  (registers gradient_matching_unconstrained for the bound)
from .results import machine, md_header, provenance, results_dir, save_json
from .synthetic import answer_loss_fn, tiny_llama
from .training import BatchStream


def per_example_grads(model, loss_fn, batch, params) -> torch.Tensor:
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(loss_fn(one).sum(), params, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)]))
    return torch.stack(rows)


def adam_space(grads: torch.Tensor, opt, params) -> torch.Tensor:
    out, start = [], 0
    for p in params:
        block = grads[:, start : start + p.numel()]
        start += p.numel()
        m = read_adam_moments(opt, p)
        out.append(block if m is None else adam_normalize(block, m.denominator_sq, m.step, m.beta2, m.eps))
    return torch.cat(out, 1)


def rel_error(weights, rows, g) -> float:
    target = g.mean(0)
    est = (weights[:, None] * g[rows]).sum(0) / g.shape[0]
    return float((est - target).norm() / target.norm().clamp_min(1e-30))


def cosine(weights, rows, g) -> float:
    est = (weights[:, None] * g[rows]).sum(0)
    return float(torch.nn.functional.cosine_similarity(est, g.sum(0), dim=0))


def source_errors(weights, rows, g, codes, names) -> dict:
    out = {}
    for c, name in enumerate(names):
        mask = codes == c
        if not mask.any():
            continue
        target = g[mask].sum(0)
        sel = codes[rows] == c
        est = (weights[sel, None] * g[rows[sel]]).sum(0)
        out[name] = float((est - target).norm() / target.norm().clamp_min(1e-30))
    return out


def bound(g, codes, names, k, method="gradient_matching"):
    counts = torch.bincount(codes, minlength=len(names)).tolist()
    keep = small_sources(counts, k)
    valid = torch.ones(g.shape[0], dtype=torch.bool)
    chooser = build_method(method, sketch_dim=g.shape[1] + 1)  # every coordinate: no compression
    sel = select_from_sketches(g, valid, codes, len(names), k, keep, chooser)
    return sel.indices, sel.weights


def main(argv, methods_table: dict[str, dict], script: str, batches: int = 50) -> None:
    """The measurement of ``methods_table`` (name -> ``CoresetOptimizer`` options; ``"random"`` is
    the reference), from the command line ``argv``; results in ``benchmarks/results/<script>/``."""
    results = results_dir(script)
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=batches)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--every", type=int, default=3, help="measure every N-th training step")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default=",".join(methods_table))
    ap.add_argument("--out", default=script)
    ap.add_argument("--replot", action="store_true", help="only redraw the markdown and PNG from the JSON")
    args = ap.parse_args(argv)
    if args.replot:
        data = json.loads((results / f"{args.out}.json").read_text())
        ks = [data["args"]["batch"] // 4, data["args"]["batch"] // 2]
        header = md_header(data.get("produced_by") or provenance(script))
        (results / f"{args.out}.md").write_text(
            header + markdown(data["summary"], ks, argparse.Namespace(**data["args"]))
        )
        plot(data["records"], data["summary"], ks, results / f"{args.out}.png")
        return
    torch.set_num_threads(1)
    methods = args.methods.split(",")
    mixture = make_mixture(20000, 16, seed=args.seed)
    model = tiny_llama(args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    loss_fn = answer_loss_fn(model)
    stream = BatchStream(mixture.train, args.seed + 1)
    ks = [args.batch // 4, args.batch // 2]
    wrappers = {
        (m, k): CoresetOptimizer(opt, model, coreset_size=k, seed=args.seed, **methods_table[m])
        for m in methods
        for k in ks
    }
    bounds = {"bound": "gradient_matching", "bound_unconstrained": "gradient_matching_unconstrained"}
    records = {f"{m}@{k}": [] for m in methods + list(bounds) for k in ks}
    measured, step, t_start = 0, 0, time.time()
    while measured < args.batches:
        batch = stream.next(args.batch)
        if step >= args.warmup and (step - args.warmup) % args.every == 0:
            g = adam_space(per_example_grads(model, loss_fn, batch, params), opt, params)
            codes, names = encode_sources(batch["source"].tolist(), args.batch)
            names = [mixture.names[n] for n in names]
            for k in ks:
                for m in methods:
                    opt.zero_grad()
                    t0 = time.perf_counter()
                    res = wrappers[(m, k)].select(batch, loss_fn, sources=batch["source"])
                    seconds = time.perf_counter() - t0
                    records[f"{m}@{k}"].append(
                        record(res.weights.double(), res.indices, g.double(), codes, names, step, seconds)
                    )
                for label, method in bounds.items():
                    idx, w = bound(g, codes, names, k, method)
                    records[f"{label}@{k}"].append(record(w.double(), idx, g.double(), codes, names, step, 0.0))
            measured += 1
            print(
                f"\rbatch {measured}/{args.batches}  {time.time() - t_start:.0f}s", end="", file=sys.stderr, flush=True
            )
        opt.zero_grad()
        loss_fn(batch).mean().backward()
        opt.step()
        step += 1
    print(file=sys.stderr)
    summary = summarize(records, ks)
    data = {
        "produced_by": provenance(script),
        "args": vars(args),
        "machine": machine(),
        "methods": {m: {k: str(v) for k, v in methods_table.get(m, {}).items()} for m in methods},
        "summary": summary,
        "records": records,
    }
    path = results / f"{args.out}.json"
    save_json(path, data, script)
    (results / f"{args.out}.md").write_text(md_header(data["produced_by"]) + markdown(summary, ks, args))
    plot(records, summary, ks, results / f"{args.out}.png")
    print(markdown(summary, ks, args))
    print("wrote", path)


def record(w, idx, g, codes, names, step, seconds):
    present = set(codes.tolist())
    covered = set(codes[idx].tolist())
    return {
        "step": step,
        "error": rel_error(w, idx, g),
        "cosine": cosine(w, idx, g),
        "per_source": source_errors(w, idx, g, codes, names),
        "coverage": len(covered & present) / len(present),
        "seconds": seconds,
    }


def quantile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * (len(xs) - 1) + 0.5))]


def summarize(records, ks) -> dict:
    out = {}
    for key, recs in records.items():
        m, k = key.rsplit("@", 1)
        rand = records[f"random@{k}"]
        errs = [r["error"] for r in recs]
        ratios = [r["error"] / q["error"] for r, q in zip(recs, rand)]
        srcs = sorted({s for r in recs for s in r["per_source"]})
        out[key] = {
            "median_error": statistics.median(errs),
            "q25_error": quantile(errs, 0.25),
            "q75_error": quantile(errs, 0.75),
            "ratio_of_medians": statistics.median(errs) / statistics.median(r["error"] for r in rand),
            "median_ratio": statistics.median(ratios),
            "q25_ratio": quantile(ratios, 0.25),
            "q75_ratio": quantile(ratios, 0.75),
            "coverage": statistics.mean(r["coverage"] for r in recs),
            "median_cosine": statistics.median(r["cosine"] for r in recs),
            "per_source_median_error": {
                s: statistics.median(r["per_source"][s] for r in recs if s in r["per_source"]) for s in srcs
            },
            "median_seconds": statistics.median(r["seconds"] for r in recs),
        }
    return out


def markdown(summary, ks, args) -> str:
    lines = [
        f"# Gradient matching: B={args.batch}, {args.batches} batches, all-parameter error in Adam-normalized space",
        "",
        "ratio = median error / random's median error (lower is better); IQR of per-batch ratios; "
        "coverage = share of the sources present that got >= 1 example.",
        "",
    ]
    for k in ks:
        lines += [
            f"## k = {k}",
            "",
            "| method | median error | ratio to random | per-batch ratio IQR | median cosine | coverage | select s |",
            "|---|---|---|---|---|---|---|",
        ]
        rows = sorted(
            ((key, s) for key, s in summary.items() if key.endswith(f"@{k}")), key=lambda t: t[1]["ratio_of_medians"]
        )
        for key, s in rows:
            lines.append(
                f"| {key.rsplit('@', 1)[0]} | {s['median_error']:.3f} | {s['ratio_of_medians']:.2f} | "
                f"{s['q25_ratio']:.2f}-{s['q75_ratio']:.2f} | {s['median_cosine']:.2f} | {s['coverage']:.2f} | "
                f"{s['median_seconds']:.3f} |"
            )
        lines.append("")
    k = ks[0]
    srcs = list(summary[f"random@{k}"]["per_source_median_error"])
    lines += [
        f"## Per-source median error, k = {k}",
        "",
        "| method | " + " | ".join(srcs) + " |",
        "|---" * (len(srcs) + 1) + "|",
    ]
    for key, s in sorted(
        ((key, s) for key, s in summary.items() if key.endswith(f"@{k}")), key=lambda t: t[1]["ratio_of_medians"]
    ):
        lines.append(
            f"| {key.rsplit('@', 1)[0]} | "
            + " | ".join(f"{s['per_source_median_error'].get(x, float('nan')):.2f}" for x in srcs)
            + " |"
        )
    return "\n".join(lines) + "\n"


def plot(records, summary, ks, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ks), figsize=(7.5 * len(ks), 6.5))
    for ax, k in zip(axes, ks):
        keys = sorted(
            (key for key in records if key.endswith(f"@{k}")), key=lambda key: summary[key]["ratio_of_medians"]
        )
        rand = records[f"random@{k}"]
        data = [[r["error"] / q["error"] for r, q in zip(records[key], rand)] for key in keys]
        ax.boxplot(data, orientation="horizontal", showfliers=False)
        ax.set_yticks(range(1, len(keys) + 1), [key.rsplit("@", 1)[0] for key in keys], fontsize=8)
        ax.axvline(1.0, color="gray", ls="--")
        ax.set_title(f"k = {k}: error / random's error, per batch")
        ax.set_xlabel("ratio (lower is better)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
