"""A new selection method in one module: the docs' worked example (docs/api.md, "Adding a
selection method"), run by tests/methods/test_new_method.py.

``selection="largest_update"``: per source, the k examples whose Adam-normalized sketch (the
update the optimizer would make for them alone) is largest in ``ord``-norm, each weighted n / k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from coreset_optim import ChooseContext, SketchedMethod, register_method


def largest_rows(x: torch.Tensor, k: int, ord: float) -> torch.Tensor:
    """The pure step: indices of the ``k`` rows of ``x`` with the largest ``ord``-norm (ties: lowest index)."""
    norms = torch.linalg.vector_norm(x.double(), ord=ord, dim=1)
    return torch.sort(norms, descending=True, stable=True).indices[:k]


@register_method
@dataclass(kw_only=True)
class LargestUpdate(SketchedMethod):
    """Per source, the examples with the largest normalized sketch, weighted n / k."""

    name: ClassVar[str] = "largest_update"
    ord: float = 2.0  # the method's own option, with its default and its check

    def __post_init__(self) -> None:
        super().__post_init__()  # the sketch options' checks
        if isinstance(self.ord, bool) or not isinstance(self.ord, (int, float)) or not self.ord > 0:
            raise ValueError(f"ord must be a number > 0 (2: Euclidean), got {self.ord!r}")

    def choose(self, x: torch.Tensor, k: int, context: ChooseContext) -> tuple[torch.Tensor, None]:
        return largest_rows(x, k, self.ord), None  # None: each weighted n / k
