"""Mini-batch coresets for memory-efficient training, as a torch.optim plug-in (CoLM)."""

from .config import CoresetConfig
from .records import Coreset, SourceCount
from .methods.base import SelectionContext, SelectionMethod, SketchedMethod
from .methods.registry import register_method, METHODS
from .optimizer import CoresetOptimizer
from . import integrations  # noqa: F401, E402  (the built-in extensions register themselves)

__all__ = [
    "METHODS",
    "Coreset",
    "CoresetConfig",
    "CoresetOptimizer",
    "SelectionContext",
    "SelectionMethod",
    "SketchedMethod",
    "SourceCount",
    "register_method",
]
__version__ = "0.1.0"
