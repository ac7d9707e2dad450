import torch

from coreset_optim.datasets.synthetic import IGNORE, SEP, TASKS, VOCAB_SIZE, answer_losses, make_mixture, split_counts


def test_sizes_and_shares():
    m = make_mixture(2000, num_eval=16, seed=0)
    counts = torch.bincount(m.train["source"], minlength=len(TASKS)).tolist()
    assert counts == [round(2000 * t.share) for t in TASKS]  # 1000/500/240/120/80/40/20
    assert len(TASKS) >= 6 and len(set(counts)) == len(counts)
    assert m.train["input_ids"].shape == m.train["labels"].shape == (2000, m.train["input_ids"].shape[1])
    assert int(m.train["input_ids"].max()) < VOCAB_SIZE
    for name in m.names:
        assert m.eval[name]["input_ids"].shape[0] == 16


def test_split_counts_sums_and_keeps_every_source():
    assert sum(split_counts(101, [0.5, 0.3, 0.2])) == 101
    assert min(split_counts(50, [0.98, 0.01, 0.01])) >= 1


def test_deterministic_under_seed():
    a, b, c = make_mixture(300, 8, seed=4), make_mixture(300, 8, seed=4), make_mixture(300, 8, seed=5)
    for key in a.train:
        assert torch.equal(a.train[key], b.train[key])
    assert not torch.equal(a.train["input_ids"], c.train["input_ids"])
    assert torch.equal(a.eval["sort"]["input_ids"], b.eval["sort"]["input_ids"])


def test_answers_solve_the_tasks():
    m = make_mixture(700, 8, seed=1)
    ids, labels, src = m.train["input_ids"], m.train["labels"], m.train["source"]
    for i in range(ids.shape[0]):
        sep = int((ids[i] == SEP).nonzero()[0])
        x = ids[i, 1:sep]
        y = labels[i][labels[i] != IGNORE]
        name = m.names[int(src[i])]
        if name == "copy":
            assert torch.equal(x, y)
        elif name == "reverse":
            assert torch.equal(x.flip(0), y)
        elif name == "sort":
            assert torch.equal(x.sort().values, y)
        elif name == "add":
            place = 10 ** torch.arange(5)
            assert int((y * place).sum()) == int((x[:4] * place[:4]).sum() + (x[4:] * place[:4]).sum())


def test_answer_losses_reference():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 5, generator=g)
    labels = torch.tensor([[IGNORE, IGNORE, 1, 2, IGNORE, IGNORE], [IGNORE, 0, 0, 0, 0, 0], [IGNORE] * 5 + [4]])
    got = answer_losses(logits, labels)
    for i in range(3):
        terms = [
            torch.nn.functional.cross_entropy(logits[i, t - 1 : t], labels[i, t : t + 1])
            for t in range(1, 6)
            if labels[i, t] != IGNORE
        ]
        torch.testing.assert_close(got[i], torch.stack(terms).mean())
