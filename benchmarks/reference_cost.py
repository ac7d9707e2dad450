"""What the default's base-model reference costs at the proportions users train (LoRA on a Llama-3-8B
shaped model): the step with the gate shut (the reference on one selection in 8) and open (every
selection), against the same step without a reference, CoLM's ideal and accumulating B.

``step_time.py``'s 8b shape (hidden 128, 32 layers, the 8B's head and layer proportions), LoRA r = 8
on q and v, B = 32, k = 8, T = 128 and 512, random tokens (a fixed batch), AdamW, one torch thread.
Five steps alternate round by round on one model (``lib.timing.interleave_times``): the default with
``noise_gate=1.0`` (shut: it never opens, the reference runs on selections 0, 8, 16, ...), with
``noise_gate=0.0`` (open: every selection), with ``reference=None``, the ideal (a no-grad forward of
B and a step of k) and accumulation (B in micro-batches of k). 16 rounds after one warm-up, so that
two of the shut arm's selections run the reference; the table gives mean seconds (the pass shows in
the mean, not the median) and the ratio of means.

    PYTHONPATH=. python benchmarks/reference_cost.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib.data import labeled_batch  # noqa: E402
from lib.results import machine_info, md_header, results_dir, save_json  # noqa: E402
from lib.steps import accumulation_step, coreset_step, ideal_step  # noqa: E402
from lib.timing import interleave_times  # noqa: E402
from step_time import SCALED, llama_model  # noqa: E402

ARMS = {"gate shut": {"noise_gate": 1.0}, "gate open": {"noise_gate": 0.0}, "no reference": {"reference": None}}


def measure(seq_len: int, batch: int, k: int, rounds: int) -> dict:
    from coreset_optim import CoresetOptimizer
    from coreset_optim.integrations.causal_lm import causal_lm_loss_fn

    torch.manual_seed(0)
    model = llama_model(SCALED["8b"][0], seq_len, lora=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss_fn = causal_lm_loss_fn(model)
    data = labeled_batch(batch, seq_len, SCALED["8b"][0].vocab, 1)
    fields = {key: data[key] for key in ("input_ids", "labels")}
    passes = {name: 0 for name in ARMS}

    def coreset(name: str, wrapper):
        def step():
            timings = coreset_step(wrapper, loss_fn, fields, sources=data["source"]).timings
            passes[name] += "reference" in timings

        return step

    fns = {name: coreset(name, CoresetOptimizer(opt, model, coreset_size=k, **o)) for name, o in ARMS.items()}
    fns["ideal"] = lambda: ideal_step(model, opt, loss_fn, fields, k)
    fns["accum"] = lambda: accumulation_step(opt, loss_fn, fields, k)
    times = interleave_times(fns, rounds, warmup=1)
    mean = {name: statistics.mean(t) for name, t in times.items()}
    return {"seq_len": seq_len, "batch": batch, "k": k, "times": times, "mean": mean, "reference_passes": passes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-lens", default="128,512")
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--k", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(1)
    result = {"machine": machine_info("cpu", 1), "rows": []}
    for seq_len in [int(t) for t in a.seq_lens.split(",")]:
        row = measure(seq_len, a.batch, a.k, a.rounds)
        result["rows"].append(row)
        print(json.dumps({key: v for key, v in row.items() if key != "times"}), flush=True)
    out = results_dir("reference_cost")
    result = save_json(out / "reference_cost.json", result, "reference_cost")
    lines = [
        md_header(result["produced_by"])
        + "# The base-model reference's cost at 8B proportions (`benchmarks/reference_cost.py`)",
        "",
        f"LoRA r = 8 (q, v) on `step_time.py`'s 8b shape, B = {a.batch}, k = {a.k}, {a.rounds} rounds after one "
        f"warm-up, one torch thread, {result['machine']['cpu']}. Mean seconds per step; reference passes counted from "
        "`Coreset.timings` over the warm-up and the rounds.",
        "",
        "| T | no reference | gate shut | gate open | ideal | accumulation | shut / none | open / none | shut / ideal "
        "| open / ideal | shut / accum | open / accum | passes (shut, open) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        m = r["mean"]
        none, shut, opened = m["no reference"], m["gate shut"], m["gate open"]
        p = r["reference_passes"]
        lines.append(
            f"| {r['seq_len']} | {none:.3f} | {shut:.3f} | {opened:.3f} | {m['ideal']:.3f} | {m['accum']:.3f} | "
            f"{shut / none:.2f} | {opened / none:.2f} | {shut / m['ideal']:.2f} | {opened / m['ideal']:.2f} | "
            f"{shut / m['accum']:.2f} | {opened / m['accum']:.2f} | {p['gate shut']}, {p['gate open']} |"
        )
    (out / "reference_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
