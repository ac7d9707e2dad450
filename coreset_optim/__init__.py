"""Mini-batch coresets for memory-efficient training, as a torch.optim plug-in (CoLM)."""

from .config import CoresetConfig
from .coreset import Coreset, SourceCount
from .optimizer import CoresetOptimizer
from . import integrations  # noqa: F401, E402  (the built-in extensions register themselves)

__all__ = ["Coreset", "CoresetConfig", "CoresetOptimizer", "SourceCount"]
__version__ = "0.1.0"
