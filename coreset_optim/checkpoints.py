"""The wrapper's part of a state dict: what ``CoresetOptimizer.state_dict`` adds under
``"coreset_optim"``, and reading it back, including the format written before selection methods
were objects (one flat options dict, the target cache beside it).
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .config import CONFIG_OPTIONS, CoresetConfig

STATE_KEY = "coreset_optim"
VERSION = 2
# Options of the flat format that a method object now holds under another name.
RENAMED = {"target_curvature": "curvature", "target_refresh": "refresh", "target_per_source": "per_source"}


@dataclass
class WrapperState:
    config: CoresetConfig
    method_name: str
    method_options: dict[str, Any]
    method_state: dict[str, Any]
    sketch_modules: list[str]
    num_selections: int
    num_steps: int
    rng_state: torch.Tensor


def wrapper_state(state: WrapperState) -> dict[str, Any]:
    """The ``"coreset_optim"`` entry of a state dict."""
    return {
        "version": VERSION,
        "config": state.config.to_dict(),
        "selection": {"name": state.method_name, "options": state.method_options, "state": state.method_state},
        "sketch_modules": state.sketch_modules,
        "num_selections": state.num_selections,
        "num_steps": state.num_steps,
        "rng_state": state.rng_state,
    }


def read_wrapper_state(own: dict[str, Any], option_names: Callable[[str], Sequence[str]]) -> WrapperState:
    """The entry read back (either format); ValueError when it is neither. ``option_names(name)``:
    the options of the method registered as ``name`` (the flat format of version 1 mixed every
    method's options in one dict)."""
    if not isinstance(own, dict) or "config" not in own or "rng_state" not in own:
        raise ValueError(f"the state dict's {STATE_KEY!r} entry was not written by CoresetOptimizer.state_dict()")
    if own.get("version", 1) == VERSION:
        method = own["selection"]
        return WrapperState(
            CoresetConfig(**own["config"]),
            method["name"],
            dict(method["options"]),
            dict(method["state"]),
            list(own["sketch_modules"]),
            int(own["num_selections"]),
            int(own["num_steps"]),
            own["rng_state"],
        )
    if "version" in own:
        raise ValueError(
            f"the checkpoint's coreset_optim state has version {own['version']}; this coreset_optim "
            f"reads versions 1 and {VERSION}: load it with the coreset_optim that wrote it"
        )
    flat = own["config"]  # version 1: every option in one dict
    name = flat["selection"]
    accepted = option_names(name)
    options = {RENAMED.get(k, k): v for k, v in flat.items() if RENAMED.get(k, k) in accepted}
    cache = own.get("target_cache")
    return WrapperState(
        CoresetConfig(**{k: v for k, v in flat.items() if k in CONFIG_OPTIONS}),
        name,
        options,
        {} if cache is None else {"cache": cache},
        list(own["sketch_modules"]),
        int(own["num_selections"]),
        int(own["num_steps"]),
        own["rng_state"],
    )
