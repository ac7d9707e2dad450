"""String tasks in an instruction -> answer format: the pretraining corpus and the fine-tuning mixture.

An example is ``[BOS, op..., input..., SEP, answer..., EOS]``: one or two operation tokens (two
mean "apply the first, then the second"), a string over 20 symbols (digits 0-9, letters a-j) and
the answer string. Pretraining (:func:`pretraining_batch`) teaches seven operations and their
pairwise compositions on strings of 2-6 symbols; the fine-tuning mixture
(:func:`make_finetune_mixture`) asks for longer strings (3-8) on four of those operations ("close"
sources) and three new ones ("new" sources), in shares from 40 % down to 0.8 % (50x). Two held-out
tasks that are not training sources compose a new operation with a known one; each has an
evaluation split and a small, disjoint "target" split (for target-aware selection).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .synthetic import split_counts  # the same largest-remainder split as the from-scratch mixture

PAD, BOS, SEP, EOS = 0, 1, 2, 3
FIRST_SYMBOL = 4
NUM_SYMBOLS = 20  # 10 digits then 10 letters
SYMBOLS = "0123456789abcdefghij"
IGNORE = -100
MAX_INPUT = 8
SEQ_LEN = 1 + 2 + MAX_INPUT + 1 + MAX_INPUT + 1  # BOS, <= 2 ops, input, SEP, answer, EOS

Op = Callable[[list[int]], list[int]]


def _succ(s: list[int]) -> list[int]:
    """Next symbol within its class: 9 -> 0, j -> a."""
    return [(x // 10) * 10 + (x % 10 + 1) % 10 for x in s]


def _pred(s: list[int]) -> list[int]:
    return [(x // 10) * 10 + (x % 10 - 1) % 10 for x in s]


def _dedupe(s: list[int]) -> list[int]:
    return [x for i, x in enumerate(s) if i == 0 or s[i - 1] != x]


def _swap(s: list[int]) -> list[int]:
    out = list(s)
    for i in range(0, len(s) - 1, 2):
        out[i], out[i + 1] = s[i + 1], s[i]
    return out


# Operations on symbol indices (0..19). The first seven are pretrained.
OPS: dict[str, Op] = {
    "copy": lambda s: list(s),
    "reverse": lambda s: s[::-1],
    "succ": _succ,
    "pred": _pred,
    "dedupe": _dedupe,
    "rotl": lambda s: s[1:] + s[:1],
    "swap": _swap,
    "sort": sorted,
    "max": lambda s: [max(s)],
    "rotr": lambda s: s[-1:] + s[:-1],
}
PRETRAINED_OPS = ("copy", "reverse", "succ", "pred", "dedupe", "rotl", "swap")
OP_TOKEN = {name: FIRST_SYMBOL + NUM_SYMBOLS + i for i, name in enumerate(OPS)}
VOCAB_SIZE = FIRST_SYMBOL + NUM_SYMBOLS + len(OPS)


@dataclass(frozen=True)
class Task:
    """``ops`` applied in order to random strings of ``lengths`` symbols (``runs``: inputs made of
    runs of repeated symbols, so that ``dedupe`` has something to remove)."""

    name: str
    ops: tuple[str, ...]
    lengths: tuple[int, int] = (3, MAX_INPUT)
    runs: bool = False

    def answer(self, s: list[int]) -> list[int]:
        for op in self.ops:
            s = OPS[op](s)
        return s


@dataclass(frozen=True)
class Source:
    task: Task
    share: float
    kind: str  # "close" (a pretrained operation, longer strings) or "new"


SOURCES: tuple[Source, ...] = (
    Source(Task("copy", ("copy",)), 0.40, "close"),
    Source(Task("reverse", ("reverse",)), 0.25, "close"),
    Source(Task("succ", ("succ",)), 0.15, "close"),
    Source(Task("sort", ("sort",)), 0.10, "new"),
    Source(Task("dedupe", ("dedupe",), runs=True), 0.06, "close"),
    Source(Task("max", ("max",)), 0.032, "new"),
    Source(Task("rotr", ("rotr",)), 0.008, "new"),
)
# Not training sources: each needs a new operation learned from a source plus a composition that
# only pretraining showed.
HELD_OUT: tuple[Task, ...] = (
    Task("sort_reverse", ("sort", "reverse")),
    Task("rotr_succ", ("rotr", "succ")),
)


def random_input(task: Task, g: torch.Generator) -> list[int]:
    lo, hi = task.lengths
    n = int(torch.randint(lo, hi + 1, (1,), generator=g))
    if not task.runs:
        return torch.randint(0, NUM_SYMBOLS, (n,), generator=g).tolist()
    out: list[int] = []
    while len(out) < n:
        out += [int(torch.randint(0, NUM_SYMBOLS, (1,), generator=g))] * int(torch.randint(1, 4, (1,), generator=g))
    return out[:n]


def encode(ops: Sequence[str], s: Sequence[int], answer: Sequence[int] | None) -> list[int]:
    """Token ids of one example; ``answer=None`` gives the prompt only (ending with SEP)."""
    ids = [BOS, *(OP_TOKEN[o] for o in ops), *(FIRST_SYMBOL + x for x in s), SEP]
    if answer is not None:
        ids += [FIRST_SYMBOL + x for x in answer] + [EOS]
    return ids


def to_batch(rows: Sequence[list[int]], prompt_lengths: Sequence[int]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``labels`` ``[n, SEQ_LEN]``; labels score the answer and EOS only."""
    ids = torch.full((len(rows), SEQ_LEN), PAD, dtype=torch.long)
    labels = torch.full((len(rows), SEQ_LEN), IGNORE, dtype=torch.long)
    for i, (row, p) in enumerate(zip(rows, prompt_lengths)):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, p : len(row)] = torch.tensor(row[p:])
    return {"input_ids": ids, "labels": labels}


def decode(ids: Sequence[int]) -> str:
    """Readable text of token ids (for printing examples)."""
    names = {PAD: "", BOS: "", SEP: " > ", EOS: ""}
    names.update({v: f"[{k}] " for k, v in OP_TOKEN.items()})
    return "".join(
        names.get(int(t), SYMBOLS[int(t) - FIRST_SYMBOL] if FIRST_SYMBOL <= t < FIRST_SYMBOL + NUM_SYMBOLS else "?")
        for t in ids
    )


def make_examples(task: Task, n: int, g: torch.Generator, exclude: set | None = None) -> dict:
    """``n`` examples of ``task`` whose (ops, input) is not in ``exclude``; adds them to it."""
    rows, prompts, inputs = [], [], []
    seen = exclude if exclude is not None else set()
    tries = 0
    while len(rows) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise RuntimeError(f"cannot draw {n} distinct examples of {task.name}")
        s = random_input(task, g)
        key = (task.ops, tuple(s))
        if key in seen:
            continue
        seen.add(key)
        prompt = encode(task.ops, s, None)
        rows.append(encode(task.ops, s, task.answer(s)))
        prompts.append(len(prompt))
        inputs.append(s)
    batch = to_batch(rows, prompts)
    batch["prompt_length"] = torch.tensor(prompts)
    return batch


def pretraining_batch(n: int, g: torch.Generator, pair_share: float = 0.3) -> dict[str, torch.Tensor]:
    """``n`` pretraining examples: a pretrained operation, or (``pair_share``) two, on 2-6 symbols."""
    rows, prompts = [], []
    for _ in range(n):
        k = 2 if float(torch.rand(1, generator=g)) < pair_share else 1
        idx = torch.randperm(len(PRETRAINED_OPS), generator=g)[:k].tolist()
        ops = tuple(PRETRAINED_OPS[i] for i in idx)
        task = Task("pretrain", ops, lengths=(2, 6), runs="dedupe" in ops and float(torch.rand(1, generator=g)) < 0.5)
        s = random_input(task, g)
        prompt = encode(ops, s, None)
        rows.append(encode(ops, s, task.answer(s)))
        prompts.append(len(prompt))
    return to_batch(rows, prompts)


@dataclass
class FinetuneMixture:
    """``train``: ``input_ids``/``labels`` ``[N, SEQ_LEN]``, ``source`` ``[N]`` (index into
    ``names``), shuffled. ``eval`` and ``target``: per task name (sources and held-out tasks),
    ``input_ids``/``labels``/``prompt_length``. ``shares``: the sources' shares of ``train``."""

    train: dict[str, torch.Tensor]
    eval: dict[str, dict[str, torch.Tensor]]
    target: dict[str, dict[str, torch.Tensor]]
    names: list[str]
    shares: list[float]
    kinds: list[str]
    held_out: list[str]


def make_finetune_mixture(
    num_train: int = 20000,
    num_eval: int = 200,
    num_target: int = 32,
    seed: int = 0,
    sources: Sequence[Source] = SOURCES,
    held_out: Sequence[Task] = HELD_OUT,
    slices: Sequence[Task] = (),
) -> FinetuneMixture:
    """The training pool (split by shares), ``num_eval`` held-out examples per source and
    held-out task, and ``num_target`` target examples per held-out task. ``slices``: tasks that are
    narrow parts of a source (same ops, e.g. a length range), with eval and target splits like the
    held-out tasks' (their names are not added to ``held_out``). No (ops, input) appears in two of
    train / eval / target. Deterministic in ``seed``; no slices: the same draws as before."""
    g = torch.Generator().manual_seed(seed)
    seen: set = set()
    evals = {t.name: make_examples(t, num_eval, g, seen) for t in [s.task for s in sources] + list(held_out)}
    targets = {t.name: make_examples(t, num_target, g, seen) for t in held_out}
    for t in slices:
        evals[t.name] = make_examples(t, num_eval, g, seen)
        targets[t.name] = make_examples(t, num_target, g, seen)
    counts = split_counts(num_train, [s.share for s in sources])
    ids, labels, src = [], [], []
    for i, (source, count) in enumerate(zip(sources, counts)):
        ex = make_examples(source.task, count, g, seen)
        ids.append(ex["input_ids"])
        labels.append(ex["labels"])
        src.append(torch.full((count,), i, dtype=torch.long))
    perm = torch.randperm(num_train, generator=g)
    train = {"input_ids": torch.cat(ids)[perm], "labels": torch.cat(labels)[perm], "source": torch.cat(src)[perm]}
    return FinetuneMixture(
        train,
        evals,
        targets,
        [s.task.name for s in sources],
        [s.share for s in sources],
        [s.kind for s in sources],
        [t.name for t in held_out],
    )
