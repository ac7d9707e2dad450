"""Switching off, for the sketch pass, model features that defeat a backward limited to a few layers.

* Gradient (activation) checkpointing: a checkpointed block re-runs its forward during backward,
  so the sketch hooks would fire twice; with reentrant checkpointing and frozen inputs the block's
  output would not even require grad. Found duck-typed: any module with a boolean
  ``gradient_checkpointing`` attribute set to True (transformers' convention).
* ``enable_input_require_grads()`` (called by peft's ``prepare_model_for_kbit_training`` and by
  ``get_peft_model`` on a checkpointed model): a forward hook that makes the embedding output
  require grad, so autograd keeps every activation of the model for the pass. Found as the hook
  handles transformers stores in ``_require_grads_hooks`` / ``_require_grads_hook``, and as any
  forward hook named ``make_inputs_require_grad(s)`` (transformers' and peft's name: calling
  ``enable_input_require_grads`` twice, as peft does, leaves an untracked first hook).

* bitsandbytes 4-bit layers (QLoRA) on CPU: an eval-mode forward whose input does not require
  grad permanently repacks the weight for a CPU kernel (bitsandbytes 0.50, CPUs with AVX512-BF16),
  after which gradients no longer flow through the layer to earlier layers: training silently
  stops updating every LoRA layer below the last one. The sketch pass freezes those inputs, so it
  keeps ``Linear4bit`` modules in training mode (they have no dropout: same output).

All are restored exactly: the same flags, the same hook functions under the same ids, in order.
The core enters :func:`training_features_off` around every sketch pass through
:mod:`coreset_optim.extensions` (registered when this module is imported, which
``import coreset_optim`` does).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

from torch import nn

from ..extensions import ModelExtension, register_extension

_HOOK_NAMES = ("make_inputs_require_grads", "make_inputs_require_grad")


def _require_grads_hooks(model: nn.Module) -> list[tuple[dict, int]]:
    """``(hooks dict, key)`` of every input-require-grads forward hook in ``model``."""
    tracked = set()
    for module in model.modules():
        found = list(getattr(module, "_require_grads_hooks", None) or [])
        single = getattr(module, "_require_grads_hook", None)
        if single is not None:
            found.append(single)
        tracked.update(h.id for h in found if hasattr(h, "id"))
    hits = []
    for module in model.modules():
        hooks = module._forward_hooks
        for key, fn in hooks.items():
            if key in tracked or getattr(fn, "__name__", "") in _HOOK_NAMES:
                hits.append((hooks, key))
    return hits


def _bnb_4bit_layers(model: nn.Module) -> list[nn.Module]:
    if "bitsandbytes" not in sys.modules:
        return []
    linear4bit = getattr(getattr(sys.modules["bitsandbytes"], "nn", None), "Linear4bit", None)
    if linear4bit is None:
        return []
    return [m for m in model.modules() if isinstance(m, linear4bit)]


@contextlib.contextmanager
def training_features_off(model: nn.Module) -> Iterator[None]:
    """Checkpointing and input-require-grads hooks off, 4-bit layers in training mode; all restored."""
    flagged = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False) is True]
    quantized = [(m, m.training) for m in _bnb_4bit_layers(model)]
    hits = _require_grads_hooks(model)
    saved = []  # (hooks dict, its items before), once per dict
    for hooks, _ in hits:
        if all(hooks is not d for d, _ in saved):
            saved.append((hooks, list(hooks.items())))
    try:
        for m in flagged:
            m.gradient_checkpointing = False
        for hooks, key in hits:
            hooks.pop(key, None)
        for m, _ in quantized:
            m.training = True
        yield
    finally:
        for m in flagged:
            m.gradient_checkpointing = True
        for m, training in quantized:
            m.training = training
        for hooks, items in saved:
            before = dict(items)
            added = [(k, v) for k, v in hooks.items() if k not in before]
            hooks.clear()
            hooks.update(items)
            hooks.update(added)


register_extension(ModelExtension("training_features", sketch_pass=training_features_off))
