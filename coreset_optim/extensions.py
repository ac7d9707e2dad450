"""What integrations plug into the core: model-specific answers the core asks for by role, not by library.

The core knows models only as ``nn.Module`` s of Linear layers. Some libraries change what the
right answer is (peft's LoRA layers: which Linear to sketch by default, which ones cannot be
sketched; transformers' gradient checkpointing: what must be off during a sketch pass). Such a
library's integration registers a :class:`ModelExtension` here when it is imported; the core
asks every registered extension, in registration order, and never imports an integration.

The package root (``coreset_optim/__init__.py``) imports the built-in integrations that need no
third-party library to be imported (``integrations.peft``, ``integrations.training_features``), so
their extensions are registered as soon as ``coreset_optim`` is. Each one does nothing unless its
library is already loaded (``"peft" in sys.modules``): a model can only hold peft layers when
peft is loaded, so nothing is imported to find out.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ContextManager, Optional

from torch import nn

# (model, ids of the parameters the optimizer trains) -> module names, or None: "not my kind of model".
DefaultSketchModules = Callable[[nn.Module, "set[int]"], Optional[list[str]]]
# (model, names of the chosen sketch modules) -> None; raises ValueError to refuse a choice.
CheckSketchLayers = Callable[[nn.Module, Sequence[str]], None]
# model -> a context entered around every sketch pass (features switched off, restored on exit).
SketchPass = Callable[[nn.Module], ContextManager[None]]
# model -> a context in which the model computes its reference (the base: adapters off), or None:
# "no reference for this model".
ReferencePass = Callable[[nn.Module], Optional[ContextManager[None]]]


@dataclass(frozen=True)
class ModelExtension:
    """One integration's answers; every field is optional."""

    name: str
    default_sketch_modules: DefaultSketchModules | None = None
    check_sketch_layers: CheckSketchLayers | None = None
    sketch_pass: SketchPass | None = None
    reference_pass: ReferencePass | None = None


EXTENSIONS: dict[str, ModelExtension] = {}


def register_extension(extension: ModelExtension) -> ModelExtension:
    """Add ``extension`` (or replace the one of the same name, keeping its place)."""
    if not isinstance(extension, ModelExtension):
        raise TypeError(f"extension must be a ModelExtension, got {type(extension).__name__}")
    EXTENSIONS[extension.name] = extension
    return extension


def extension_default_sketch_modules(model: nn.Module, trained: set[int]) -> list[str] | None:
    """The first registered extension's default sketch modules for ``model``, or None."""
    for ext in list(EXTENSIONS.values()):
        if ext.default_sketch_modules is not None:
            names = ext.default_sketch_modules(model, trained)
            if names is not None:
                return names
    return None


def check_sketch_layers(model: nn.Module, layer_names: Sequence[str]) -> None:
    """Every registered extension's check of the chosen sketch modules (ValueError to refuse)."""
    for ext in list(EXTENSIONS.values()):
        if ext.check_sketch_layers is not None:
            ext.check_sketch_layers(model, layer_names)


@contextlib.contextmanager
def sketch_pass_contexts(model: nn.Module) -> Iterator[None]:
    """Every registered extension's sketch-pass context, entered in order, exited in reverse."""
    with contextlib.ExitStack() as stack:
        for ext in list(EXTENSIONS.values()):
            if ext.sketch_pass is not None:
                stack.enter_context(ext.sketch_pass(model))
        yield


def reference_pass_context(model: nn.Module) -> ContextManager[None] | None:
    """The first registered extension's reference context for ``model`` (e.g. peft's adapters
    switched off), or None when no extension has a reference for it."""
    for ext in list(EXTENSIONS.values()):
        if ext.reference_pass is not None:
            context = ext.reference_pass(model)
            if context is not None:
                return context
    return None
