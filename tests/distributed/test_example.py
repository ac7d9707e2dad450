"""examples/distributed_train.py under torchrun (2 CPU processes) with Accelerate."""

from __future__ import annotations

import re

import pytest
import torch

import distributed_helpers as h

pytest.importorskip("accelerate")


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_accelerate_example_trains_with_global_counts():
    out = h.torchrun(h.ROOT / "examples" / "distributed_train.py", "--accelerate", "--steps", "6", timeout=180)
    lines = [line for line in out.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 2, out.stdout  # rank 0 only, steps 0 and 5
    for line in lines:
        assert "global batch 64" in line
        counts = re.findall(r"'(\w+)': '(\d+)/(\d+)'", line)
        assert sum(int(s) for _, s, _ in counts) == 16 and sum(int(n) for _, _, n in counts) == 64
