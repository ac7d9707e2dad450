"""Training runs on a pool of examples: large batches drawn from it, one arm's training step
(a baseline or a coreset), the run's evaluation curve and each arm's seconds per step measured
round-robin. Shared by training.py (synthetic mixture) and the fine-tuning benchmarks."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from .memory import ActivationMeter


class BatchStream:
    """Large batches drawn uniformly (without replacement within an epoch) from the pool."""

    def __init__(self, train: dict, seed: int):
        self.train, self.n = train, train["input_ids"].shape[0]
        self.gen = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0

    def next(self, size: int) -> dict:
        if self.pos + size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos : self.pos + size]
        self.pos += size
        return {k: v[idx] for k, v in self.train.items()}


def rows(batch: dict, idx) -> dict:
    """The rows ``idx`` (a slice or indices) of every field of ``batch``."""
    return {key: v[idx] for key, v in batch.items()}


class Trainer:
    """One arm's model, optimizer and training step on a large batch.

    ``kind``: ``"random"`` (the first k examples, mean loss), ``"full"`` (the whole batch, mean),
    ``"accum"`` (the whole batch in micro-batches of k), ``"sample"`` (the rows ``sample(batch)``
    picks, mean) or ``"coreset"`` (``wrapper.select``, then ``on_select(batch, coreset)``).
    ``batch_factor``: how many times the run's batch size this arm draws (2 for "accumulate 2B").
    ``meter``: the largest activation memory of one forward of ``loss_fn``.
    """

    KINDS = ("random", "full", "accum", "sample", "coreset")

    def __init__(
        self,
        kind: str,
        k: int,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable,
        wrapper=None,
        sample: Callable[[dict], torch.Tensor] | None = None,
        on_select: Callable | None = None,
        batch_factor: int = 1,
    ):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        if (kind == "coreset") != (wrapper is not None) or (kind == "sample") != (sample is not None):
            raise ValueError(f"kind {kind!r} takes a wrapper for 'coreset' and a sampler for 'sample' only")
        self.kind, self.k, self.model, self.opt = kind, k, model, optimizer
        self.meter = ActivationMeter(model)  # the bytes one forward saves for backward
        self.loss_fn = self.meter.wrap(loss_fn)
        self.wrapper, self.sample, self.on_select, self.batch_factor = wrapper, sample, on_select, batch_factor

    def step(self, big: dict) -> None:
        k, kind, loss_fn = self.k, self.kind, self.loss_fn
        if kind == "random":
            loss_fn(rows(big, slice(None, k))).mean().backward()
        elif kind == "sample":
            loss_fn(rows(big, self.sample(big))).mean().backward()
        elif kind == "full":
            loss_fn(big).mean().backward()
        elif kind == "accum":
            n = big["input_ids"].shape[0]
            for start in range(0, n, k):
                (loss_fn(rows(big, slice(start, start + k))).sum() / n).backward()
        else:
            coreset = self.wrapper.select(big, loss_fn, sources=big["source"])
            if self.on_select is not None:
                self.on_select(big, coreset)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def train(
    trainer: Trainer,
    stream: BatchStream,
    steps: int,
    batch: int,
    evaluate: Callable | None,
    eval_every: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict], float]:
    """``steps`` training steps on batches of ``batch * trainer.batch_factor`` from ``stream``;
    returns the curve (``evaluate(model)`` at step 0, every ``eval_every`` steps and at the end,
    each with the training seconds so far; empty when ``evaluate`` is None) and the seconds
    spent in training steps. ``progress(step, steps)`` after every step."""
    curve = [] if evaluate is None else [{"step": 0, "measured_time": 0.0, **evaluate(trainer.model)}]
    spent = 0.0
    for step in range(1, steps + 1):
        big = stream.next(batch * trainer.batch_factor)
        t0 = time.perf_counter()
        trainer.step(big)
        spent += time.perf_counter() - t0
        if evaluate is not None and (step % eval_every == 0 or step == steps):
            curve.append({"step": step, "measured_time": spent, **evaluate(trainer.model)})
        if progress is not None:
            progress(step, steps)
    return curve, spent


def round_robin_costs(trainers: dict[str, Trainer], stream: BatchStream, batch: int, rounds: int) -> dict[str, float]:
    """Median seconds per training step of each trainer, measured round-robin (one step of each
    in turn, on the same large batch, so that load from other processes affects every arm
    alike), after two warm-up rounds (optimizer state, allocator). Each round draws
    ``batch * max(batch_factor)`` examples; a trainer steps on its share of them."""
    draw = batch * max(t.batch_factor for t in trainers.values())
    times: dict[str, list[float]] = {m: [] for m in trainers}
    for r in range(rounds + 2):
        big = stream.next(draw)
        for m, t in trainers.items():
            part = rows(big, slice(None, batch * t.batch_factor))
            t0 = time.perf_counter()
            t.step(part)
            if r >= 2:
                times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(v) for m, v in times.items()}
