"""The default's base-model reference with a weaker base: does its noise gate stay shut on clean data,
and does it still bound the worst case?

The noise gate (``AnchoredConsensus.noise_gate`` = 0.4) was chosen with the committed base, which
knows most of the fine-tuning tasks (``coreset_optim/datasets/base_model.py``: 2,500 pretraining
steps). Here the same base is pretrained for fewer steps (``--pretrain-steps``, deterministic in its
seed) and the fine-tuning benchmark's arms (``noise_bound.py``'s: the default, the in-batch rule, random
and stratified random k) are trained from it on clean data, at 40 % random tokens and at 50 % of
another task's answers, on the confirming seeds. Each run also records the default's running
share of implausible rows (``implausible_share``) after every selection and whether the gate was open.

    PYTHONPATH=. python benchmarks/reference_base.py --pretrain-steps 500 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lib.finetune as finetune  # noqa: E402
import noise_bound  # noqa: E402
from lib.results import md_header, results_dir, stamped  # noqa: E402
from lib.summary import mean_sd_text  # noqa: E402
from lib.training import BatchStream, train  # noqa: E402

RESULTS = results_dir("reference_base")
ARMS = ["default", "gate_implausible_40", "in_batch", "random_k", "stratified_k", "gate_always_open"]
# the reference without its gate (noise_gate=0: open from the first selection), to tell a weak
# reference from a gate that does not open
EXTRA_ARMS = {"gate_always_open": finetune.Arm("coreset", {"noise_gate": 0.0})}
CONFIGS = ["clean", "random tokens 40 %", "another task's 50 %"]
SEEDS = [3, 4, 5]
NOISE_SEED = 1
# --phase choose: the fourth round's candidates on the choosing seeds and noise (noise_bound.py's)
CHOOSE = {
    "seeds": [0, 1],
    "noise_seed": 0,
    "arms": ["gate_implausible_40", "random_k", "stratified_k", "bound_gate_both_15", "bound_gate_both_18"],
}


def _use_base(path: str) -> None:
    """Worker initializer: every trainer of this process starts from the base saved at ``path``."""
    from coreset_optim.datasets.base_model import load_base

    finetune.load_base = lambda: load_base(Path(path))


def run_one(job: tuple[str, int, str, int]) -> dict:
    """``noise_bound.run_one`` on the weaker base, with the gate's running share per selection."""
    name, seed, config, noise_seed = job
    torch.set_num_threads(1)
    steps, every = noise_bound.STEPS.get(name, (150, 150))
    args = noise_bound.run_args(config, noise_seed, steps, every)
    ctx = finetune.build_context(args)
    trainer = finetune.make_trainer({**noise_bound.ALL_ARMS, **EXTRA_ARMS}[name], seed, ctx)
    shares: list = []
    if trainer.wrapper is not None:
        method = trainer.wrapper.selection
        shares_of = lambda big, coreset: shares.append(  # noqa: E731
            [getattr(method, "implausible_share", None), bool(getattr(method, "gate_open", False))]
        )
        trainer.on_select = shares_of
    start = time.time()
    curve, _ = train(
        trainer,
        BatchStream(ctx.mixture.train, seed + 1),
        steps,
        args.batch,
        lambda m: finetune.evaluate(m, ctx.mixture),
        every,
    )
    keep = ("step", "accuracy_mixture", "accuracy_macro", "loss_mixture")
    return {
        "arm": name,
        "seed": seed,
        "config": config,
        "noise_seed": noise_seed,
        "curve": [{k: p[k] for k in keep if k in p} for p in curve],
        "gate": shares,
        "seconds": time.time() - start,
    }


def report(runs: list[dict], pretrain_steps: int) -> None:
    by = {(r["arm"], r["config"], r["seed"]): r for r in runs}

    def at150(r: dict) -> float:
        return next(p for p in r["curve"] if p["step"] == 150)["accuracy_mixture"]

    out = [
        md_header(stamped({}, "reference_base")["produced_by"]),
        "# The base-model reference with a weaker base (`benchmarks/reference_base.py`)",
        "",
        f"The committed base's architecture and pretraining data, pretrained for {pretrain_steps} steps instead "
        "of 2,500 (seed 0); the fine-tuning benchmark's set-up otherwise (`noise_bound.py`: LoRA, B = 64, k = 16, "
        f"150 steps), seeds {SEEDS}, noise seed {NOISE_SEED}. Mixture accuracy at 150 steps, mean ± sd; the "
        "running share each gate reads (`implausible_share`: the default's counts the rows both the base model and "
        "the batch call wrong, gate at 0.18; round three's every row the base finds implausible, gate at 0.40) over "
        "the selections, and the share of selections with the gate open.",
        "",
        "| training data | default | round three's default (gate on the implausible share, 0.40) | in-batch rule "
        "| random k | stratified k | the gate always open | default: running share, min-max after step 10 "
        "| gate open | round three's: running share | gate open |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for config in CONFIGS:
        cells = [mean_sd_text([at150(by[(a, config, s)]) for s in SEEDS if (a, config, s) in by]) for a in ARMS]
        gate_cells = []
        for arm in ("default", "gate_implausible_40"):
            gates = [by[(arm, config, s)]["gate"] for s in SEEDS if (arm, config, s) in by]
            values = [v for g in gates for v, _ in g[10:] if v is not None]
            opened = [o for g in gates for _, o in g]
            gate_cells.append(f"{min(values):.2f}-{max(values):.2f}" if values else "n/a")
            gate_cells.append(f"{statistics.mean(opened):.0%}" if opened else "n/a")
        out.append(f"| {config} | " + " | ".join(cells + gate_cells) + " |")
    (RESULTS / "reference_base.md").write_text("\n".join(out) + "\n")
    print("\n".join(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pretrain-steps", type=int, default=500)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="only write the report from runs.jsonl")
    ap.add_argument("--phase", choices=["confirm", "choose"], default="confirm")
    a = ap.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    choosing = a.phase == "choose"
    path = RESULTS / ("choose.jsonl" if choosing else "runs.jsonl")
    seeds, noise_seed, arms = (
        (CHOOSE["seeds"], CHOOSE["noise_seed"], CHOOSE["arms"]) if choosing else (SEEDS, NOISE_SEED, ARMS)
    )
    if not a.report:
        from coreset_optim.datasets.base_model import pretrain, save_base

        torch.set_num_threads(1)
        base_dir = Path("/tmp") / f"coreset_optim_base_{a.pretrain_steps}"
        if not (base_dir / "config.json").exists():
            save_base(pretrain(steps=a.pretrain_steps, warmup=min(100, a.pretrain_steps // 5)), base_dir)
        done = {(r["arm"], r["seed"], r["config"]) for r in map(json.loads, path.open())} if path.exists() else set()
        todo = [(arm, s, c, noise_seed) for s in seeds for c in CONFIGS for arm in arms if (arm, s, c) not in done]
        with ProcessPoolExecutor(a.jobs, initializer=_use_base, initargs=(str(base_dir),)) as pool:
            for result in pool.map(run_one, todo):
                with path.open("a") as f:
                    f.write(json.dumps(result) + "\n")
                print(
                    f"  {result['arm']} seed {result['seed']} {result['config']}: {result['seconds']:.0f} s", flush=True
                )
    if not choosing:
        report([json.loads(line) for line in path.open()], a.pretrain_steps)


if __name__ == "__main__":
    main()
