"""The fine-tuning tasks: operations, encoding and the mixture's splits, against hand-computed cases."""

import torch

from coreset_optim.datasets.tasks import (
    BOS,
    EOS,
    FIRST_SYMBOL,
    IGNORE,
    OP_TOKEN,
    OPS,
    PAD,
    SEP,
    SEQ_LEN,
    SOURCES,
    Task,
    encode,
    make_finetune_mixture,
    pretraining_batch,
    split_counts,
    to_batch,
)

S = {c: i for i, c in enumerate("0123456789abcdefghij")}


def sym(text):
    return [S[c] for c in text]


def test_operations_hand_computed():
    assert OPS["reverse"](sym("12a")) == sym("a21")
    assert OPS["succ"](sym("09aj")) == sym("10ba")
    assert OPS["pred"](sym("0a")) == sym("9j")
    assert OPS["dedupe"](sym("aab11a")) == sym("ab1a")
    assert OPS["rotl"](sym("123")) == sym("231")
    assert OPS["rotr"](sym("123")) == sym("312")
    assert OPS["swap"](sym("12345")) == sym("21435")
    assert OPS["sort"](sym("b1a0")) == sym("01ab")
    assert OPS["max"](sym("3b1")) == sym("b")
    assert Task("t", ("rotr", "succ")).answer(sym("569a")) == sym("b670")


def test_encoding_and_labels():
    row = encode(("sort",), sym("ba"), sym("ab"))
    assert row == [
        BOS,
        OP_TOKEN["sort"],
        FIRST_SYMBOL + 11,
        FIRST_SYMBOL + 10,
        SEP,
        FIRST_SYMBOL + 10,
        FIRST_SYMBOL + 11,
        EOS,
    ]
    batch = to_batch([row], [5])
    assert batch["input_ids"].shape == (1, SEQ_LEN)
    assert batch["input_ids"][0, len(row) :].eq(PAD).all()
    assert batch["labels"][0].tolist() == [IGNORE] * 5 + row[5:] + [IGNORE] * (SEQ_LEN - len(row))


def test_split_counts():
    assert split_counts(100, [0.5, 0.3, 0.2]) == [50, 30, 20]
    assert split_counts(10, [0.98, 0.01, 0.01]) == [8, 1, 1]
    assert sum(split_counts(20000, [s.share for s in SOURCES])) == 20000


def test_mixture_shares_and_disjoint_splits():
    m = make_finetune_mixture(num_train=1000, num_eval=10, num_target=5, seed=3)
    counts = torch.bincount(m.train["source"], minlength=len(m.names)).tolist()
    assert counts == split_counts(1000, m.shares)
    assert max(m.shares) / min(m.shares) >= 50
    assert set(m.eval) == set(m.names) | set(m.held_out) and set(m.target) == set(m.held_out)
    rows = lambda d: {tuple(r.tolist()) for r in d["input_ids"]}  # noqa: E731
    train = rows(m.train)
    for name in m.eval:
        assert not rows(m.eval[name]) & train
    for name in m.held_out:
        assert not rows(m.target[name]) & rows(m.eval[name])
    # every training label is the task's answer
    ex = m.eval["sort"]
    for ids, labels, p in zip(ex["input_ids"], ex["labels"], ex["prompt_length"]):
        x = [t - FIRST_SYMBOL for t in ids[2 : p - 1].tolist()]
        assert labels[labels != IGNORE].tolist() == [FIRST_SYMBOL + v for v in sorted(x)] + [EOS]
    again = make_finetune_mixture(num_train=1000, num_eval=10, num_target=5, seed=3)
    assert torch.equal(again.train["input_ids"], m.train["input_ids"])


def test_slice_splits_disjoint_and_in_range():
    """A slice (sort on 3-symbol inputs) gets eval and target splits, disjoint from each other and
    from the pool (whose sort source still holds other 3-symbol inputs); no slices: same draws."""
    sl = Task("sort_len3", ("sort",), lengths=(3, 3))
    m = make_finetune_mixture(num_train=1000, num_eval=10, num_target=5, seed=3, held_out=(), slices=[sl])
    assert set(m.target) == {"sort_len3"} and m.held_out == [] and "sort_len3" not in m.names
    rows = lambda d: {tuple(r.tolist()) for r in d["input_ids"]}  # noqa: E731
    ev, tg, train = rows(m.eval["sort_len3"]), rows(m.target["sort_len3"]), rows(m.train)
    assert len(ev) == 10 and len(tg) == 5 and not ev & tg and not (ev | tg) & train
    assert (m.eval["sort_len3"]["prompt_length"] == 2 + 3 + 1).all()
    sort_rows = m.train["input_ids"][m.train["source"] == m.names.index("sort")]
    assert (sort_rows[:, 5] == SEP).any()  # the source has 3-symbol inputs the slice did not take
    plain = make_finetune_mixture(num_train=1000, num_eval=10, num_target=5, seed=3)
    same = make_finetune_mixture(num_train=1000, num_eval=10, num_target=5, seed=3, slices=())
    assert torch.equal(plain.train["input_ids"], same.train["input_ids"])


def test_pretraining_uses_only_pretrained_ops():
    batch = pretraining_batch(64, torch.Generator().manual_seed(0))
    new = {OP_TOKEN[o] for o in ("sort", "max", "rotr")}
    assert not any(t in new for t in batch["input_ids"].flatten().tolist())
