"""Bit for bit the coresets and gradients of the code before the selection methods became objects.

The reference (``tests/data/selection_grid_reference.pt``) was written by
``benchmarks/equivalence.py`` at the commit it names; the grid is ``tests/selection_grid.py``.
"""

from pathlib import Path

import pytest
import torch

from selection_grid import GRID, run_one

REFERENCE = torch.load(Path(__file__).parent / "data" / "selection_grid_reference.pt", weights_only=False)


def test_reference_covers_the_grid():
    assert REFERENCE["grid"] == GRID


@pytest.mark.parametrize("name", sorted(GRID))
def test_same_coresets_and_gradients_as_the_reference(name):
    got, want = run_one(GRID[name]), REFERENCE["results"][name]
    assert sorted(got) == sorted(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=lambda m, key=key: f"{name} {key}: {m}")
