"""Scoring a fine-tuned model per source: greedy-decoded exact match and answer loss, then the two
averages that tell different stories (mixture-weighted: the training objective; macro: each task
once, as per-task benchmarks count)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..integrations.causal_lm import causal_lm_per_example_loss
from .tasks import EOS, IGNORE


def answer_tokens(labels: torch.Tensor) -> list[list[int]]:
    """The scored tokens of each row of ``labels`` (answer and EOS), in order."""
    return [row[row != IGNORE].tolist() for row in labels]


def exact_match(generated: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], eos: int = EOS) -> list[bool]:
    """Whether each generated sequence, cut after its first ``eos``, equals the answer (which ends
    with ``eos``). A generation that never emits ``eos`` is wrong."""
    if len(generated) != len(answers):
        raise ValueError(f"{len(generated)} generations for {len(answers)} answers")
    out = []
    for gen, ans in zip(generated, answers):
        gen = list(gen)
        cut = gen[: gen.index(eos) + 1] if eos in gen else None
        out.append(cut is not None and cut == list(ans))
    return out


@torch.no_grad()
def greedy_answers(model, input_ids: torch.Tensor, prompt_length: torch.Tensor, max_new: int) -> list[list[int]]:
    """Greedy continuation of each prompt (``input_ids[i, :prompt_length[i]]``), ``max_new`` tokens.

    Prompts of equal length are decoded together, so no padding ever enters the model.
    """
    out: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    for p in sorted(set(prompt_length.tolist())):
        rows = torch.nonzero(prompt_length == p).flatten()
        seq = input_ids[rows, :p]
        for _ in range(max_new):
            logits = model(input_ids=seq).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
        for r, gen in zip(rows.tolist(), seq[:, p:].tolist()):
            out[r] = gen
    return out


def teacher_forced_exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Whether greedy decoding would produce each example's answer exactly: ``BoolTensor[n]``.

    Greedy decoding reproduces the answer (through EOS) if and only if, fed the correct prefix,
    the model's argmax is the next answer token at every answer position: so one teacher-forced
    forward pass scores exact match (``greedy_answers`` + ``exact_match`` is the slow reference).
    """
    pred = logits[:, :-1].argmax(-1)
    target = labels[:, 1:].to(pred.device)
    return ((pred == target) | (target == IGNORE)).all(1)


@torch.no_grad()
def evaluate_tasks(model, tasks: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, dict[str, float]]:
    """Per task: ``accuracy`` (exact match of the greedy answer) and ``loss`` (mean answer loss),
    from one forward pass per task."""
    was = model.training
    model.eval()
    acc, loss = {}, {}
    for name, data in tasks.items():
        logits = model(input_ids=data["input_ids"]).logits
        acc[name] = float(teacher_forced_exact_match(logits, data["labels"]).float().mean())
        loss[name] = float(causal_lm_per_example_loss(logits, data["labels"]).mean())
    model.train(was)
    return {"accuracy": acc, "loss": loss}


def mixture_weighted(values: Mapping[str, float], names: Sequence[str], shares: Sequence[float]) -> float:
    """Average of ``values[name]`` weighted by the sources' training shares."""
    if len(names) != len(shares):
        raise ValueError(f"{len(names)} names for {len(shares)} shares")
    return sum(values[n] * s for n, s in zip(names, shares)) / sum(shares)


def macro(values: Mapping[str, float], names: Sequence[str]) -> float:
    """Plain mean of ``values[name]`` over ``names``: each source counts once."""
    return sum(values[n] for n in names) / len(names)
