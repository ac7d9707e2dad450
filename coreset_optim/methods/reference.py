"""A reference from outside the batch: each example's loss under the base model (adapters off).

Within one batch, a wrong answer and a hard clean one look alike (both have a high loss, and once
wrong answers are half a source they also win its vote). The base model was never trained on the
batch, so no batch can outvote it: a wrong answer is unlikely under the base too, and the rows whose
base loss lies in their source's high component (``anchored.implausible_rows``) are, under heavy noise,
mostly the wrong ones. On clean data the same component holds the new material the fine-tuning is
for, so the rule only acts once the running share of such rows says the data is noisy
(:func:`running_share`; ``AnchoredConsensus``'s ``noise_gate``).

The reference costs one no-grad forward over the batch, with the model's adapters switched off
by the integration that knows them (:func:`coreset_optim.extensions.reference_pass_context`:
peft's LoRA layers); a model without one has no reference (None).
"""

from __future__ import annotations

from typing import ContextManager

import torch

from ..extensions import reference_pass_context
from ..sketch.capture import BatchPass, sketch_mode


def reference_losses(batch_pass: BatchPass, switch_off: ContextManager[None] | None = None) -> torch.Tensor | None:
    """``Tensor[B]``: ``batch_pass``'s per-example losses under the base model, or None when no
    registered extension can switch the model's adapters off. Run as the loss pass runs (eval mode,
    no gradient, the extensions' sketch-pass contexts: e.g. QLoRA's 4-bit layers are kept from
    repacking), adapters off; everything restored afterwards. ``switch_off``: the model's
    :func:`~coreset_optim.extensions.reference_pass_context`, when the caller already has it."""
    context = reference_pass_context(batch_pass.model) if switch_off is None else switch_off
    if context is None:
        return None
    with sketch_mode(batch_pass.model, []), torch.no_grad(), context:
        return batch_pass.losses()


def running_share(previous: float | None, share: float, decay: float) -> float:
    """The exponential moving average ``decay * previous + (1 - decay) * share`` (``share`` itself
    for the first batch, ``previous`` None)."""
    return share if previous is None else decay * previous + (1.0 - decay) * share
