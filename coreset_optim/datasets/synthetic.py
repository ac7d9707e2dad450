"""A token-level data mixture made in code, for benchmarks, the demo and tests.

Seven small sequence tasks over the digits 0-9, of different difficulty and very different sizes
(50/25/12/6/4/2/1 percent by default). Every example is ``[task token, input..., SEP, answer...]``
padded to a fixed length; only answer tokens are scored, so a per-example loss is the mean
cross-entropy of its answer. The task token tells the model which task it is solving.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

DIGITS = 10
SEP, PAD = 10, 11
FIRST_TASK_TOKEN = 12
SEQ_LEN = 18  # task token + at most 8 input tokens + SEP + at most 8 answer tokens
IGNORE = -100


def _copy(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    d = torch.randint(0, DIGITS, (x, 8), generator=g)
    return d, d.clone()


def _reverse(x, g):
    d = torch.randint(0, DIGITS, (x, 8), generator=g)
    return d, d.flip(1)


def _successor(x, g):
    d = torch.randint(0, DIGITS, (x, 8), generator=g)
    return d, (d + 1) % DIGITS


def _sort(x, g):
    d = torch.randint(0, DIGITS, (x, 8), generator=g)
    return d, d.sort(1).values


def _add(x, g):
    """Two 4-digit numbers, least significant digit first; the 5-digit sum likewise."""
    a = torch.randint(0, DIGITS, (x, 4), generator=g)
    b = torch.randint(0, DIGITS, (x, 4), generator=g)
    place = DIGITS ** torch.arange(4)
    total = (a * place).sum(1) + (b * place).sum(1)
    out = torch.stack([(total // DIGITS**i) % DIGITS for i in range(5)], 1)
    return torch.cat([a, b], 1), out


def _prefix_sum(x, g):
    d = torch.randint(0, DIGITS, (x, 8), generator=g)
    return d, d.cumsum(1) % DIGITS


def _periodic(x, g):
    """A pattern of period 2 or 3 shown for 8 tokens; the answer continues it for 8 more."""
    period = torch.randint(2, 4, (x, 1), generator=g)
    base = torch.randint(0, DIGITS, (x, 3), generator=g)
    pos = torch.arange(16)[None, :] % period
    seq = base.gather(1, pos)
    return seq[:, :8], seq[:, 8:]


@dataclass(frozen=True)
class Task:
    name: str
    share: float
    make: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]


TASKS: tuple[Task, ...] = (
    Task("copy", 0.50, _copy),
    Task("reverse", 0.25, _reverse),
    Task("successor", 0.12, _successor),
    Task("sort", 0.06, _sort),
    Task("add", 0.04, _add),
    Task("prefix_sum", 0.02, _prefix_sum),
    Task("periodic", 0.01, _periodic),
)
VOCAB_SIZE = FIRST_TASK_TOKEN + len(TASKS)


def split_counts(total: int, shares: Sequence[float]) -> list[int]:
    """``total`` split by ``shares`` (largest remainder), every source getting at least one."""
    s = sum(shares)
    raw = [total * x / s for x in shares]
    counts = [max(1, int(r)) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: -(raw[i] - int(raw[i])))
    i = 0
    while sum(counts) < total:
        counts[order[i % len(order)]] += 1
        i += 1
    while sum(counts) > total:
        j = max(range(len(counts)), key=lambda c: counts[c])
        counts[j] -= 1
    return counts


def encode(task_id: int, inputs: torch.Tensor, answers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``labels`` ``[n, SEQ_LEN]``; labels score only the answer tokens."""
    n, li = inputs.shape
    la = answers.shape[1]
    ids = torch.full((n, SEQ_LEN), PAD, dtype=torch.long)
    ids[:, 0] = FIRST_TASK_TOKEN + task_id
    ids[:, 1 : 1 + li] = inputs
    ids[:, 1 + li] = SEP
    ids[:, 2 + li : 2 + li + la] = answers
    labels = torch.full_like(ids, IGNORE)
    labels[:, 2 + li : 2 + li + la] = answers
    return ids, labels


@dataclass
class Mixture:
    """``train``: input_ids/labels ``[N, SEQ_LEN]`` and ``source`` ``[N]`` (task index), shuffled.
    ``eval``: per task name, held-out input_ids/labels. ``names[i]``: task of source index i."""

    train: dict[str, torch.Tensor]
    eval: dict[str, dict[str, torch.Tensor]]
    names: list[str]
    shares: list[float]


def make_mixture(num_train: int, num_eval: int = 64, seed: int = 0, tasks: Sequence[Task] = TASKS) -> Mixture:
    """A shuffled training pool of ``num_train`` examples split by the tasks' shares, and
    ``num_eval`` held-out examples per task (drawn from a separate stream). Deterministic in seed."""
    counts = split_counts(num_train, [t.share for t in tasks])
    g_train = torch.Generator().manual_seed(seed)
    g_eval = torch.Generator().manual_seed(seed + 1_000_003)
    ids, labels, sources, evals = [], [], [], {}
    for i, (task, count) in enumerate(zip(tasks, counts)):
        x, y = task.make(count, g_train)
        a, b = encode(i, x, y)
        ids.append(a)
        labels.append(b)
        sources.append(torch.full((count,), i, dtype=torch.long))
        ex, ey = task.make(num_eval, g_eval)
        ea, eb = encode(i, ex, ey)
        evals[task.name] = {"input_ids": ea, "labels": eb}
    perm = torch.randperm(num_train, generator=g_train)
    train = {
        "input_ids": torch.cat(ids)[perm],
        "labels": torch.cat(labels)[perm],
        "source": torch.cat(sources)[perm],
    }
    return Mixture(train, evals, [t.name for t in tasks], [t.share for t in tasks])


def answer_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example mean next-token cross-entropy over the scored (answer) tokens: ``Tensor[n]``."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    tok = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE,
        reduction="none",
    ).view(shift_labels.shape)
    mask = (shift_labels != IGNORE).float()
    return (tok * mask).sum(1) / mask.sum(1).clamp_min(1.0)
