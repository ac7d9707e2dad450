"""``CoresetSFTTrainer``: TRL's ``SFTTrainer`` training on a weighted coreset of each micro-batch.

``CoresetSFTTrainer = CoresetTrainerMixin + trl.SFTTrainer`` and ``CoresetSFTConfig =
CoresetArguments + trl.SFTConfig``: SFT prepares the data (chat templates, tokenization, the
completion-only and assistant-only label masks, truncation), the mixin replaces the training step
by ``select()`` on each micro-batch (see :mod:`coreset_optim.integrations.transformers`).

Per-example losses: the mean negative log-likelihood over each example's label tokens. SFT marks
the tokens that carry no loss (the prompt under ``completion_only_loss``, everything outside the
assistant turns under ``assistant_only_loss``) with ``-100`` in ``labels`` while preparing the
dataset, and the loss reads ``labels``, so both masks hold. An example left without label
tokens (SFT drops those after truncation) would be invalid and skipped.

Refused, with the way out in the message: ``packing`` and ``padding_free`` (a row then holds
several examples, or the batch is one flattened row: no row is one example's, so there is nothing
to select among), ``loss_type="dft"``, ``compute_loss_func`` and a Mixture-of-Experts router loss
(not per-example losses: pass ``per_example_loss=...`` that computes them), ``activation_offloading``
(SFT applies it in its own ``training_step``, which the coreset step replaces) and vision datasets.
SFT's training metrics, which SFT computes in its ``compute_loss`` (not called by the coreset
step), are computed as SFT does on the batch the Trainer reports, the large batch (as ``loss``):
``num_tokens`` (attention-mask tokens of every rank, cumulative), ``entropy`` and
``mean_token_accuracy`` (over the tokens that carry loss, every rank's, one value per micro-batch,
averaged over the logging window), from the logits of the selection's pass over the micro-batch
(no extra forward). With ``per_example_loss=...`` that pass is yours and has no logits to read:
``entropy`` and ``mean_token_accuracy`` are then not logged. Evaluation is SFT's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from trl import SFTConfig, SFTTrainer

from .causal_lm import IGNORE_INDEX, NLL_CHUNK_BYTES, causal_lm_per_example_loss
from .transformers import CoresetArguments, CoresetTrainerMixin, PerExampleLoss

__all__ = ["CoresetSFTConfig", "CoresetSFTTrainer"]


@dataclass
class CoresetSFTConfig(CoresetArguments, SFTConfig):
    """``trl.SFTConfig`` plus the :class:`~coreset_optim.CoresetOptimizer` options (:class:`CoresetArguments`)."""


@torch.no_grad()
def token_statistics(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``[entropy sum, top-1 hits, tokens]`` (float64) over the tokens that carry loss, as SFT's metrics
    define them: at each position whose next-token label is not ``-100``, the entropy of the
    predicted distribution and whether its most likely token is the label. A few thousand rows of
    logits are made float32 at a time."""
    shifted = labels[:, 1:].to(logits.device)
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    target = shifted.reshape(-1)
    keep = target != IGNORE_INDEX
    sums = torch.zeros(3, dtype=torch.float64, device=logits.device)
    step = max(1, NLL_CHUNK_BYTES // (4 * max(1, logits.shape[-1])))
    for r0 in range(0, flat.shape[0], step):
        rows, mask = flat[r0 : r0 + step].float(), keep[r0 : r0 + step]
        log_p = torch.log_softmax(rows, dim=-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        hits = rows.argmax(-1) == target[r0 : r0 + step]
        sums[0] += entropy[mask].sum().double()
        sums[1] += (hits & mask).sum().double()
        sums[2] += mask.sum().double()
    return sums


def _views_of(part: Any, whole: Any) -> bool:
    """Whether ``part`` is a slice of ``whole`` (the same storage): a chunk of the micro-batch."""
    return (
        isinstance(part, torch.Tensor)
        and isinstance(whole, torch.Tensor)
        and part.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr()
    )


class CoresetSFTTrainer(CoresetTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` that backpropagates a weighted coreset of every micro-batch.

    ``per_example_loss(model, inputs) -> Tensor[n]`` replaces the default per-example loss (the
    mean NLL of each example's label tokens). Needs :class:`CoresetSFTConfig`. Each selection fires
    ``on_selection`` on the callbacks that define it, as in ``CoresetTrainer``
    (:class:`~coreset_optim.integrations.transformers.CoresetCallback`).
    """

    arguments_class = CoresetSFTConfig

    # --- SFT's training metrics on the large batch -------------------------------------------------
    def _per_example_losses(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        """The default per-example loss; on the selection's pass over the micro-batch (eval mode,
        chunks that are slices of it) also the chunk's token statistics, once per chunk."""
        batch = self._selection_inputs
        chunk = inputs.get("input_ids") if isinstance(inputs, Mapping) else None
        if (
            self.per_example_loss is not None
            or batch is None
            or self.model.training
            or not _views_of(chunk, batch.get("input_ids"))
        ):
            return super()._per_example_losses(model, inputs)
        with self.compute_loss_context_manager():
            forward = {k: v for k, v in inputs.items() if k != "labels"}
            forward.setdefault("use_cache", False)
            outputs = model(**forward)
            losses = causal_lm_per_example_loss(outputs, inputs["labels"])
        self._token_sums.setdefault(chunk.storage_offset(), token_statistics(outputs.logits.detach(), inputs["labels"]))
        return losses

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """The coreset step, and SFT's ``num_tokens``, ``entropy`` and ``mean_token_accuracy`` for the
        micro-batch (every rank's, as SFT gathers them)."""
        self._token_sums: dict[int, torch.Tensor] = {}
        loss = super().training_step(model, inputs, num_items_in_batch)
        gather = self.accelerator.gather_for_metrics
        mask = inputs.get("attention_mask")
        if mask is not None:
            self._total_train_tokens += gather(mask.sum().to(self.args.device)).sum().item() // self._tp_size
            self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
        if self.per_example_loss is None:
            local = sum(self._token_sums.values()) if self._token_sums else torch.zeros(3, dtype=torch.float64)
            entropy, hits, tokens = gather(local.to(self.args.device)[None]).sum(0).tolist()
            self._metrics["train"]["entropy"].append(entropy / tokens if tokens > 0 else 0.0)
            self._metrics["train"]["mean_token_accuracy"].append(hits / tokens if tokens > 0 else 0.0)
        self._token_sums = {}
        return loss

    def _check_coreset_arguments(self, args: Any, per_example_loss: PerExampleLoss | None) -> None:
        super()._check_coreset_arguments(args, per_example_loss)
        if not isinstance(args, SFTConfig):
            raise TypeError(f"{type(self).__name__} needs args=CoresetSFTConfig(...), got {type(args).__name__}")
        if args.packing:
            raise ValueError(
                "packing=True puts several examples into one row, so no row's loss is one example's and "
                "a coreset cannot choose among them; set packing=False in CoresetSFTConfig (each row is "
                "then one example, padded to the longest of its batch)"
            )
        if args.padding_free:
            raise ValueError(
                "padding_free=True flattens the batch into one row, so a coreset cannot choose among its "
                "examples; set padding_free=False in CoresetSFTConfig"
            )
        if args.loss_type != "nll" and per_example_loss is None:
            raise ValueError(
                f"loss_type={args.loss_type!r} is not the default per-example loss (the mean NLL of each "
                f"example's label tokens); pass {type(self).__name__}(per_example_loss=...) that computes "
                "it per example, or set loss_type='nll'"
            )
        if args.activation_offloading:
            raise ValueError(
                "activation_offloading=True is applied by SFTTrainer.training_step, which the coreset step "
                "replaces, so it would silently be off; set activation_offloading=False (the coreset "
                "already keeps activations for only coreset_size examples)"
            )

    def _check_coreset_setup(self) -> None:
        super()._check_coreset_setup()
        custom = self.per_example_loss is not None
        if getattr(self, "compute_loss_func", None) is not None and not custom:
            raise ValueError(
                "compute_loss_func returns one loss for the batch, and the coreset step needs one per "
                f"example; pass {type(self).__name__}(per_example_loss=...) instead"
            )
        if getattr(self, "aux_loss_enabled", False) and not custom:
            raise ValueError(
                "this Mixture-of-Experts model adds a router auxiliary loss, which is not a per-example "
                "loss; set router_aux_loss_coef=0.0 in CoresetSFTConfig, or pass "
                f"{type(self).__name__}(per_example_loss=...) that includes it per example"
            )
        if getattr(self, "_is_vision_dataset", False):
            raise ValueError(
                f"{type(self).__name__} does not support vision datasets yet (a batch's image tensors are "
                "not one row per example); train on text, or use SFTTrainer"
            )
