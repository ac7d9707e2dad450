"""Peak memory per rank of a coreset step under FSDP2 against a plain sharded step of k (2 gloo CPU ranks).

    python benchmarks/sharded_memory.py [--repeats 3] [--out benchmarks/results/sharded_memory]

Each run is a fresh pair of processes, the two ranks of a gloo group. Every rank builds the same
model (seeded), shards it with ``fully_shard`` on every decoder layer and then on the root (what
Accelerate's transformer-based wrap does under ``fsdp_config={"version": 2}``), makes AdamW over
the trained parameters, runs one warm-up step of the configuration's kind (so Adam's state
exists) and measures the next one: the peak RSS during the step above the RSS just before it
(``lib/memory.py``: the peak reset through ``/proc/self/clear_refs``, freed blocks returned to the
OS), on each rank.

Configurations, per rank ``B_r = 16`` examples of 64 tokens (global batch ``B = 32``), ``k = 8``:

* ``plain_k``: forward/backward of ``k / 2 = 4`` examples on each rank (the global k), then the step;
* ``plain_B``: of all 16 examples on each rank;
* ``coreset``: ``select()`` of ``k`` from the global batch (each rank sketches its 16 and
  backpropagates its share of the coreset), then the step; default options: the sketch pass runs
  in chunks of the coreset size k = 8, the global k, twice what ``plain_k`` runs on a rank;
* ``coreset_chunked``: the same with ``sketch_batch_size = micro_batch_size = k / 2 = 4``, the
  per-rank share of ``plain_k``, for the sketch pass's chunks and the coreset's backward.

Models: a 4-layer Llama, hidden 1024, MLP 2816, vocabulary 16000, 128 tokens (``full``: AdamW over
every parameter, the default sketch target ``lm_head``, 16,384,000 values; ``lora``: LoRA r = 8 on
q/v, the default sketch target, the last v_proj's LoRA-B, 8,192 values). Writes
``benchmarks/results/sharded_memory/sharded_memory.{json,md}``; ``--replot`` rewrites the markdown
from the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lib.results import md_header, results_dir, save_json  # noqa: E402
from lib.workers import worker_env  # noqa: E402

WORLD = 2
B_RANK = 16  # examples per rank
K = 8  # coreset of the global batch of WORLD * B_RANK
SEQ = 128
SHAPE = dict(vocab_size=16000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8)
MODELS = ("full", "lora")
CONFIGS = ("plain_k", "plain_B", "coreset", "coreset_chunked")


def build(model_name: str):
    """The model and its trained parameters (seeded: the same on every rank)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_key_value_heads=8, max_position_embeddings=SEQ, tie_word_embeddings=False, **SHAPE)
    model = LlamaForCausalLM(config)
    if model_name == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    return model


def shard(model) -> None:
    from torch.distributed.fsdp import fully_shard

    for module in model.modules():
        if type(module).__name__ == "LlamaDecoderLayer":
            fully_shard(module)
    fully_shard(model)


def batch(step: int, rank: int, size: int) -> dict:
    import torch

    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(0, SHAPE["vocab_size"], (size, SEQ), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def rank_main(out: Path, model_name: str, config: str) -> None:
    """One rank: the warm-up step, then the measured one; rank r writes ``out/rank{r}.json``."""
    import torch
    import torch.distributed as dist

    from coreset_optim import CoresetOptimizer
    from coreset_optim.batching import index_batch
    from coreset_optim.distributed import shutdown
    from coreset_optim.integrations.causal_lm import causal_lm_loss_fn
    from lib.memory import measure_peak

    dist.init_process_group("gloo", timeout=timedelta(seconds=300))
    rank = dist.get_rank()
    torch.set_num_threads(1)
    model = build(model_name)
    shard(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    inner = torch.optim.AdamW(trained, lr=1e-4)
    loss_fn = causal_lm_loss_fn(model)
    chunk = dict(sketch_batch_size=K // WORLD, micro_batch_size=K // WORLD) if config == "coreset_chunked" else {}
    wrapper = CoresetOptimizer(inner, model, coreset_size=K, **chunk) if config.startswith("coreset") else None
    shares = []

    def step(i: int) -> None:
        data = batch(i, rank, B_RANK)
        if wrapper is not None:
            coreset = wrapper.select(data, loss_fn)
            shares.append(int(coreset.local_indices.numel()))
            wrapper.step()
            wrapper.zero_grad(set_to_none=True)
            return
        n = K // WORLD if config == "plain_k" else B_RANK
        loss_fn(index_batch(data, torch.arange(n))).mean().backward()
        inner.step()
        inner.zero_grad(set_to_none=True)

    model.train()
    step(0)  # warm-up: Adam's state, first-call caches
    peak, base, seconds = measure_peak(lambda: step(1))
    result = dict(rank=rank, peak_bytes=peak, base_bytes=base, seconds=seconds, coreset_share=shares[-1:] or None)
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model_name: str, config: str, scratch: Path) -> list[dict]:
    """One run: both ranks in fresh processes; what each measured."""
    scratch.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = worker_env(1, RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        cmd = [sys.executable, __file__, "--rank-of", model_name, config, str(scratch)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    for p, text in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(f"{model_name} {config} failed:\n{text[-3000:]}")
    return [json.loads((scratch / f"rank{r}.json").read_text()) for r in range(WORLD)]


def mib(n: float) -> float:
    return n / 2**20


def report(data: dict) -> str:
    lines = [
        md_header(data["produced_by"]),
        "# Peak memory per rank: a coreset step under FSDP2 vs a plain sharded step of k",
        "",
        f"Produced by `python benchmarks/sharded_memory.py --repeats {data['repeats']}`: 2 ranks (gloo, CPU, "
        f"1 thread each), `fully_shard` on every decoder layer and the root; a {SHAPE['num_hidden_layers']}-layer "
        f"Llama (hidden {SHAPE['hidden_size']}, MLP {SHAPE['intermediate_size']}, vocabulary {SHAPE['vocab_size']}), "
        f"{SEQ} tokens, {B_RANK} examples per rank (global batch {WORLD * B_RANK}), k = {K}; AdamW. "
        "Each run a fresh pair of processes: one warm-up step, then the peak RSS of one step above the RSS before "
        f"it, per rank. `full`: every parameter trained, sketch target lm_head "
        f"({SHAPE['vocab_size'] * SHAPE['hidden_size']:,} values); `lora`: LoRA r = 8 on q/v, sketch target the last "
        f"v_proj's LoRA-B ({SHAPE['hidden_size'] * 8:,} values). `plain_k`: each rank backpropagates its "
        f"{K // WORLD} of the k; `plain_B`: all its {B_RANK}; `coreset`: `select()` of k from the global batch, each "
        "rank backpropagating its share (default options: the sketch pass in chunks of k = 8); `chunked`: the same "
        f"with `sketch_batch_size = micro_batch_size = {K // WORLD}` (k / ranks). Share of k: the examples of the "
        "measured step's coreset the rank held (default options).",
        "",
        "| model | rank | plain k MiB | plain B MiB | coreset MiB | coreset / plain k | chunked MiB "
        "| chunked / plain k | coreset / plain B | rank's share of k |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model_name in MODELS:
        runs = data["runs"][model_name]
        for rank in range(WORLD):
            per = {c: [mib(r[rank]["peak_bytes"]) for r in runs[c]] for c in CONFIGS}
            ratio_k = [c / p for c, p in zip(per["coreset"], per["plain_k"])]
            ratio_chunked = [c / p for c, p in zip(per["coreset_chunked"], per["plain_k"])]
            ratio_b = [c / p for c, p in zip(per["coreset"], per["plain_B"])]
            shares = [r[rank]["coreset_share"][0] for r in runs["coreset"]]

            def span(values, fmt="{:.0f}"):
                lo, hi = min(values), max(values)
                return fmt.format(lo) if fmt.format(lo) == fmt.format(hi) else f"{fmt.format(lo)}-{fmt.format(hi)}"

            lines.append(
                f"| {model_name} | {rank} | {span(per['plain_k'])} | {span(per['plain_B'])} | {span(per['coreset'])} "
                f"| {span(ratio_k, '{:.2f}')} | {span(per['coreset_chunked'])} | {span(ratio_chunked, '{:.2f}')} "
                f"| {span(ratio_b, '{:.2f}')} | {span(shares)} |"
            )
    lines += [
        "",
        f"Ranges over {data['repeats']} runs (each ratio within one run). Median step seconds (rank 0):",
        "",
    ]
    for model_name in MODELS:
        runs = data["runs"][model_name]
        times = ", ".join(f"{c} {statistics.median(r[0]['seconds'] for r in runs[c]):.2f} s" for c in CONFIGS)
        lines.append(f"- {model_name}: {times}")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    if "--rank-of" in sys.argv:
        i = sys.argv.index("--rank-of")
        rank_main(Path(sys.argv[i + 3]), sys.argv[i + 1], sys.argv[i + 2])
        sys.stdout.flush()
        os._exit(0)  # as the tests' FSDP2 ranks: gloo may abort in the interpreter's shutdown
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=results_dir("sharded_memory"))
    parser.add_argument("--replot", action="store_true", help="rewrite the markdown from the saved JSON")
    args = parser.parse_args()
    if args.replot:
        data = json.loads((args.out / "sharded_memory.json").read_text())
        (args.out / "sharded_memory.md").write_text(report(data))
        return
    scratch = args.out / ".scratch"
    runs: dict = {m: {c: [] for c in CONFIGS} for m in MODELS}
    for repeat in range(args.repeats):
        for model_name in MODELS:
            for config in CONFIGS:  # interleaved: load drifts over the run
                got = launch(model_name, config, scratch)
                runs[model_name][config].append(got)
                peaks = ", ".join(f"{mib(r['peak_bytes']):.0f}" for r in got)
                print(f"repeat {repeat} {model_name} {config}: peak MiB per rank {peaks}", flush=True)
    for f in scratch.glob("*.json"):
        f.unlink()
    scratch.rmdir()
    data = save_json(args.out / "sharded_memory.json", {"repeats": args.repeats, "runs": runs}, "sharded_memory")
    (args.out / "sharded_memory.md").write_text(report(data))
    print(report(data))


if __name__ == "__main__":
    main()
