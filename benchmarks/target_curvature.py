"""How large is the second-order term of target-aware selection, and what curvature is real?

On the fine-tuning benchmark (benchmarks/finetune.py: pretrained base, LoRA, its target split),
train with selection="target" (first order) and, at a few steps, for the coreset the greedy chose:
D1 = the first-order predicted decrease of the target loss, |Delta|^2 = the squared length of the
modeled step of the sketched parameters, the actual decrease when only those parameters move by
that step, and h_fit = 2 (D1 - actual) / |Delta|^2: the curvature along the step in the units of
``target_curvature`` (1 = GREATS's identity Hessian). Also the identity-Hessian penalty relative
to the gain, (1/2)|Delta|^2 / D1, i.e. at h = 1 how much of the predicted gain the penalty takes.

    PYTHONPATH=$PWD python benchmarks/target_curvature.py [--steps 200] [--seeds 0,1,2]

Writes benchmarks/results/target_curvature/target_curvature.{json,md}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.finetune import ARMS, build_context, default_args, make_trainer  # noqa: E402
from lib.results import machine, md_header, results_dir, save_json  # noqa: E402
from lib.training import BatchStream, Trainer  # noqa: E402

from coreset_optim.methods.target import greedy_target, scale_columns, step_sizes, target_gradient  # noqa: E402
from coreset_optim.precondition.normalize import normalize_sketches  # noqa: E402
from coreset_optim.sketch.capture import exact_sketches, sketch_params  # noqa: E402


def probe(trainer: Trainer, big: dict, target: dict, k: int) -> dict:
    opt, model, loss_fn = trainer.wrapper, trainer.model, trainer.loss_fn
    params = sketch_params(opt.sketch_layers)
    n = big["input_ids"].shape[0]
    raw, _ = exact_sketches(model, opt.sketch_layers, big, loss_fn, n, None)
    traw, tl = exact_sketches(model, opt.sketch_layers, target, loss_fn, target["input_ids"].shape[0], None)
    updates = scale_columns(
        normalize_sketches(raw, opt.optimizer, params, "adam"), params, step_sizes(opt.optimizer, params)
    )
    g_t = target_gradient(traw, tl)
    a = updates @ g_t
    chosen, gains = greedy_target(a, None, k, 1 / k, 0.0)
    step = updates[chosen].mean(0)
    d1 = float(gains.sum())
    sq = float(step.square().sum())
    with torch.no_grad():
        model.eval()
        before = float(loss_fn(target).mean())
        saved = [p.detach().clone() for p in params]
        offset = 0
        for p in params:
            p -= step[offset : offset + p.numel()].reshape(p.shape).to(p.dtype)
            offset += p.numel()
        after = float(loss_fn(target).mean())
        for p, s in zip(params, saved):
            p.copy_(s)
        model.train()
    actual = before - after
    return {
        "d1": d1,
        "step_sq": sq,
        "actual": actual,
        "h_fit": 2 * (d1 - actual) / sq if sq > 0 else None,
        "penalty_ratio_h1": 0.5 * sq / d1 if d1 != 0 else None,
        "sketch_dim": int(updates.shape[1]),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--at", default="1,25,50,100,200")
    ap.add_argument("--methods", default="target,target_last_block")
    cli = ap.parse_args()
    torch.set_num_threads(1)
    args = default_args()  # the fine-tuning benchmark's set-up
    ctx = build_context(args)
    at = {int(x) for x in cli.at.split(",")}
    rows = []
    for method in cli.methods.split(","):
        for seed in (int(s) for s in cli.seeds.split(",")):
            trainer = make_trainer(ARMS[method], seed, ctx)
            stream = BatchStream(ctx.mixture.train, seed + 1)
            for step in range(1, cli.steps + 1):
                big = stream.next(args.batch)
                if step in at:
                    r = probe(trainer, big, ctx.target, trainer.k)
                    rows.append({"method": method, "seed": seed, "step": step, **r})
                    print(rows[-1], flush=True)
                trainer.step(big)
    results = results_dir("target_curvature")
    out = save_json(results / "target_curvature.json", {"machine": machine(), "rows": rows}, "target_curvature")
    lines = [
        "Target-aware selection: scale of the second-order term on the fine-tuning benchmark "
        f"(LoRA, AdamW lr {args.lr}, B={args.batch}, k={args.k}; median over seeds {cli.seeds}).",
        "",
        "| sketch | step | D1 (pred. decrease) | actual decrease | h_fit | identity penalty / gain at h=1 |",
        "|---|---|---|---|---|---|",
    ]
    for method in cli.methods.split(","):
        for step in sorted(at):
            rs = [r for r in rows if r["method"] == method and r["step"] == step]
            if not rs:
                continue
            med = {
                key: statistics.median(r[key] for r in rs if r[key] is not None)
                for key in ("d1", "actual", "h_fit", "penalty_ratio_h1")
            }
            lines.append(
                f"| {method} (D={rs[0]['sketch_dim']}) | {step} | {med['d1']:.2e} | {med['actual']:.2e} | "
                f"{med['h_fit']:.3g} | {med['penalty_ratio_h1']:.3g} |"
            )
    (results / "target_curvature.md").write_text(md_header(out["produced_by"]) + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
