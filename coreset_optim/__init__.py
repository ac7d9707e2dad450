"""Mini-batch coresets for memory-efficient training, as a torch.optim plug-in (CoLM)."""

from .config import CoresetConfig
from .coreset import Coreset, SourceCount
from .method import SelectionContext, SelectionMethod, SketchedMethod
from .methods import METHODS, register_method
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
