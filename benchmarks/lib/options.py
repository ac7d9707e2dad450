"""Command-line options the scripts share: a training run's (large batch, coreset size, steps,
seeds, learning rate) and one measured step's shape (large batch, coreset size, tokens, threads)."""

from __future__ import annotations

import argparse


def add_run_options(parser: argparse.ArgumentParser, steps: int) -> None:
    """The options every training benchmark takes: large batch, coreset size, steps, seeds, lr."""
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--lr", type=float, default=3e-3)


def add_step_options(parser: argparse.ArgumentParser, batch: int, k: int, seq_len: int, threads: int = 1) -> None:
    """The shape of one measured step: large batch B, coreset size k, tokens per example, torch threads."""
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--k", type=int, default=k)
    parser.add_argument("--seq-len", type=int, default=seq_len)
    parser.add_argument("--threads", type=int, default=threads)
