"""Label noise for the fine-tuning pool: corrupted answers, and the mask of the rows corrupted.

Loss-based selection is known to prefer mislabeled examples (their loss stays high), so the
fine-tuning benchmark needs a pool with wrong answers whose positions are known. Everything here is
a pure function of the clean pool and a seed: the same settings give the same corrupted rows, and
the boolean mask is the ground truth a "suspect example" report can be scored against.

Only answers change: the prompt (operation and input) stays, and the labels are rebuilt so that they
score exactly the new answer and EOS (``IGNORE`` on the prompt). Only a training pool is corrupted:
:func:`corrupt_mixture` leaves the evaluation and target splits as they are (the same objects).

Every model guarantees that a corrupted row's answer differs from its clean answer (the mask marks
wrong answers, not rows merely touched):

- ``random_tokens``: the answer replaced by uniform random symbols, same length (redrawn if equal).
- ``swap_within_source``: the chosen rows of a source pass their answers around one random cycle;
  a row that would get an answer equal to its own (or the only chosen row of its source) takes the
  answer of a random other row of its source whose answer differs.
- ``other_task``: the answer another source's task gives for the row's input, that source drawn
  uniformly among those whose answer differs from the clean one.

Placement (how many rows): ``per_source`` corrupts ``round(rate * n_s)`` rows of every source s;
``concentrated`` corrupts the same total count, all in the largest source (so the two placements
differ only in where the wrong answers are), and refuses a total larger than that source.
The rows chosen depend only on (counts, rate, placement, seed), not on the noise model, so the
models can be compared on the same rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .tasks import EOS, FIRST_SYMBOL, IGNORE, NUM_SYMBOLS, SOURCES, FinetuneMixture, Source, Task, to_batch

PLACEMENTS = ("per_source", "concentrated")


@dataclass(frozen=True)
class ParsedPool:
    """The pool as symbol lists (``inputs``, ``answers``: indices 0..19), the prompts' token ids
    (through SEP) and each row's source: what the noise models read."""

    prompts: list[list[int]]
    inputs: list[list[int]]
    answers: list[list[int]]
    source: list[int]


def parse_pool(train: Mapping[str, torch.Tensor]) -> ParsedPool:
    """Split every row at its first scored label: the prompt before, answer symbols then EOS."""
    prompts, inputs, answers = [], [], []
    for ids, labels in zip(train["input_ids"].tolist(), train["labels"].tolist()):
        scored = [j for j, t in enumerate(labels) if t != IGNORE]
        start, end = scored[0], scored[-1]  # first answer token, EOS
        if ids[end] != EOS or any(not FIRST_SYMBOL <= t < FIRST_SYMBOL + NUM_SYMBOLS for t in ids[start:end]):
            raise ValueError("a training row's scored labels are not answer symbols then EOS")
        prompts.append(ids[:start])
        inputs.append([t - FIRST_SYMBOL for t in ids[1 : start - 1] if FIRST_SYMBOL <= t < FIRST_SYMBOL + NUM_SYMBOLS])
        answers.append([t - FIRST_SYMBOL for t in ids[start:end]])
    return ParsedPool(prompts, inputs, answers, train["source"].tolist())


def corruption_counts(counts: Sequence[int], rate: float, placement: str) -> list[int]:
    """Rows to corrupt per source: ``round(rate * n_s)`` each (halves up), or, ``concentrated``,
    their sum in the largest source (the first one on a tie)."""
    _check_amount(rate, placement)
    per = [math.floor(rate * c + 0.5) for c in counts]
    if placement == "per_source":
        return per
    big = max(range(len(counts)), key=lambda s: (counts[s], -s))
    total = sum(per)
    if total > counts[big]:
        raise ValueError(
            f"concentrated noise: {total} corrupted rows do not fit in the largest source "
            f"({counts[big]} rows); lower the rate or use placement='per_source'"
        )
    return [total if s == big else 0 for s in range(len(counts))]


def choose_rows(source: torch.Tensor, per_source: Sequence[int], seed: int) -> torch.Tensor:
    """Boolean mask with ``per_source[s]`` uniformly drawn rows of each source s."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(source.shape[0], dtype=torch.bool)
    for s, k in enumerate(per_source):
        rows = torch.nonzero(source == s).flatten()
        mask[rows[torch.randperm(rows.numel(), generator=g)[:k]]] = True
    return mask


def _pick(options: Sequence, g: torch.Generator):
    return options[int(torch.randint(len(options), (1,), generator=g))]


def random_tokens(rows: Sequence[int], pool: ParsedPool, tasks: Sequence[Task], g: torch.Generator) -> list[list[int]]:
    """Uniform random symbols of the answer's length, redrawn until they differ from it."""
    out = []
    for r in rows:
        clean = pool.answers[r]
        if not clean:
            raise ValueError(f"row {r} has an empty answer: random_tokens cannot make it wrong")
        new = clean
        while new == clean:
            new = torch.randint(NUM_SYMBOLS, (len(clean),), generator=g).tolist()
        out.append(new)
    return out


def swap_within_source(
    rows: Sequence[int], pool: ParsedPool, tasks: Sequence[Task], g: torch.Generator
) -> list[list[int]]:
    """Each source's chosen rows pass answers along one random cycle; collisions (an answer equal
    to the row's own) take a random differing answer of another row of the source instead."""
    new: dict[int, list[int]] = {}
    for s in sorted({pool.source[r] for r in rows}):
        chosen = [r for r in rows if pool.source[r] == s]
        cycle = [chosen[i] for i in torch.randperm(len(chosen), generator=g).tolist()]
        for a, b in zip(cycle, cycle[1:] + cycle[:1]):
            new[a] = pool.answers[b]
        members = [r for r, src in enumerate(pool.source) if src == s]
        for a in cycle:
            if new[a] == pool.answers[a]:
                donors = [r for r in members if pool.answers[r] != pool.answers[a]]
                if not donors:
                    raise ValueError(f"source {s}: all rows share one answer; swap_within_source cannot make one wrong")
                new[a] = pool.answers[_pick(donors, g)]
    return [new[r] for r in rows]


def other_task(rows: Sequence[int], pool: ParsedPool, tasks: Sequence[Task], g: torch.Generator) -> list[list[int]]:
    """The answer of another source's task on the row's input, that source drawn uniformly among
    those whose answer differs from the clean one."""
    out = []
    for r in rows:
        s, clean = pool.source[r], pool.answers[r]
        options = [t.answer(list(pool.inputs[r])) for i, t in enumerate(tasks) if i != s]
        options = [a for a in options if a != clean]
        if not options:
            raise ValueError(f"row {r}: no other source's task gives a different answer for its input")
        out.append(_pick(options, g))
    return out


NoiseModel = Callable[[Sequence[int], ParsedPool, Sequence[Task], torch.Generator], list[list[int]]]
NOISE_MODELS: dict[str, NoiseModel] = {
    "random_tokens": random_tokens,
    "swap_within_source": swap_within_source,
    "other_task": other_task,
}


def check_noise(model: str, rate: float, placement: str) -> None:
    """A clear ValueError for an unknown model or placement, or a rate outside [0, 1)."""
    if model not in NOISE_MODELS:
        raise ValueError(f"unknown noise model {model!r}; known: {list(NOISE_MODELS)}")
    _check_amount(rate, placement)


def _check_amount(rate: float, placement: str) -> None:
    if placement not in PLACEMENTS:
        raise ValueError(f"unknown noise placement {placement!r}; known: {list(PLACEMENTS)}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
        raise ValueError(f"noise rate must be a number in [0, 1), got {rate!r}")


def corrupt_pool(
    train: Mapping[str, torch.Tensor],
    tasks: Sequence[Task],
    model: str,
    rate: float,
    placement: str = "per_source",
    seed: int = 0,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The pool with corrupted answers, and the ``BoolTensor[N]`` of the rows corrupted.

    ``train``: ``input_ids``/``labels`` ``[N, SEQ_LEN]`` and ``source`` ``[N]`` (index into
    ``tasks``, the sources' tasks). Other fields pass through. Uncorrupted rows are unchanged; the
    input is never modified. Rows from ``seed``, new answers from a second generator (``seed + 1``)."""
    check_noise(model, rate, placement)
    source = train["source"]
    counts = torch.bincount(source, minlength=len(tasks)).tolist()
    if len(counts) > len(tasks):
        raise ValueError(f"the pool has sources up to {len(counts) - 1} but {len(tasks)} tasks were given")
    mask = choose_rows(source, corruption_counts(counts, rate, placement), seed)
    out = {key: value for key, value in train.items()}
    rows = torch.nonzero(mask).flatten().tolist()
    if not rows:
        return out, mask
    pool = parse_pool(train)
    answers = NOISE_MODELS[model](rows, pool, tasks, torch.Generator().manual_seed(seed + 1))
    new = to_batch(
        [pool.prompts[r] + [FIRST_SYMBOL + x for x in a] + [EOS] for r, a in zip(rows, answers)],
        [len(pool.prompts[r]) for r in rows],
    )
    index = torch.tensor(rows)
    for key in ("input_ids", "labels"):
        out[key] = train[key].clone()
        out[key][index] = new[key]
    return out, mask


def corrupt_mixture(
    mixture: FinetuneMixture,
    model: str,
    rate: float,
    placement: str = "per_source",
    seed: int = 0,
    sources: Sequence[Source] = SOURCES,
) -> tuple[FinetuneMixture, torch.Tensor]:
    """``mixture`` with a corrupted training pool (evaluation and target splits: the same, clean
    objects), and the mask of corrupted pool rows. ``sources``: those the mixture was made from."""
    names = [s.task.name for s in sources]
    if names != mixture.names:
        raise ValueError(f"sources {names} are not the mixture's {mixture.names}")
    train, mask = corrupt_pool(mixture.train, [s.task for s in sources], model, rate, placement, seed)
    return dataclasses.replace(mixture, train=train), mask
