"""The pretrained base: save_pretrained / from_pretrained round trip, and the committed files."""

import pytest
import torch

pytest.importorskip("transformers")

from coreset_optim.datasets import base_model  # noqa: E402
from coreset_optim.datasets.tasks import VOCAB_SIZE, pretraining_batch  # noqa: E402


def test_round_trip_gives_identical_logits(tmp_path):
    model = base_model.pretrain(seed=5, steps=2, batch=4, log_every=0)
    base_model.save_base(model, tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = base_model.load_base(tmp_path)
    ids = pretraining_batch(3, torch.Generator().manual_seed(0))["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_pretrain_is_deterministic_in_its_seed():
    a = base_model.pretrain(seed=1, steps=2, batch=4, log_every=0)
    b = base_model.pretrain(seed=1, steps=2, batch=4, log_every=0)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p, q, msg=n)


def test_committed_base_loads():
    model = base_model.load_base()
    assert model.config.vocab_size == VOCAB_SIZE
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


def test_missing_base_says_how_to_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m coreset_optim.datasets.base_model"):
        base_model.load_base(tmp_path)
