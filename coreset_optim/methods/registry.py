"""The registry of selection methods: ``selection="name"`` -> its class; building one from a name,
a preset and the options given (:func:`build_method`, :func:`resolve_options`), or from what a
checkpoint saved (:func:`restore_method`). Presets are data (:mod:`coreset_optim.presets`).

A new method is one module (a :class:`~coreset_optim.methods.base.SelectionMethod` subclass) plus one
line below (or :func:`register_method` from outside the package); see ``docs/api.md``, "Adding a
selection method".
"""

from __future__ import annotations

from typing import Any

from .anchored import AnchoredConsensus
from .baselines import HighestLoss, RandomSubset
from .consensus import ConsensusLoss
from .facility_location import FacilityLocation
from .gradient_matching import GradientMatching
from ..config import CONFIG_OPTIONS, CoresetConfig
from ..presets import DEFAULT_PRESET, FROM_PRESET, PRESETS
from .base import SelectionMethod
from .target import TargetAware
from .trimmed_loss import TrimmedLoss

METHODS: dict[str, type[SelectionMethod]] = {
    "anchored_consensus": AnchoredConsensus,
    "consensus_loss": ConsensusLoss,
    "facility_location": FacilityLocation,
    "gradient_matching": GradientMatching,
    "random": RandomSubset,
    "loss": HighestLoss,
    "trimmed_loss": TrimmedLoss,
    "target": TargetAware,
}


def register_method(cls: type[SelectionMethod]) -> type[SelectionMethod]:
    """Make ``selection=cls.name`` build ``cls`` (usable as a class decorator)."""
    if not (isinstance(cls, type) and issubclass(cls, SelectionMethod)) or not cls.name:
        raise TypeError(f"register_method takes a SelectionMethod subclass with a name, got {cls!r}")
    METHODS[cls.name] = cls
    return cls


def method_class(name: Any) -> type[SelectionMethod]:
    """The class registered as ``name``; ValueError listing the names otherwise."""
    if not isinstance(name, str) or name not in METHODS:
        raise ValueError(f"selection must be a SelectionMethod object or one of {tuple(METHODS)}, got {name!r}")
    return METHODS[name]


def resolve_options(
    selection: Any = FROM_PRESET, preset: str = DEFAULT_PRESET, **options: Any
) -> tuple[CoresetConfig, SelectionMethod]:
    """``CoresetOptimizer``'s options (all but the optimizer, model, sketch modules and process
    group), checked and split: the shared :class:`CoresetConfig`, and the selection method built
    from ``selection``, ``preset`` and the remaining options (:func:`build_method`)."""
    shared = {name: options.pop(name) for name in CONFIG_OPTIONS if name in options}
    config = CoresetConfig(**shared)
    return config, build_method(selection, preset, **options)


def build_method(selection: Any = FROM_PRESET, preset: str = DEFAULT_PRESET, **options: Any) -> SelectionMethod:
    """The selection method: ``selection`` itself when it is a method object (then no options may
    be given: they belong in its constructor), else the registered class of that name (the
    preset's when not given) built from the preset's values for the options it takes, overridden
    by ``options``. An option the method does not take is a TypeError naming the ones it does;
    a preset value the method does not take is left out (e.g. CoLM's sketch for "random")."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {tuple(PRESETS)}, got {preset!r}")
    if isinstance(selection, SelectionMethod):
        if options:
            raise TypeError(
                f"options {sorted(options)} were given beside the method object {type(selection).__name__}; "
                f"pass them to its constructor, e.g. {type(selection).__name__}({next(iter(options))}=...)"
            )
        return selection
    values = PRESETS[preset]
    cls = method_class(values["selection"] if selection is FROM_PRESET else selection)
    accepted = cls.option_names()
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise TypeError(
            f"selection={cls.name!r} takes no option {unknown}; its options are {list(accepted)} "
            "(an option of another method, or a misspelling?)"
        )
    given = {k: v for k, v in values.items() if k in accepted}
    return cls(**{**given, **options})


def restore_method(current: SelectionMethod, name: str, options: dict, state: dict) -> SelectionMethod:
    """The method a checkpoint saved: of ``current``'s class when the name matches (keeping what
    ``current`` holds that checkpoints do not save, e.g. the target batch), else the registered
    class of that name."""
    if name == current.name:
        return current.restored(options, state)
    if name not in METHODS:
        raise ValueError(
            f"the checkpoint was saved with selection {name!r}, which is not registered here; construct "
            f"CoresetOptimizer(selection=<a {name!r} method object>) or register_method(its class) before loading"
        )
    method = METHODS[name](**options)
    method.load_state_dict(state)
    return method
