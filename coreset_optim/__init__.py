"""Mini-batch coresets for memory-efficient training, as a torch.optim plug-in (CoLM).

``CoresetOptimizer`` wraps a torch optimizer; its ``select(batch, loss_fn)`` chooses a weighted
coreset of the batch with a selection method (``methods/``) and backpropagates only that.
"""

from .config import CoresetConfig
from .methods.anchored import AnchoredConsensus
from .methods.base import SelectionContext, SelectionMethod, SketchedMethod
from .methods.baselines import HighestLoss, RandomSubset
from .methods.consensus import ConsensusLoss
from .methods.facility_location import FacilityLocation
from .methods.gradient_matching import GradientMatching
from .methods.registry import METHODS, register_method
from .methods.target import TargetAware
from .methods.trimmed_loss import TrimmedLoss
from .optimizer import CoresetOptimizer
from .records import ChooseContext, Coreset, SourceCount
from . import integrations  # noqa: F401, E402  (the built-in extensions register themselves)

__all__ = [
    "METHODS",
    "AnchoredConsensus",
    "ChooseContext",
    "ConsensusLoss",
    "Coreset",
    "CoresetConfig",
    "CoresetOptimizer",
    "FacilityLocation",
    "GradientMatching",
    "HighestLoss",
    "RandomSubset",
    "SelectionContext",
    "SelectionMethod",
    "SketchedMethod",
    "SourceCount",
    "TargetAware",
    "TrimmedLoss",
    "register_method",
]
__version__ = "0.1.0"
