"""benchmarks/finetune.py end to end on a tiny pool, clean and with label noise (seconds): result files,
the noise record, and every method's batches keeping their pool index aligned with their rows."""

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
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


@pytest.fixture(scope="module")
def ft():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import finetune

    return finetune


@pytest.mark.parametrize("noise, name", [([], "finetune"), (NOISY, "finetune_noise-random_tokens-0.2")])
def test_tiny_benchmark_writes_results_named_by_noise(ft, tmp_path, monkeypatch, noise, name):
    monkeypatch.setattr(ft, "RESULTS", tmp_path)
    ft.main(TINY + ["--methods", "random_k,default"] + noise)
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


def test_noise_is_in_the_pool_only_and_the_mask_matches(ft):
    clean = ft.build_context(ft.parse_args(TINY))
    noisy = ft.build_context(ft.parse_args(TINY + NOISY))
    assert clean.corrupted is None and noisy.corrupted.sum() > 0
    changed = (clean.mixture.train["labels"] != noisy.mixture.train["labels"]).any(1)
    assert torch.equal(changed, noisy.corrupted)
    assert torch.equal(noisy.mixture.train["index"], torch.arange(300))
    for name, data in clean.mixture.eval.items():
        assert torch.equal(noisy.mixture.eval[name]["labels"], data["labels"])
    assert torch.equal(noisy.target["labels"], clean.target["labels"])


@pytest.mark.parametrize(
    "method",
    [
        "random_k",
        "balanced_k",
        "skills_k",
        "accum_B",
        "batch_B",
        "stratified_k",
        "default",
        "gradient_matching",
        "fl_l1",
        "target",
    ],
)
def test_every_method_slices_the_index_with_the_rows(ft, method):
    """Each sub-batch a method's loss sees (whatever it selected) still has each row's pool index."""
    ctx = ft.build_context(ft.parse_args(TINY + NOISY))
    ft.register_finetune_experiments()
    trainer = ft.Trainer(method, 0, ctx)
    pool, inner, seen = ctx.mixture.train, trainer.loss_fn, []

    def checked(batch):
        if "index" not in batch:  # (chunks of) the target split of selection="target": not pool rows
            target_rows = {tuple(r) for r in ctx.target["input_ids"].tolist()}
            assert method == "target" and all(tuple(r) in target_rows for r in batch["input_ids"].tolist())
            return inner(batch)
        assert torch.equal(pool["input_ids"][batch["index"]], batch["input_ids"])
        assert torch.equal(pool["labels"][batch["index"]], batch["labels"])
        seen.append(batch["index"])
        return inner(batch)

    trainer.loss_fn = checked
    trainer.step(ft.BatchStream(pool, 1).next(16))
    assert seen


def test_noise_options_are_checked_and_named(ft):
    with pytest.raises(SystemExit):
        ft.parse_args(TINY + ["--noise-rate", "0.2"])  # no --noise
    with pytest.raises(SystemExit):
        ft.parse_args(TINY + ["--noise", "random_tokens", "--noise-rate", "1.0"])
    with pytest.raises(SystemExit):
        ft.parse_args(TINY + ["--noise", "flip"])
    args = ft.parse_args(
        ["--noise", "other_task", "--noise-rate", "0.1", "--noise-placement", "concentrated", "--noise-seed", "3"]
    )
    assert args.out == "finetune_noise-other_task-0.1-concentrated-seed3"
    assert ft.parse_args(["--noise", "swap_within_source"]).out == "finetune_noise-swap_within_source-0.2"
    assert ft.parse_args([]).out == "finetune"
