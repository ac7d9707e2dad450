"""benchmarks/finetune.py end to end on a tiny pool, clean and with label noise (seconds), run as a
script in a subprocess (tests import nothing from benchmarks/): result files, the noise record,
its set-up checks (``--check``: the noise is in the pool only, every method's batches keep their
pool index aligned with their rows) and the checks of its noise options."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "finetune.py"
TINY = [
    "--pool",
    "300",
    "--eval-size",
    "8",
    "--target-size",
    "4",
    "--batch",
    "16",
    "--k",
    "4",
    "--steps",
    "2",
    "--eval-every",
    "1",
    "--seeds",
    "0",
    "--cost-rounds",
    "1",
    "--jobs",
    "1",
    "--no-equal-time",
]
NOISY = ["--noise", "random_tokens", "--noise-rate", "0.2"]
EVERY_KIND = "random_k,balanced_k,skills_k,accum_B,batch_B,stratified_k,default,gradient_matching,fl_l1,target"


def finetune(*argv: str) -> subprocess.CompletedProcess:
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(
        [sys.executable, str(SCRIPT), *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.parametrize("noise, name", [([], "finetune"), (NOISY, "finetune_noise-random_tokens-0.2")])
def test_tiny_benchmark_writes_results_named_by_noise(tmp_path, noise, name):
    proc = finetune(*TINY, "--methods", "random_k,default", "--results", str(tmp_path), *noise)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.{ext}" for ext in ("json", "md", "png")]
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert set(data["summary"]["methods"]) == {"random_k", "default"}
    md = (tmp_path / f"{name}.md").read_text()
    if not noise:
        assert data["noise"] is None and "noise" not in md.lower()
        return
    record = data["noise"]
    assert {k: record[k] for k in ("model", "rate", "placement", "seed")} == {
        "model": "random_tokens",
        "rate": 0.2,
        "placement": "per_source",
        "seed": 0,
    }
    assert record["pool"] == 300 and record["corrupted"] == sum(record["corrupted_per_source"].values())
    assert record["corrupted"] == pytest.approx(60, abs=4)  # per-source rounding
    assert "Label noise in the training pool only" in md and "label noise random_tokens 0.2" in md


@pytest.mark.parametrize(
    "noise, name",
    [
        (NOISY, "finetune_noise-random_tokens-0.2"),
        (
            ["--noise", "other_task", "--noise-rate", "0.1", "--noise-placement", "concentrated", "--noise-seed", "3"],
            "finetune_noise-other_task-0.1-concentrated-seed3",
        ),
    ],
)
def test_noise_is_in_the_pool_only_and_every_method_keeps_the_index_with_the_rows(noise, name):
    """``--check``: the noise changes pool rows only and the mask marks exactly them (evaluation and
    target clean); each sub-batch every method's loss sees (whatever it selected) still has each
    row's pool index."""
    proc = finetune(*TINY, *noise, "--methods", EVERY_KIND, "--check")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert f"results name: {name}" in lines
    assert any(line.startswith("label noise: ") for line in lines)
    for method in EVERY_KIND.split(","):
        assert any(line.startswith(f"{method}: ") for line in lines), method


@pytest.mark.parametrize(
    "options, message",
    [
        (["--noise-rate", "0.2"], "need --noise MODEL"),  # no --noise
        (["--noise", "random_tokens", "--noise-rate", "1.0"], "rate"),
        (["--noise", "flip"], "invalid choice"),
    ],
)
def test_noise_options_are_checked(options, message):
    proc = finetune(*options, "--check")
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-3000:]
