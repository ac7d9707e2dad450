"""CPU time of ``select()`` + ``step()`` on the e2e benchmark's LoRA model, for A/B runs of two checkouts.

Run it alternately with each checkout first on PYTHONPATH (e.g. the commit before the bounded
sketch path, and after); one process per run, median over 5 steps after a warm-up step. CPU time
(one torch thread) rather than wall time, because the machine is shared.

Usage: ``PYTHONPATH=<checkout> python benchmarks/select_cpu_time.py LABEL``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib.data import token_batch  # noqa: E402
from lib.models import tiny_lora_llama  # noqa: E402

from coreset_optim import CoresetOptimizer  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    model, loss_fn = tiny_lora_llama("h128-l4", seq_len=64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    wrapper = CoresetOptimizer(opt, model, coreset_size=32)
    times = []
    for i in range(6):
        batch = token_batch(128, 64, seed=i)
        start = time.process_time()
        wrapper.select(batch, loss_fn, sources=batch["source"])
        wrapper.step()
        wrapper.zero_grad()
        times.append(time.process_time() - start)
    print(sys.argv[1] if len(sys.argv) > 1 else "run", round(statistics.median(times[1:]), 4))


if __name__ == "__main__":
    main()
