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
SFT's training metrics computed inside its ``compute_loss`` (``entropy``, ``mean_token_accuracy``,
``num_tokens``) are not logged for training steps, which do not call it; evaluation is SFT's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trl import SFTConfig, SFTTrainer

from .transformers import CoresetArguments, CoresetTrainerMixin, PerExampleLoss

__all__ = ["CoresetSFTConfig", "CoresetSFTTrainer"]


@dataclass
class CoresetSFTConfig(CoresetArguments, SFTConfig):
    """``trl.SFTConfig`` plus the :class:`~coreset_optim.CoresetOptimizer` options (:class:`CoresetArguments`)."""


class CoresetSFTTrainer(CoresetTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` that backpropagates a weighted coreset of every micro-batch.

    ``per_example_loss(model, inputs) -> Tensor[n]`` replaces the default per-example loss (the
    mean NLL of each example's label tokens). Needs :class:`CoresetSFTConfig`. Each selection fires
    ``on_selection`` on the callbacks that define it, as in ``CoresetTrainer``
    (:class:`~coreset_optim.integrations.transformers.CoresetCallback`).
    """

    arguments_class = CoresetSFTConfig

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
