"""CoresetTrainer under `torchrun --nproc_per_node 2` (CPU, gloo): trains, logs global counts."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import distributed_helpers as h

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_coreset_trainer_under_torchrun(tmp_path):
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
        str(h.ROOT / "examples" / "trainer_ddp.py"),
        "--output-dir",
        str(tmp_path),
        "--steps",
        "4",
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "parameters identical on all 2 ranks: True" in out.stdout
    lines = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2, out.stdout  # logging_steps=2, printed by rank 0 only
    for line in lines:
        pairs = re.findall(r"(\w+) (\d+)/(\d+)", line.split(":", 1)[1])
        # two selections per logging window, each from the global batch of 2 x 16 = 32, choosing 8
        assert sum(int(total) for _, _, total in pairs) == 2 * 32
        assert sum(int(sel) for _, sel, _ in pairs) == 2 * 8
