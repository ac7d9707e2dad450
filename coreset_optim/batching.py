"""Slicing user batches along their leading (example) dimension, and calling the user's
per-example loss function on a slice, with the checks that make its mistakes clear.

A batch is a tensor, a mapping of fields, or a tuple/list of fields. A field is a tensor (or numpy
array) whose first dimension is the example dimension, or, inside a mapping, a per-example list.
``None`` fields pass through untouched.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch

Batch = Any


def _field_sizes(batch: Batch, path: str, out: dict[str, int], top: bool) -> None:
    if batch is None:
        return
    if isinstance(batch, torch.Tensor) or _is_ndarray(batch):
        if batch.ndim == 0:
            raise ValueError(f"batch field {path} is a scalar; every field needs a leading example dimension")
        out[path] = int(batch.shape[0])
    elif isinstance(batch, Mapping):
        for key, value in batch.items():
            _field_sizes(value, f"{path}[{key!r}]", out, top=False)
    elif isinstance(batch, (tuple, list)):
        if top:
            for i, value in enumerate(batch):
                _field_sizes(value, f"{path}[{i}]", out, top=False)
        else:
            out[path] = len(batch)
    else:
        raise TypeError(
            f"batch field {path} has type {type(batch).__name__}; use tensors, numpy arrays, "
            "per-example lists, or mappings/tuples of them"
        )


def _is_ndarray(x: Any) -> bool:
    return type(x).__module__ == "numpy" and hasattr(x, "shape") and hasattr(x, "ndim")


def batch_size(batch: Batch) -> int:
    """The shared leading dimension B of every field; a clear error if they disagree or B == 0."""
    sizes: dict[str, int] = {}
    _field_sizes(batch, "batch", sizes, top=True)
    if not sizes:
        raise ValueError("batch holds no tensor or list field; pass the examples to select from")
    distinct = set(sizes.values())
    if len(distinct) > 1:
        detail = ", ".join(f"{k}: {v}" for k, v in sizes.items())
        raise ValueError(
            f"batch fields disagree on the leading (example) dimension ({detail}); "
            "every field must hold one entry per example"
        )
    size = distinct.pop()
    if size == 0:
        raise ValueError("batch is empty (0 examples); pass at least one example")
    return size


def index_batch(batch: Batch, index: torch.Tensor | slice, top: bool = True) -> Batch:
    """The sub-batch of the examples at ``index`` (a LongTensor or a slice), same structure."""
    if batch is None:
        return None
    if isinstance(batch, torch.Tensor):
        if isinstance(index, slice):
            return batch[index]
        return batch.index_select(0, index.to(batch.device))
    if _is_ndarray(batch):
        return batch[index if isinstance(index, slice) else index.cpu().numpy()]
    if isinstance(batch, Mapping):
        return _rebuild_mapping(batch, {k: index_batch(v, index, top=False) for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):
        if top:
            fields = [index_batch(v, index, top=False) for v in batch]
            return type(batch)(fields) if not hasattr(batch, "_fields") else type(batch)(*fields)
        if isinstance(index, slice):
            return batch[index]
        picked = [batch[i] for i in index.tolist()]
        return type(batch)(picked) if isinstance(batch, tuple) else picked
    raise TypeError(f"cannot index a batch field of type {type(batch).__name__}")


def _rebuild_mapping(original: Mapping, values: dict) -> Mapping:
    """Keep mapping subclasses (e.g. transformers' BatchEncoding) when they can be rebuilt."""
    try:
        return type(original)(values)
    except Exception:  # noqa: BLE001 - fall back to a plain dict for exotic mappings
        return values


def chunk_slices(size: int, chunk: int | None) -> list[slice]:
    """Contiguous slices of at most ``chunk`` examples covering ``range(size)``."""
    if chunk is None or chunk >= size:
        return [slice(0, size)]
    return [slice(start, min(start + chunk, size)) for start in range(0, size, chunk)]


LossFn = Callable[[Any], torch.Tensor]


def call_loss_fn(loss_fn: LossFn, batch: Any, num_examples: int) -> torch.Tensor:
    """``loss_fn(batch)`` checked to be a Tensor[num_examples] of per-example losses."""
    losses = loss_fn(batch)
    if not isinstance(losses, torch.Tensor):
        raise TypeError(
            f"loss_fn must return a Tensor of per-example losses, got {type(losses).__name__}; "
            "return e.g. F.cross_entropy(..., reduction='none') reduced to one value per example"
        )
    if losses.ndim != 1 or losses.shape[0] != num_examples:
        raise ValueError(
            f"loss_fn returned a tensor of shape {tuple(losses.shape)} for a slice of "
            f"{num_examples} examples; it must return one loss per example (shape "
            f"[{num_examples}]), not a scalar or a per-token loss: use reduction='none' and "
            "average each example's tokens"
        )
    if not losses.is_floating_point():
        raise TypeError(f"loss_fn must return floating-point losses, got dtype {losses.dtype}")
    return losses


def losses_in_chunks(loss_fn: LossFn, batch: Any, num_examples: int, chunk: int | None) -> torch.Tensor:
    """Detached per-example losses of the whole batch, ``chunk`` examples per ``loss_fn`` call.

    The caller chooses the context (e.g. ``torch.no_grad()`` and eval mode)."""
    rows = [
        call_loss_fn(loss_fn, index_batch(batch, piece), piece.stop - piece.start).detach()
        for piece in chunk_slices(num_examples, chunk)
    ]
    return torch.cat(rows)
