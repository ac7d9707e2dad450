"""Sketch layers for PEFT LoRA models: which ``lora_A`` / ``lora_B`` layers to sketch.

CoLM sketches the LoRA-B matrix of the last layer's ``v_proj``; that is the default here for any
model holding peft ``LoraLayer`` s (a ``PeftModel`` or a model with injected adapters), for every
active adapter. peft is never imported by this module: a model can only hold LoRA layers when peft
is already loaded, so the check is ``"peft" in sys.modules``. The default and the variant check
reach the core through :mod:`coreset_optim.extensions` (registered when this module is imported,
which ``import coreset_optim`` does).

LoRA variants (DoRA, ...) change the layer's forward so that ``lora_B``'s gradient no longer comes
only from its own call; their sketches would be wrong, so they are refused.

The base model is the reference of ``AnchoredConsensus`` (:mod:`coreset_optim.methods.reference`):
:func:`adapters_off` switches every LoRA layer's adapters off for one pass and restores them.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator, Sequence

from torch import nn

from ..extensions import ModelExtension, register_extension

_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks|block)\.(\d+)(?:\.|$)")


def _lora_layer_class():
    if "peft" not in sys.modules:
        return None
    from peft.tuners.lora import LoraLayer

    return LoraLayer


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every peft ``LoraLayer`` in ``model``, in ``named_modules()`` order."""
    cls = _lora_layer_class()
    if cls is None:
        return []
    return [(n, m) for n, m in model.named_modules() if isinstance(m, cls)]


def is_lora_model(model: nn.Module) -> bool:
    """Whether ``model`` holds peft LoRA layers (without importing peft when it is not loaded)."""
    return bool(lora_layers(model))


def _active_adapters(layer: nn.Module) -> list[str]:
    active = getattr(layer, "active_adapters", None)
    if active is None:
        active = getattr(layer, "active_adapter", [])
    if isinstance(active, str):
        active = [active]
    return [a for a in active if a in layer.lora_A and a in layer.lora_B]


def _layer_index(name: str) -> int | None:
    """The transformer block index in a module name (``...layers.3.self_attn...`` -> 3)."""
    found = _LAYER_INDEX.findall(name)
    return int(found[-1]) if found else None


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _variant_of(layer: nn.Module, adapter: str) -> str | None:
    """The LoRA variant (e.g. DoRA) an adapter of ``layer`` uses, or None for plain LoRA."""
    if (getattr(layer, "use_dora", None) or {}).get(adapter, False):
        return "DoRA"
    variants = getattr(layer, "lora_variant", None) or {}
    if adapter in variants:
        return type(variants[adapter]).__name__
    return None


def lora_sketch_modules(
    model: nn.Module,
    modules: Sequence[str] | None = ("v_proj",),
    layers: Sequence[int] | None = (-1,),
    factors: Sequence[str] = ("B",),
    adapters: Sequence[str] | None = None,
) -> list[str]:
    """Names of LoRA factor layers, usable as ``CoresetOptimizer(sketch_modules=...)``.

    ``modules``: the wrapped layers' last names (``"v_proj"``, ``"c_attn"``, ...); None: all.
    ``layers``: block indices (negative counts from the last block); None: all blocks.
    ``factors``: ``"A"`` and/or ``"B"``. ``adapters``: adapter names; None: the active ones.
    Raises ValueError, listing what exists, when nothing matches.
    """
    bad = [f for f in factors if f not in ("A", "B")]
    if bad or not factors:
        raise ValueError(f"factors must be a non-empty subset of ('A', 'B'), got {tuple(factors)!r}")
    found = lora_layers(model)
    if not found:
        raise ValueError(
            "lora_sketch_modules: the model holds no peft LoRA layer; wrap it with "
            "peft.get_peft_model(model, LoraConfig(...)) or name Linear layers directly"
        )
    candidates = [(n, m) for n, m in found if modules is None or _leaf(n) in modules]
    if not candidates:
        names = sorted({_leaf(n) for n, _ in found})
        raise ValueError(f"lora_sketch_modules: no LoRA layer wraps any of {list(modules)}; LoRA wraps {names}")
    if layers is not None:
        blocks = sorted({i for i in (_layer_index(n) for n, _ in candidates) if i is not None})
        if not blocks:
            raise ValueError(
                "lora_sketch_modules: cannot tell the block index of the LoRA layers "
                f"({candidates[0][0]!r}, ...); pass layers=None"
            )
        num_blocks = max(blocks) + 1
        wanted = set()
        for i in layers:
            j = i + num_blocks if i < 0 else i
            if not 0 <= j < num_blocks:
                raise ValueError(f"lora_sketch_modules: layer {i} is out of range for {num_blocks} blocks")
            wanted.add(j)
        candidates = [(n, m) for n, m in candidates if _layer_index(n) in wanted]
        if not candidates:
            raise ValueError(
                f"lora_sketch_modules: no LoRA layer on {list(modules or ['*'])} in blocks "
                f"{sorted(wanted)}; blocks with LoRA: {blocks}"
            )
    names = []
    for name, layer in candidates:
        chosen = _active_adapters(layer) if adapters is None else [a for a in adapters if a in layer.lora_A]
        for adapter in chosen:
            for factor in factors:
                names.append(f"{name}.lora_{factor}.{adapter}")
    if not names:
        raise ValueError(
            f"lora_sketch_modules: none of the adapters {list(adapters or ['<active>'])} is on the "
            "matching layers; check model.active_adapters"
        )
    return names


def default_lora_sketch_modules(model: nn.Module, trained: set[int]) -> list[str] | None:
    """CoLM's default for a LoRA model, or None when ``model`` has no LoRA layer.

    The ``lora_B`` of the last block's ``v_proj`` for each active adapter; without a ``v_proj``,
    the last LoRA layer's ``lora_B``. Only layers whose weight the optimizer trains count.
    """
    found = lora_layers(model)
    if not found:
        return None

    def trained_b(name: str, layer: nn.Module) -> list[str]:
        return [f"{name}.lora_B.{a}" for a in _active_adapters(layer) if id(layer.lora_B[a].weight) in trained]

    v_layers = [(n, m) for n, m in found if _leaf(n) == "v_proj" and trained_b(n, m)]
    if v_layers:
        last_block = max((_layer_index(n) for n, _ in v_layers), key=lambda i: -1 if i is None else i)
        picked = [(n, m) for n, m in v_layers if _layer_index(n) == last_block][-1:]
    else:
        picked = [(n, m) for n, m in found if trained_b(n, m)][-1:]
    if not picked:
        raise ValueError(
            "the model has LoRA layers but the optimizer trains none of their active adapters' "
            "lora_B weights; pass sketch_modules=[...] naming a trained Linear layer"
        )
    return trained_b(*picked[0])


def check_lora_layers(model: nn.Module, layer_names: Sequence[str]) -> None:
    """Refuse sketch layers inside a LoRA layer whose adapter uses a variant such as DoRA."""
    for name, layer in lora_layers(model):
        for adapter in list(layer.lora_A):
            variant = _variant_of(layer, adapter)
            if variant is None:
                continue
            inside = (f"{name}.lora_A.{adapter}", f"{name}.lora_B.{adapter}")
            hit = [t for t in layer_names if t in inside]
            if hit:
                raise ValueError(
                    f"sketch_modules: {hit[0]!r} belongs to adapter {adapter!r}, which uses the LoRA "
                    f"variant {variant} (e.g. use_dora=True). Its lora_B gradient also flows through "
                    "the weight-norm term, which per-example hooks cannot see, so its sketches would "
                    "be wrong. Train plain LoRA, or sketch a Linear layer without a variant"
                )


@contextlib.contextmanager
def _switched_off(layers: list[nn.Module]) -> Iterator[None]:
    # peft's enable_adapters(False/True) also sets requires_grad on the adapter weights: the flags
    # are put back exactly as they were (a weight the user froze stays frozen).
    flags = [(p, p.requires_grad) for layer in layers for p in layer.parameters()]
    try:
        for layer in layers:
            layer.enable_adapters(False)
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


def adapters_off(model: nn.Module) -> contextlib.AbstractContextManager[None] | None:
    """A context in which ``model``'s LoRA layers compute the base model (their adapters off), or
    None when there is no such reference: no LoRA layer, an adapter merged into the base weights
    (the base is gone), or every adapter already off."""
    layers = [layer for _, layer in lora_layers(model)]
    if not layers or any(getattr(layer, "merged", False) for layer in layers):
        return None
    enabled = [layer for layer in layers if not layer.disable_adapters]
    return _switched_off(enabled) if enabled else None


register_extension(
    ModelExtension(
        "peft",
        default_sketch_modules=default_lora_sketch_modules,
        check_sketch_layers=check_lora_layers,
        reference_pass=adapters_off,
    )
)
