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
from torch import nn

IGNORE_INDEX = -100


def causal_lm_per_example_loss(
    outputs: Any, labels: torch.Tensor, *, shift: bool = True, ignore_index: int = IGNORE_INDEX
) -> torch.Tensor:
    """Mean token cross-entropy of each example: ``Tensor[B]`` (float32; NaN without label tokens),
    computed in chunks of rows (:func:`token_nll`): no float32 ``[B, T, V]`` copy of the logits.

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
    if shift:  # shift the labels, not the logits: a sliced [B, T-1, V] view would be copied whole
        labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), ignore_index)], dim=1)
    token_loss = token_nll(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index)
    counts = (labels != ignore_index).sum(1)
    return token_loss.view(labels.shape).sum(1) / counts  # 0 / 0 = NaN for an example without label tokens


# Rows of logits turned into float32 at a time by token_nll: ~32 MiB of float32 per temporary.
NLL_CHUNK_BYTES = 32 * 2**20


def token_nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Each row's cross-entropy ``logsumexp(logits[i]) - logits[i, labels[i]]`` (float32, 0 where
    ``labels[i] == ignore_index``), a few thousand rows at a time.

    ``F.cross_entropy`` on ``[N, V]`` logits makes a float32 copy (of bf16 logits) and keeps a
    ``[N, V]`` log-softmax for backward: at 512 tokens and a 50k vocabulary, 100 MB per example
    each. Here the float32 temporaries are one chunk of rows; backward keeps only the logits
    (which autograd holds anyway) and one log-sum-exp per row, and rebuilds the softmax chunk by
    chunk into the logits' gradient.
    """
    return _TokenNLL.apply(logits, labels, ignore_index)


def _rows_per_chunk(vocab: int) -> int:
    return max(1, NLL_CHUNK_BYTES // (4 * max(1, vocab)))


class _TokenNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
        num_rows, vocab = logits.shape
        keep = labels != ignore_index
        safe = torch.where(keep, labels, 0)
        lse = torch.empty(num_rows, dtype=torch.float32, device=logits.device)
        picked = logits.gather(1, safe[:, None]).squeeze(1).float()
        step = _rows_per_chunk(vocab)
        for r0 in range(0, num_rows, step):
            torch.logsumexp(logits[r0 : r0 + step].float(), dim=1, out=lse[r0 : r0 + step])
        ctx.save_for_backward(logits, safe, keep, lse)
        return torch.where(keep, lse - picked, 0.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        logits, safe, keep, lse = ctx.saved_tensors
        scale = torch.where(keep, grad.float(), 0.0)
        out = torch.empty_like(logits)
        num_rows, vocab = logits.shape
        step = _rows_per_chunk(vocab)
        for r0 in range(0, num_rows, step):
            rows = slice(r0, r0 + step)
            p = (logits[rows].float() - lse[rows, None]).exp_()  # softmax of the chunk (a new tensor)
            p.scatter_add_(1, safe[rows, None], torch.full_like(p[:, :1], -1.0))
            out[rows] = p.mul_(scale[rows, None])
        return out, None, None


def causal_lm_loss_fn(
    model: nn.Module, *, labels_key: str = "labels", shift: bool = True, ignore_index: int = IGNORE_INDEX
) -> Callable[[Mapping[str, Any]], torch.Tensor]:
    """A ``loss_fn`` for ``select()``: calls ``model(**batch)`` without the labels (so the model does
    not compute its own batch-mean loss) and returns :func:`causal_lm_per_example_loss`.

    A Hugging Face model (one whose config has ``use_cache``) is called with ``use_cache=False``
    unless the batch says otherwise: in eval mode (the sketch pass) it would build a KV cache."""

    def loss_fn(batch: Mapping[str, Any]) -> torch.Tensor:
        if not isinstance(batch, Mapping) or labels_key not in batch:
            raise ValueError(f"causal_lm_loss_fn: the batch must be a mapping with the labels under {labels_key!r}")
        inputs = {k: v for k, v in batch.items() if k != labels_key}
        if getattr(getattr(model, "config", None), "use_cache", None) is not None:
            inputs.setdefault("use_cache", False)  # a KV cache is never read here: don't build one
        return causal_lm_per_example_loss(model(**inputs), batch[labels_key], shift=shift, ignore_index=ignore_index)

    return loss_fn
