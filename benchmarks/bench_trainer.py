"""Seconds per optimizer step: stock Trainer vs CoresetTrainer, side by side in one process.

Tiny random-init Llama + LoRA (r=8 on q, v), CPU, one thread (the machine is shared). Three
configurations, interleaved over rounds so load changes hit them alike:

* ``trainer_B``: the stock Trainer on the large batch B (what the coreset approximates);
* ``trainer_k``: the stock Trainer on a batch of k (same backward size as the coreset);
* ``coreset_B_to_k``: CoresetTrainer selecting k of B (sketch pass in chunks of k, the default);
* ``coreset_B_to_k_sketch_B``: the same with the sketch pass in one chunk of B.

Writes benchmarks/results/bench_trainer/trainer_step.{json,md,png}. Run: python benchmarks/bench_trainer.py
"""

from __future__ import annotations

import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lib.models import llama, with_lora  # noqa: E402
from lib.results import md_header, results_dir, save_json  # noqa: E402

from coreset_optim.integrations.transformers import CoresetTrainer, CoresetTrainingArguments  # noqa: E402

B, K, T, STEPS, WARMUP, ROUNDS = 32, 8, 64, 6, 2, 3
OUT = results_dir("bench_trainer")


class Rows(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        start, step = torch.randint(0, 32, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
        self.ids = ((start + step * torch.arange(T)) % 32).tolist()

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": [1] * T, "labels": self.ids[i]}


class StepTimer(TrainerCallback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_step_begin(self, *args, **kwargs):
        self.t0 = time.perf_counter()

    def on_step_end(self, *args, **kwargs):
        self.times.append(time.perf_counter() - self.t0)


def model() -> torch.nn.Module:
    return with_lora(llama(256, 128, 2, 4, 2, 256), 8, ["q_proj", "v_proj"], lora_dropout=0.0)


def run(kind: str, out: str) -> list[float]:
    common = dict(
        output_dir=out,
        max_steps=STEPS + WARMUP,
        learning_rate=1e-3,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=1000,
        disable_tqdm=True,
    )
    timer = StepTimer()
    if kind.startswith("coreset"):
        chunk = B if kind.endswith("sketch_B") else None
        args = CoresetTrainingArguments(
            per_device_train_batch_size=B, coreset_size=K, sketch_batch_size=chunk, **common
        )
        trainer = CoresetTrainer(model=model(), args=args, train_dataset=Rows(B * (STEPS + WARMUP)), callbacks=[timer])
    else:
        size = B if kind == "trainer_B" else K
        args = TrainingArguments(per_device_train_batch_size=size, **common)
        trainer = Trainer(model=model(), args=args, train_dataset=Rows(size * (STEPS + WARMUP)), callbacks=[timer])
    trainer.train()
    return timer.times[WARMUP:]


def main() -> None:
    torch.set_num_threads(1)
    kinds = ["trainer_B", "trainer_k", "coreset_B_to_k", "coreset_B_to_k_sketch_B"]
    times: dict[str, list[float]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(ROUNDS):
            for kind in kinds:
                times[kind] += run(kind, out)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = save_json(
        OUT / "trainer_step.json",
        {
            "setup": dict(
                B=B,
                k=K,
                tokens=T,
                hidden=128,
                layers=2,
                lora_r=8,
                steps_per_round=STEPS,
                rounds=ROUNDS,
                threads=1,
                torch=torch.__version__,
                python=sys.version.split()[0],
                machine=platform.machine(),
            ),
            "seconds_per_step_median": med,
            "ratio_to_trainer_B": {k: med[k] / med["trainer_B"] for k in kinds},
            "all_seconds": times,
        },
        "bench_trainer",
        indent=2,
    )
    lines = ["| configuration | s / step (median) | ratio to stock Trainer on B |", "|---|---|---|"]
    for k in kinds:
        lines.append(f"| {k} | {med[k]:.3f} | {med[k] / med['trainer_B']:.2f} |")
    (OUT / "trainer_step.md").write_text(
        md_header(result["produced_by"])
        + f"Tiny Llama + LoRA, B={B}, k={K}, T={T}, CPU, 1 thread, {ROUNDS} interleaved rounds x {STEPS} steps "
        f"(shared machine).\n\n" + "\n".join(lines) + "\n"
    )
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.bar([k.replace("_sketch_B", "\n(sketch B)") for k in kinds], [med[k] for k in kinds])
    ax.set_ylabel("seconds per optimizer step")
    ax.set_title(f"B={B}, k={K}, tiny Llama + LoRA, CPU")
    fig.tight_layout()
    fig.savefig(OUT / "trainer_step.png", dpi=100)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
