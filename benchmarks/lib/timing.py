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
    return {name: statistics.median(t) for name, t in interleave_times(fns, reps, warmup).items()}


def interleave_times(fns: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each call of each function, called in alternation ``reps`` times after a warm-up:
    round r of every function is ``times[name][r]`` (per-round ratios compare calls made side by side)."""
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
    return times


def round_ratios(times: dict[str, list[float]], reference: str) -> dict[str, list[float]]:
    """Per round, each function's seconds over ``reference``'s in the same round."""
    ref = times[reference]
    return {name: [a / b for a, b in zip(t, ref)] for name, t in times.items()}
