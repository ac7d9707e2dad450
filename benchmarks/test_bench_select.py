"""``select()`` end to end, split by stage (``Coreset.timings``), on the e2e benchmark's model."""

from __future__ import annotations

import statistics

import torch

from coreset_optim import CoresetOptimizer
from lib.data import token_batch
from lib.models import tiny_lora_llama

B, K, T = 128, 32, 64
STAGES = ("prepare", "sketch", "compress", "similarity", "greedy", "weights", "backward")


def test_select_stages(benchmark, record):
    model, loss_fn = tiny_lora_llama("h128-l4", seq_len=T)
    opt = CoresetOptimizer(
        torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3),
        model,
        coreset_size=K,
        source_key="source",
    )
    batches = [token_batch(B, T, seed=i) for i in range(6)]
    rows = []

    def step(i=[0]):  # noqa: B006 - a counter across calls
        coreset = opt.select(batches[i[0] % len(batches)], loss_fn)
        opt.step()
        opt.zero_grad()
        i[0] += 1
        rows.append(coreset.timings)

    step()  # warm-up, and Adam state exists from here on
    rows.clear()
    benchmark.pedantic(step, rounds=5, iterations=1)
    med = {s: statistics.median(r.get(s, 0.0) for r in rows) for s in (*STAGES, "total")}
    selection = sum(med[s] for s in ("prepare", "compress", "similarity", "greedy", "weights"))
    row = {f"{s}_ms": med[s] * 1e3 for s in (*STAGES, "total")}
    row["unaccounted_ms"] = (med["total"] - sum(med[s] for s in STAGES)) * 1e3
    row["selection_stages/total"] = selection / med["total"]
    row["target"] = "< 0.05"
    record("select() by stage (B = 128, k = 32, h128-l4)", "3 sources", **row)
    benchmark.extra_info.update(row)
