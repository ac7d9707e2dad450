"""Label noise on the fine-tuning pool: counts, exact mask, untouched rows and splits, determinism."""

import math

import pytest
import torch

from coreset_optim.datasets.noise import NOISE_MODELS, corrupt_mixture, corrupt_pool
from coreset_optim.datasets.tasks import EOS, FIRST_SYMBOL, IGNORE, PAD, SEP, SOURCES, make_finetune_mixture

MODELS = list(NOISE_MODELS)
TASKS = [s.task for s in SOURCES]
# make_finetune_mixture(1000) splits the pool 400/250/150/100/60/32/8 (copy ... rotr).
COUNTS = [400, 250, 150, 100, 60, 32, 8]


@pytest.fixture(scope="module")
def mixture():
    return make_finetune_mixture(num_train=1000, num_eval=10, num_target=5, seed=3)


def split(ids, labels):
    """(prompt, answer symbols) of one row, from the token ids alone (SEP ends the prompt)."""
    ids = ids.tolist()
    p, end = ids.index(SEP) + 1, ids.index(EOS)
    return ids[:p], [t - FIRST_SYMBOL for t in ids[p:end]]


def labels_consistent(ids, labels) -> bool:
    """IGNORE on the prompt and the padding, the token ids on answer and EOS, PAD after EOS."""
    row = ids.tolist()
    p, end = row.index(SEP) + 1, row.index(EOS) + 1
    want = [IGNORE] * p + row[p:end] + [IGNORE] * (len(row) - end)
    return labels.tolist() == want and all(t == PAD for t in row[end:])


def per_source(mask, source):
    return torch.bincount(source[mask], minlength=len(COUNTS)).tolist()


def test_pool_split_is_the_one_assumed(mixture):
    assert torch.bincount(mixture.train["source"]).tolist() == COUNTS


@pytest.mark.parametrize("model", MODELS)
def test_per_source_count_is_rate_times_size(mixture, model):
    _, mask = corrupt_pool(mixture.train, TASKS, model, 0.2)
    assert per_source(mask, mixture.train["source"]) == [80, 50, 30, 20, 12, 6, 2]
    assert mask.float().mean() == pytest.approx(0.2)
    _, mask = corrupt_pool(mixture.train, TASKS, model, 0.25)  # halves round up: 62.5 -> 63, 37.5 -> 38
    assert per_source(mask, mixture.train["source"]) == [100, 63, 38, 25, 15, 8, 2]


@pytest.mark.parametrize("model", MODELS)
def test_concentrated_puts_the_same_total_in_the_largest_source(mixture, model):
    _, mask = corrupt_pool(mixture.train, TASKS, model, 0.2, placement="concentrated")
    assert per_source(mask, mixture.train["source"]) == [200, 0, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="largest source"):
        corrupt_pool(mixture.train, TASKS, model, 0.5, placement="concentrated")  # 500 rows > 400


@pytest.mark.parametrize("placement", ["per_source", "concentrated"])
@pytest.mark.parametrize("model", MODELS)
def test_mask_is_exact_and_clean_rows_are_bit_identical(mixture, model, placement):
    clean = {k: v.clone() for k, v in mixture.train.items()}
    noisy, mask = corrupt_pool(mixture.train, TASKS, model, 0.3, placement, seed=5)
    for key in clean:
        assert torch.equal(mixture.train[key], clean[key])  # the input is not modified
        assert torch.equal(noisy[key][~mask], clean[key][~mask])
    assert torch.equal(noisy["source"], clean["source"])
    source = clean["source"].tolist()
    clean_answers = [split(ids, labels)[1] for ids, labels in zip(clean["input_ids"], clean["labels"])]
    for r in torch.nonzero(mask).flatten().tolist():
        prompt, answer = split(noisy["input_ids"][r], noisy["labels"][r])
        clean_prompt, clean_answer = split(clean["input_ids"][r], clean["labels"][r])
        assert labels_consistent(noisy["input_ids"][r], noisy["labels"][r])
        assert prompt == clean_prompt and answer != clean_answer
        assert all(0 <= x < 20 for x in answer)
        if model == "random_tokens":
            assert len(answer) == len(clean_answer)
        elif model == "swap_within_source":
            assert any(clean_answers[o] == answer for o in range(len(source)) if o != r and source[o] == source[r])
        else:
            x = [t - FIRST_SYMBOL for t in prompt[2:-1]]
            assert answer in [t.answer(x) for i, t in enumerate(TASKS) if i != source[r]]


def test_other_task_uses_other_sources_answers(mixture):
    """A hand check on one row: copy's input under reverse, succ, sort, ... (not copy itself)."""
    noisy, mask = corrupt_pool(mixture.train, TASKS, "other_task", 0.2, "concentrated")
    r = int(torch.nonzero(mask)[0])
    prompt, answer = split(noisy["input_ids"][r], noisy["labels"][r])
    x = [t - FIRST_SYMBOL for t in prompt[2:-1]]
    options = [
        x[::-1],
        [(v // 10) * 10 + (v % 10 + 1) % 10 for v in x],
        sorted(x),
        [v for i, v in enumerate(x) if i == 0 or x[i - 1] != v],
        [max(x)],
        x[-1:] + x[:-1],
    ]
    assert answer in [o for o in options if o != x]


def test_evaluation_and_target_splits_untouched(mixture):
    fresh = make_finetune_mixture(num_train=1000, num_eval=10, num_target=5, seed=3)
    noisy, mask = corrupt_mixture(mixture, "random_tokens", 0.3)
    assert mask.any() and not torch.equal(noisy.train["input_ids"], fresh.train["input_ids"])
    assert noisy.eval is mixture.eval and noisy.target is mixture.target
    for split_ in ("eval", "target"):
        for name, data in getattr(fresh, split_).items():
            for key, value in data.items():
                assert torch.equal(getattr(noisy, split_)[name][key], value)
    assert torch.equal(mixture.train["input_ids"], fresh.train["input_ids"])


def test_deterministic_in_seed_and_rows_shared_by_models(mixture):
    a, mask_a = corrupt_pool(mixture.train, TASKS, "swap_within_source", 0.2, seed=1)
    b, mask_b = corrupt_pool(mixture.train, TASKS, "swap_within_source", 0.2, seed=1)
    assert torch.equal(mask_a, mask_b) and torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["labels"], b["labels"])
    _, other_seed = corrupt_pool(mixture.train, TASKS, "swap_within_source", 0.2, seed=2)
    assert not torch.equal(mask_a, other_seed)
    for model in MODELS:  # the rows depend on counts, rate, placement and seed only
        assert torch.equal(corrupt_pool(mixture.train, TASKS, model, 0.2, seed=1)[1], mask_a)


def test_rate_zero_is_the_clean_pool(mixture):
    noisy, mask = corrupt_pool(mixture.train, TASKS, "other_task", 0.0)
    assert not mask.any() and all(torch.equal(noisy[k], v) for k, v in mixture.train.items())


def test_extra_fields_pass_through(mixture):
    train = {**mixture.train, "index": torch.arange(1000)}
    noisy, _ = corrupt_pool(train, TASKS, "random_tokens", 0.2)
    assert torch.equal(noisy["index"], torch.arange(1000))


@pytest.mark.parametrize(
    "model, rate, placement, match",
    [
        ("flip", 0.2, "per_source", "unknown noise model"),
        ("random_tokens", 0.2, "everywhere", "unknown noise placement"),
        ("random_tokens", -0.1, "per_source", r"\[0, 1\)"),
        ("random_tokens", 1.0, "per_source", r"\[0, 1\)"),
        ("random_tokens", math.nan, "per_source", r"\[0, 1\)"),
        ("random_tokens", "0.2", "per_source", r"\[0, 1\)"),
        ("random_tokens", True, "per_source", r"\[0, 1\)"),
    ],
)
def test_bad_input_is_refused(mixture, model, rate, placement, match):
    with pytest.raises(ValueError, match=match):
        corrupt_pool(mixture.train, TASKS, model, rate, placement)
    with pytest.raises(ValueError, match=match):
        corrupt_mixture(mixture, model, rate, placement)


def test_sources_must_match_the_mixture(mixture):
    with pytest.raises(ValueError, match="not the mixture's"):
        corrupt_mixture(mixture, "other_task", 0.2, sources=SOURCES[:3])
