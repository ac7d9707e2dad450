"""Batch structures: dicts of tensors/lists, tuples, lists, a tensor, numpy arrays."""

from collections import OrderedDict, namedtuple

import numpy as np
import pytest
import torch

from coreset_optim.batching import batch_size, chunk_slices, index_batch
from core_utils import build, make_batch, regression_loss, weighted_grad_reference

Pair = namedtuple("Pair", ["x", "y"])


class MyBatch(dict):
    """A dict subclass, like transformers' BatchEncoding."""


def _as_tensor(v):
    return torch.as_tensor(v) if isinstance(v, np.ndarray) else v


STRUCTURES = {
    "dict+lists": (
        lambda d: {
            "x": d["x"],
            "y": d["y"],
            "ids": list(range(100, 112)),
            "text": [f"t{i}" for i in range(12)],
            "none": None,
        },
        lambda b: {"x": b["x"], "y": b["y"]},
    ),
    "ordered dict": (lambda d: OrderedDict(x=d["x"], y=d["y"]), dict),
    "dict subclass": (lambda d: MyBatch(x=d["x"], y=d["y"]), dict),
    "tuple": (lambda d: (d["x"], d["y"]), lambda b: {"x": b[0], "y": b[1]}),
    "list": (lambda d: [d["x"], d["y"]], lambda b: {"x": b[0], "y": b[1]}),
    "namedtuple": (lambda d: Pair(d["x"], d["y"]), lambda b: {"x": b.x, "y": b.y}),
    "numpy dict": (
        lambda d: {"x": d["x"].numpy(), "y": d["y"].numpy()},
        lambda b: {"x": _as_tensor(b["x"]), "y": _as_tensor(b["y"])},
    ),
    "numpy tuple": (
        lambda d: (d["x"].numpy(), d["y"].numpy()),
        lambda b: {"x": _as_tensor(b[0]), "y": _as_tensor(b[1])},
    ),
    "tuple of tensor and list": (
        lambda d: (d["x"], [row for row in d["y"]]),
        lambda b: {"x": b[0], "y": torch.stack(list(b[1]))},
    ),
}


def _assert_same_structure(got, want):
    assert type(got) is type(want)
    if isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            _assert_same_structure(got[k], want[k])
    elif isinstance(want, (tuple, list)) and not isinstance(want, str):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            _assert_same_structure(a, b)
    elif isinstance(want, torch.Tensor):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    elif isinstance(want, np.ndarray):
        np.testing.assert_array_equal(got, want)
    else:
        assert got == want


def _slice_by_hand(structure, idx):
    """The selected examples, indexed one by one (the obviously right sub-batch)."""
    if structure is None:
        return None
    if isinstance(structure, torch.Tensor):
        return torch.stack([structure[i] for i in idx]) if idx else structure[:0]
    if isinstance(structure, np.ndarray):
        return np.stack([structure[i] for i in idx])
    if isinstance(structure, dict):
        return type(structure)((k, _slice_by_hand(v, idx)) for k, v in structure.items())
    if isinstance(structure, tuple) and hasattr(structure, "_fields"):
        return type(structure)(*[_slice_by_hand(v, idx) for v in structure])
    return None


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_batch_structures(name):
    wrap_batch, unwrap = STRUCTURES[name]
    data = make_batch(12)
    batch = wrap_batch(data)
    assert batch_size(batch) == 12
    model, opt, wrapper = build(coreset_size=5, sketch_batch_size=5, micro_batch_size=2)
    loss_fn = regression_loss(model)
    cs = wrapper.select(batch, lambda b: loss_fn(unwrap(b)))
    idx = cs.indices.tolist()
    assert len(idx) == 5
    if isinstance(batch, dict):
        want = type(batch)(
            (k, _slice_by_hand(v, idx) if not isinstance(v, list) else [v[i] for i in idx]) for k, v in batch.items()
        )
    elif isinstance(batch, tuple) and hasattr(batch, "_fields"):
        want = _slice_by_hand(batch, idx)
    else:
        want = type(batch)(_slice_by_hand(v, idx) if not isinstance(v, list) else [v[i] for i in idx] for v in batch)
    _assert_same_structure(cs.batch, want)
    ref = weighted_grad_reference(model, data, loss_fn, cs.indices, cs.weights, 12)
    for p, g in ref.items():
        torch.testing.assert_close(p.grad, g)


def test_single_tensor_batch():
    model, opt, wrapper = build(coreset_size=3)
    x = torch.randn(9, 5)
    cs = wrapper.select(x, lambda b: model(b).pow(2).mean(1))
    torch.testing.assert_close(cs.batch, x[cs.indices], rtol=0, atol=0)
    ref = weighted_grad_reference(model, {"x": x}, lambda b: model(b["x"]).pow(2).mean(1), cs.indices, cs.weights, 9)
    for p, g in ref.items():
        torch.testing.assert_close(p.grad, g)


def test_index_batch_and_chunks():
    batch = {"a": torch.arange(6), "b": list("abcdef"), "c": (torch.arange(6) * 2).numpy(), "n": None}
    sub = index_batch(batch, torch.tensor([4, 1]))
    assert sub["a"].tolist() == [4, 1] and sub["b"] == ["e", "b"] and sub["c"].tolist() == [8, 2]
    assert sub["n"] is None
    sub = index_batch(batch, slice(2, 4))
    assert sub["a"].tolist() == [2, 3] and sub["b"] == ["c", "d"] and sub["c"].tolist() == [4, 6]
    assert index_batch((torch.arange(3), ("p", "q", "r")), torch.tensor([2]))[1] == ("r",)
    assert chunk_slices(7, 3) == [slice(0, 3), slice(3, 6), slice(6, 7)]
    assert chunk_slices(7, None) == [slice(0, 7)] == chunk_slices(7, 7)
    assert batch_size({"a": torch.zeros(3, 2), "b": [1, 2, 3], "n": None}) == 3
