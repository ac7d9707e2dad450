"""Side-by-side timing: every comparison is timed interleaved (A, B, C, A, B, C, ...) in one
process, because the machine is shared and its speed drifts.

Importing this module sets torch's thread count (``BENCH_THREADS``, default 1): on a loaded
2-core machine, OpenMP spinning with 2 threads made steps ~10x slower.
"""

from __future__ import annotations

import os
import statistics
import time

import torch

THREADS = int(os.environ.get("BENCH_THREADS", "1"))
torch.set_num_threads(THREADS)


def interleave(fns: dict, reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds of each function, called in alternation ``reps`` times after a warm-up."""
    torch.set_num_threads(THREADS)  # some libraries (numba's) reset it on import
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}
