"""The synthetic-mixture set-up of training.py and gradient_matching.py: a tiny random-init Llama
trained from scratch, its per-example answer loss, held-out loss per source, and the report of
training runs (training.py, merge_training.py): summary, table and curves."""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from coreset_optim.datasets.synthetic import VOCAB_SIZE, answer_losses

from .models import llama
from .results import md_header, provenance, results_dir, save_json, table_head
from .summary import at_step, at_time


def tiny_llama(seed: int, hidden: int = 64, layers: int = 2):
    """A tiny Llama over the synthetic vocabulary (no tied embeddings, no cache)."""
    model = llama(VOCAB_SIZE, hidden, layers, 4, 4, 2 * hidden, positions=32, seed=seed, tie_word_embeddings=False)
    model.config.use_cache = False
    return model


def answer_loss_fn(model):
    """``loss_fn(batch)``: each example's loss on its answer tokens."""

    def loss_fn(batch):
        logits = model(input_ids=batch["input_ids"]).logits
        return answer_losses(logits, batch["labels"])

    return loss_fn


@torch.no_grad()
def evaluate(model, mixture) -> dict:
    """Held-out loss per source and overall (weighted by the mixture's shares)."""
    was = model.training
    model.eval()
    per = {}
    for name, data in mixture.eval.items():
        logits = model(input_ids=data["input_ids"]).logits
        per[name] = float(answer_losses(logits, data["labels"]).mean())
    model.train(was)
    total = sum(mixture.shares)
    overall = sum(s * per[n] for n, s in zip(mixture.names, mixture.shares)) / total
    return {"overall": overall, "per_source": per}


# --- the report of training runs ----------------------------------------------------------------
def overall(point: dict) -> float:
    return point["overall"]


def summarize(runs, mixture, steps) -> dict:
    smallest = mixture.names[-1]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    out = {"smallest_source": smallest, "steps": steps, "methods": {}}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        final = [at_step(r["curve"], steps) for r in rs]
        out["methods"][m] = {
            "loss_at_steps": statistics.mean(f["overall"] for f in final),
            "loss_at_steps_per_seed": [f["overall"] for f in final],
            "smallest_at_steps": statistics.mean(f["per_source"][smallest] for f in final),
            "per_source_at_steps": {n: statistics.mean(f["per_source"][n] for f in final) for n in mixture.names},
            "time_to_steps": statistics.mean(at_step(r["curve"], steps)["time"] for r in rs),
            "median_step_ms": 1000 * rs[0]["seconds_per_step"],
            "activation_mib": max(r["activation_bytes"] for r in rs) / 2**20,
        }
    ms = out["methods"]
    if "random_k" in ms and "accum_B" in ms:
        lr_, lb = ms["random_k"]["loss_at_steps"], ms["accum_B"]["loss_at_steps"]
        for m, s in ms.items():
            s["gap_closure"] = (lr_ - s["loss_at_steps"]) / (lr_ - lb) if lr_ != lb else None
            # Equal wall-clock: the others' loss at this method's time to `steps` (same seed).
            eq = {}
            for other in ("random_k", "accum_B"):
                vals = []
                for r in (r for r in runs if r["method"] == m):
                    o = next(x for x in runs if x["method"] == other and x["seed"] == r["seed"])
                    v = at_time(o["curve"], at_step(r["curve"], steps)["time"], overall)
                    vals.append(v)
                eq[other] = None if any(v is None for v in vals) else statistics.mean(vals)
            s["at_equal_time"] = eq
    return out


def markdown(summary, args) -> str:
    sm = summary["smallest_source"]
    lines = [
        f"# Training: B={args.batch}, k={args.k}, {args.steps} steps, seeds {args.seeds}, lr {args.lr}",
        "",
        f"Held-out loss (mixture-weighted) after {args.steps} steps, mean over seeds; gap closure = "
        "(L_random - L) / (L_random - L_accumB); 'at equal time' = loss of random k / accum B at this "
        "method's wall-clock for its steps (interpolated; n/a when that run was shorter).",
        "",
        f"| method | loss | gap closure | {sm} (smallest) | ms/step | time to {args.steps} steps (s) | "
        "activation MiB | random k at equal time | accum B at equal time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for m, s in sorted(summary["methods"].items(), key=lambda t: t[1]["loss_at_steps"]):
        eq = s.get("at_equal_time", {})
        f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
        gc = s.get("gap_closure")
        lines.append(
            f"| {m} | {s['loss_at_steps']:.3f} | {'' if gc is None else f'{gc:.2f}'} | {s['smallest_at_steps']:.3f} | "
            f"{s['median_step_ms']:.1f} | {s['time_to_steps']:.1f} | {s['activation_mib']:.2f} | "
            f"{f(eq.get('random_k'))} | {f(eq.get('accum_B'))} |"
        )
    names = list(next(iter(summary["methods"].values()))["per_source_at_steps"])
    lines += [
        "",
        "## Per source after the steps (mean over seeds)",
        "",
        *table_head("method", *names),
    ]
    for m, s in sorted(summary["methods"].items(), key=lambda t: t[1]["loss_at_steps"]):
        lines.append(f"| {m} | " + " | ".join(f"{s['per_source_at_steps'][n]:.3f}" for n in names) + " |")
    return "\n".join(lines) + "\n"


def plot(runs, summary, path: Path, steps: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sm = summary["smallest_source"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    methods = list(summary["methods"])
    colors = {m: plt.cm.tab10(i % 10) for i, m in enumerate(methods)}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        n = min(len(r["curve"]) for r in rs)
        pts = list(zip(*[r["curve"][:n] for r in rs]))
        xs = [p[0]["step"] for p in pts]
        ts = [statistics.mean(c["time"] for c in p) for p in pts]
        ys = [statistics.mean(c["overall"] for c in p) for p in pts]
        ys_small = [statistics.mean(c["per_source"][sm] for c in p) for p in pts]
        axes[0].plot(xs, ys, label=m, color=colors[m])
        axes[1].plot(ts, ys, label=m, color=colors[m])
        axes[2].plot(xs, ys_small, label=m, color=colors[m])
    axes[0].set(xlabel="step", ylabel="held-out loss (mixture)", title="vs steps", yscale="log")
    axes[1].set(
        xlabel="training wall-clock (s, 1 thread)",
        ylabel="held-out loss (mixture)",
        title="vs wall-clock",
        yscale="log",
    )
    axes[2].set(xlabel="step", ylabel=f"held-out loss ({sm})", title=f"smallest source ({sm}) vs steps")
    for ax in axes:
        ax.axvline(steps, color="gray", ls=":", lw=0.8) if ax is not axes[1] else None
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_results(out: str, payload: dict, runs: list, summary: dict, args, script: str = "training") -> None:
    """``out``.json (payload), .md (table) and .png (curves) under benchmarks/results/<script>/."""
    folder = results_dir(script)
    produced_by = provenance(script)
    save_json(folder / f"{out}.json", {"produced_by": produced_by, **payload}, script)
    (folder / f"{out}.md").write_text(md_header(produced_by) + markdown(summary, args))
    plot(runs, summary, folder / f"{out}.png", args.steps)
    print(markdown(summary, args))
