"""The README's demo runs end to end and prints per-source counts, a table and a plot."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_demo_runs(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
        # the comparison, shortened; its plots go to a temporary folder, not the user's demo_output/
        env={**os.environ, "DEMO_STEPS": "10", "DEMO_OUTPUT": str(tmp_path)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "per source (selected/in batch)" in out.stdout
    assert "coreset k of B (default)" in out.stdout and "balanced random k" in out.stdout
    assert "plot saved to" in out.stdout and "finetune_noisy.png" in out.stdout
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["finetune.png", "finetune_noisy.png"]
    assert "Part 3" in out.stdout and "highest loss (selection='loss')" in out.stdout
    assert "suspects (gradient against their source's)" in out.stdout
