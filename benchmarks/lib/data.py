"""Token batches made in code (no dataset files)."""

from __future__ import annotations

import torch


def token_batch(size: int, seq_len: int = 64, vocab: int = 256, seed: int = 0) -> dict:
    """Three kinds of sequences (counting, repeating, alternating) with a ``source`` list."""
    g = torch.Generator().manual_seed(seed)
    kinds = torch.multinomial(torch.tensor([0.6, 0.3, 0.1]), size, replacement=True, generator=g)
    start = torch.randint(0, vocab, (size, 1), generator=g)
    t = torch.arange(seq_len)
    count = (start + t) % vocab
    repeat = start.expand(size, seq_len)
    alternate = torch.where(t % 2 == 0, start, (start * 7 + 3) % vocab)
    noise = torch.randint(0, vocab, (size, seq_len), generator=g)
    ids = torch.where(kinds[:, None] == 0, count, torch.where(kinds[:, None] == 1, repeat, alternate))
    ids = torch.where(torch.rand(size, seq_len, generator=g) < 0.1, noise, ids)
    return {"input_ids": ids, "source": [("count", "repeat", "alternate")[k] for k in kinds.tolist()]}


def labeled_batch(size: int, seq_len: int, vocab: int, seed: int) -> dict:
    """Random tokens with ``labels`` (the first quarter masked: a prompt without loss) and four
    sources in turn."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (size, seq_len), generator=g)
    labels = ids.clone()
    labels[:, : seq_len // 4] = -100
    return {"input_ids": ids, "labels": labels, "source": [("a", "b", "c", "d")[i % 4] for i in range(size)]}
