"""Seconds per stage of ``select()``, as ``Coreset.timings`` reports them."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


class Stopwatch:
    """Accumulates seconds per stage; synchronizes CUDA at stage boundaries only."""

    def __init__(self, timings: dict[str, float], device: torch.device):
        self.timings, self.cuda = timings, device.type == "cuda"
        self.last = self._now()

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def lap(self, stage: str) -> None:
        now = self._now()
        self.timings[stage] = self.timings.get(stage, 0.0) + now - self.last
        self.last = now
