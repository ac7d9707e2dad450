"""What a step costs in memory: the peak a call adds (host RSS, or the CUDA allocator's peak) and
the bytes one forward pass saves for backward.

Host memory: freed blocks of 64 KiB or more are returned to the OS first and from then on (glibc's
mmap threshold), so RSS follows the live tensors; the peak (``VmHWM``) is reset through
``/proc/self/clear_refs``. Linux only.
"""

from __future__ import annotations

import ctypes
import gc
import re
import time
from collections.abc import Callable

import torch


def status_kb(key: str) -> int:
    """A field of ``/proc/self/status`` in KiB (``"VmRSS"``, ``"VmHWM"``)."""
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))


def release_host_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def set_malloc_mmap_threshold(nbytes: int) -> None:
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD; also stops its auto-growth
    except OSError:
        pass


def reset_host_peak() -> int:
    """Return freed memory to the OS and reset the peak RSS; the RSS (bytes) a peak is then
    measured above."""
    set_malloc_mmap_threshold(65536)
    release_host_memory()
    base = status_kb("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return base


def measure_peak(fn: Callable[[], object], device: torch.device | str = "cpu") -> tuple[int, int, float]:
    """``(peak bytes above base, base bytes, seconds)`` of one call ``fn()`` in this process: on
    CUDA the allocator's peak above what was allocated before, else the peak RSS above the RSS
    after :func:`reset_host_peak`."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = reset_host_peak()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() if cuda else status_kb("VmHWM") * 1024
    return peak - base, base, seconds


class ActivationMeter:
    """Largest bytes saved for backward by one forward (parameters excluded)."""

    def __init__(self, model):
        self.params = {p.data_ptr() for p in model.parameters()}
        self.current = self.peak = 0

    def pack(self, t):
        if t.data_ptr() not in self.params:
            self.current += t.numel() * t.element_size()
        return t

    def wrap(self, loss_fn):
        def measured(batch):
            self.current = 0
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                out = loss_fn(batch)
            self.peak = max(self.peak, self.current)
            return out

        return measured
