"""Per-example losses of a causal language model, the form ``CoresetOptimizer.select`` needs.

Hugging Face causal-LM heads average the token losses of the whole batch; a coreset needs one loss
per example: the mean over that example's label tokens. Labels are shifted like transformers does
(the logits at position t predict label t + 1) and ``-100`` marks tokens that carry no loss. An
example with no label token has no loss: NaN, which ``select()`` counts as invalid and skips.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def causal_lm_per_example_loss(
    outputs: Any, labels: torch.Tensor, *, shift: bool = True, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean token cross-entropy of each example: ``Tensor[B]`` (float32; NaN without label tokens).

    ``outputs``: the model output (anything with ``.logits``) or the logits ``[B, T, V]`` themselves.
    ``labels``: ``[B, T]`` token ids, ``ignore_index`` where no loss is wanted. ``shift=False`` when
    the labels are already aligned with the logits.
    """
    if isinstance(outputs, Mapping) and "logits" in outputs:
        logits = outputs["logits"]
    else:
        logits = getattr(outputs, "logits", outputs)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 3:
        raise ValueError(
            "causal_lm_per_example_loss: expected logits of shape [batch, tokens, vocab] (or an "
            f"output with .logits), got {type(logits).__name__} {getattr(logits, 'shape', '')}"
        )
    if not isinstance(labels, torch.Tensor) or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"causal_lm_per_example_loss: labels must be a tensor shaped like the logits' first two "
            f"dimensions {tuple(logits.shape[:2])}, got {getattr(labels, 'shape', type(labels).__name__)}"
        )
    labels = labels.to(logits.device)
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    token_loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="none",
    ).reshape(labels.shape)
    counts = (labels != ignore_index).sum(1)
    return token_loss.sum(1) / counts  # 0 / 0 = NaN for an example without label tokens


def causal_lm_loss_fn(
    model: nn.Module, *, labels_key: str = "labels", shift: bool = True, ignore_index: int = IGNORE_INDEX
) -> Callable[[Mapping[str, Any]], torch.Tensor]:
    """A ``loss_fn`` for ``select()``: calls ``model(**batch)`` without the labels (so the model does
    not compute its own batch-mean loss) and returns :func:`causal_lm_per_example_loss`.

    A Hugging Face model (one whose config has ``use_cache``) is called with ``use_cache=False``
    unless the batch says otherwise: in eval mode (the sketch pass) it would build a KV cache."""

    def loss_fn(batch: Mapping[str, Any]) -> torch.Tensor:
        if not isinstance(batch, Mapping) or labels_key not in batch:
            raise ValueError(
                f"causal_lm_loss_fn: the batch must be a mapping with the labels under {labels_key!r}"
            )
        inputs = {k: v for k, v in batch.items() if k != labels_key}
        if getattr(getattr(model, "config", None), "use_cache", None) is not None:
            inputs.setdefault("use_cache", False)  # a KV cache is never read here: don't build one
        return causal_lm_per_example_loss(model(**inputs), batch[labels_key], shift=shift, ignore_index=ignore_index)

    return loss_fn
