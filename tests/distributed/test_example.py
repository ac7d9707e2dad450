"""examples/distributed_train.py under torchrun (2 CPU processes) with Accelerate."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import distributed_helpers as h

pytest.importorskip("accelerate")


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_accelerate_example_trains_with_global_counts():
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(h.ROOT), os.environ.get("PYTHONPATH", "")])
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(h.ROOT / "examples" / "distributed_train.py"),
        "--accelerate",
        "--steps",
        "6",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("step")]
    assert len(lines) == 2, out.stdout  # rank 0 only, steps 0 and 5
    for line in lines:
        assert "global batch 64" in line
        counts = re.findall(r"'(\w+)': '(\d+)/(\d+)'", line)
        assert sum(int(s) for _, s, _ in counts) == 16 and sum(int(n) for _, _, n in counts) == 64
