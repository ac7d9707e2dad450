"""benchmarks/finite_data.py --quick end to end (a 128-row set with duplicates and label noise, every
arm, two epochs; seconds), run as a script in a subprocess (tests import nothing from benchmarks/):
the runs, costs, report and curves it writes, and the report's tables."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "finite_data.py"
ARMS = ["default", "random_k", "stratified_k", "accum_B", "accum_then_default"]


def test_quick_grid_writes_runs_costs_and_a_report(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--results", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "costs.json",
        "finite_data.md",
        "finite_data.png",
        "runs.jsonl",
    ]
    runs = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["arm"] for r in runs) == sorted(ARMS)
    for run in runs:
        assert run["rows"] == 128 and run["steps_per_epoch"] == 8
        assert run["curve"][0]["step"] == 0 and run["curve"][-1]["step"] == run["steps"]
    default = next(r for r in runs if r["arm"] == "default")
    report = default["selection_report"]
    assert 0 < report["batch_duplicate_share"] < 1 and 0 <= report["selected_corrupted_share"] <= 1
    costs = json.loads((tmp_path / "costs.json").read_text())
    assert set(costs["seconds_per_step"]["quick"]) == {"default", "random_k", "stratified_k", "accum_B"}
    assert costs["produced_by"]["script"] == "benchmarks/finite_data.py"
    md = (tmp_path / "finite_data.md").read_text()
    for heading in ("### Equal steps", "### Equal wall-clock", "### Equal FLOPs", "Default minus accumulated B"):
        assert heading in md
