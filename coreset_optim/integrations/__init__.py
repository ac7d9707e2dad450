"""Bridges to PEFT, bitsandbytes, the Hugging Face Trainer and TRL.

Each submodule imports its library only when used, so ``import coreset_optim`` needs only torch.
Arrows run from here to the core, never back: ``peft`` and ``training_features`` plug into the core
through :mod:`coreset_optim.extensions`, and are imported here (they import no third-party library)
so that ``import coreset_optim`` registers them.
"""

from . import peft, training_features  # noqa: F401  (registers their ModelExtensions)
