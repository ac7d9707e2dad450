"""Exact-match scoring, greedy decoding and the per-source averages, against hand-computed cases."""

import pytest
import torch

from coreset_optim.datasets.evaluation import (
    answer_tokens,
    evaluate_tasks,
    exact_match,
    greedy_answers,
    macro,
    mixture_weighted,
)
from coreset_optim.datasets.tasks import EOS, IGNORE


def test_exact_match_cuts_at_first_eos():
    answers = [[5, 6, EOS], [5, 6, EOS], [5, 6, EOS], [7, EOS], [7, EOS]]
    generated = [
        [5, 6, EOS, 9, 9],  # right, junk after EOS ignored
        [5, 6, 7, EOS, 9],  # one token too many
        [5, 6, 6, 6, 6],  # never stops
        [EOS, 7, EOS],  # stops too early
        [7, EOS],
    ]
    assert exact_match(generated, answers) == [True, False, False, False, True]


def test_exact_match_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 generations for 1 answers"):
        exact_match([[EOS], [EOS]], [[EOS]])


def test_answer_tokens_are_the_scored_labels():
    labels = torch.tensor([[IGNORE, IGNORE, 8, 9, EOS], [IGNORE, 4, EOS, IGNORE, IGNORE]])
    assert answer_tokens(labels) == [[8, 9, EOS], [4, EOS]]


def test_averages_hand_computed():
    values = {"a": 1.0, "b": 0.5, "c": 0.0}
    # (1 * 0.5 + 0.5 * 0.3 + 0 * 0.2) / 1.0
    assert mixture_weighted(values, ["a", "b", "c"], [0.5, 0.3, 0.2]) == pytest.approx(0.65)
    assert mixture_weighted(values, ["a", "b", "c"], [5, 3, 2]) == pytest.approx(0.65)  # shares need not sum to 1
    assert macro(values, ["a", "b", "c"]) == pytest.approx(0.5)
    assert macro(values, ["a", "c"]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mixture_weighted(values, ["a", "b"], [1.0])


class _Scripted(torch.nn.Module):
    """A "model" whose next token is (last token + 1), except after 7 it emits EOS."""

    def __init__(self, vocab=12):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids):
        nxt = torch.where(input_ids >= 7, torch.full_like(input_ids, EOS), input_ids + 1)
        logits = torch.nn.functional.one_hot(nxt, self.vocab).float() * 10
        return type("Out", (), {"logits": logits})()


def test_greedy_answers_match_a_one_example_loop():
    model = _Scripted()
    ids = torch.tensor([[1, 4, 5, 0, 0], [1, 6, 0, 0, 0], [1, 2, 3, 0, 0]])
    plen = torch.tensor([3, 2, 3])
    got = greedy_answers(model, ids, plen, max_new=3)
    for i in range(3):  # reference: decode each prompt alone, token by token
        seq = ids[i : i + 1, : plen[i]]
        for _ in range(3):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert got[i] == seq[0, plen[i] :].tolist()
    assert got[0] == [6, 7, EOS]


def test_evaluate_tasks_scores_accuracy_and_loss():
    model = _Scripted()
    # prompt [1, 4, 5], answer 6 7 EOS (right); prompt [1, 2], answer 9 EOS (wrong: model says 3).
    ids = torch.tensor([[1, 4, 5, 6, 7, EOS], [1, 2, 9, EOS, 0, 0]])
    labels = torch.tensor([[IGNORE, IGNORE, IGNORE, 6, 7, EOS], [IGNORE, IGNORE, 9, EOS, IGNORE, IGNORE]])
    res = evaluate_tasks(model, {"t": {"input_ids": ids, "labels": labels, "prompt_length": torch.tensor([3, 2])}})
    assert res["accuracy"]["t"] == 0.5
    # loss: mean over examples of the mean token cross-entropy of the scored tokens
    logits = model(ids).logits[:, :-1]
    tok = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 12), labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(2, -1)
    per = [tok[0, 2:5].mean(), tok[1, 1:3].mean()]
    assert res["loss"]["t"] == pytest.approx(float(sum(per) / 2), rel=1e-5)


def test_teacher_forced_exact_match_equals_greedy_decoding():
    """On the committed base (right on some answers, wrong on others), the one-pass score equals
    decoding each prompt greedily and comparing."""
    from coreset_optim.datasets.base_model import load_base
    from coreset_optim.datasets.evaluation import teacher_forced_exact_match
    from coreset_optim.datasets.tasks import make_finetune_mixture

    model = load_base()
    mixture = make_finetune_mixture(num_train=100, num_eval=40, num_target=4, seed=1)
    agree = 0
    for name in ("copy", "reverse", "sort"):
        data = mixture.eval[name]
        answers = answer_tokens(data["labels"])
        with torch.no_grad():
            fast = teacher_forced_exact_match(model(input_ids=data["input_ids"]).logits, data["labels"])
        slow = exact_match(greedy_answers(model, data["input_ids"], data["prompt_length"], 9), answers)
        assert fast.tolist() == slow
        agree += sum(slow)
    assert 0 < agree < 120  # both right and wrong answers were compared
