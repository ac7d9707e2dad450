"""Peak memory of one full fine-tuning step with selection="target": the streamed target stage
against plain steps and against the whole-row target stage it replaced.

Same method as benchmarks/sketch_memory.py (fresh process per configuration, AdamW over every
parameter, one warm-up step of the same kind, then one measured step; memory above base = peak
RSS during the measured step minus the RSS just before it). The sketch layer is ``lm_head``.

Configurations: ``plain_k``, ``plain_B`` (forward/backward of k or B examples + step),
``target`` (``select()`` with ``selection="target"``, the bounded path, + step), ``target_whole``
(the same step computed as before: the target's and the batch's whole per-example gradients of
``lm_head``, normalized, aligned: ``lib/whole_rows.py``'s target method, through ``select()``).

Usage: ``python benchmarks/target_memory.py [--hidden 384] [--batch 16] [--k 4] [--curvature 0]``; writes
benchmarks/results/target_memory/target_memory_h<hidden>_c<curvature>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lib.memory import measure_peak, status_kb  # noqa: E402
from lib.options import add_step_options  # noqa: E402
from lib.results import md_header, save_json  # noqa: E402
from lib.workers import spawn  # noqa: E402

CONFIGS = ("plain_k", "plain_B", "target", "target_whole")


def run_worker(args) -> dict:
    import torch

    from coreset_optim import CoresetOptimizer
    from coreset_optim.methods.registry import build_method
    from lib.data import token_batch
    from lib.models import full_model
    from lib.steps import coreset_step, plain_step
    from lib.whole_rows import whole_rows

    torch.set_num_threads(args.threads)
    model, loss_fn = full_model("gpt2-768", args.seq_len, None, args.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    method = build_method("target", curvature=args.curvature, per_source=False)
    if args.worker == "target_whole":  # the target stage as it was: [T, D] and [B, D] rows
        method = whole_rows(method)
    wrapper = CoresetOptimizer(opt, model, coreset_size=args.k, sketch_modules="lm_head", selection=method)
    vocab = model.config.vocab_size
    target = token_batch(args.target_size, args.seq_len, vocab=vocab, seed=99)
    del target["source"]

    def step(batch):
        if args.worker in ("plain_k", "plain_B"):
            plain_step(opt, loss_fn, batch, args.k if args.worker == "plain_k" else args.batch)
        else:  # target, target_whole
            wrapper.selection.set_target(target)
            coreset_step(wrapper, loss_fn, batch)

    batches = [token_batch(args.batch, args.seq_len, vocab=vocab, seed=i) for i in range(2)]
    for b in batches:
        del b["source"]
    step(batches[0])  # warm-up: Adam's state, caches
    base = status_kb("VmRSS") * 1024
    peak, _, seconds = measure_peak(lambda: step(batches[1]))
    return {
        "config": args.worker,
        "vocab": vocab,
        "hidden": model.config.hidden_size,
        "batch": args.batch,
        "k": args.k,
        "target_size": args.target_size,
        "seq_len": args.seq_len,
        "curvature": args.curvature,
        "lm_head_numel": int(model.lm_head.weight.numel()),
        "peak_above_base_bytes": peak,
        "base_bytes": base,
        "step_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker")
    parser.add_argument("--hidden", type=int, default=384)
    add_step_options(parser, batch=16, k=4, seq_len=32)
    parser.add_argument("--target-size", type=int, default=8)
    parser.add_argument("--curvature", type=float, default=0.0)
    parser.add_argument("--out", default=str(HERE / "results" / "target_memory"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    rows = []
    for config in CONFIGS:
        options = {key: getattr(args, key) for key in ("hidden", "batch", "k", "target_size", "seq_len", "curvature")}
        rows.append(spawn(__file__, config, args.threads, **options))
        print(config, f"{rows[-1]['peak_above_base_bytes'] / 2**20:.0f} MiB", f"{rows[-1]['step_s']:.1f} s", flush=True)
    by = {r["config"]: r for r in rows}
    r0 = rows[0]
    lines = [
        f"GPT-2 (vocab {r0['vocab']}, hidden {r0['hidden']}, 2 layers), full fine-tuning with AdamW, sketch layer "
        f"lm_head ({r0['lm_head_numel'] / 1e6:.1f} M values), B = {r0['batch']}, k = {r0['k']}, target of "
        f"{r0['target_size']} examples, {r0['seq_len']} tokens, curvature = {r0['curvature']}, CPU, "
        f"{args.threads} thread; one measured step per configuration in a fresh process; peak RSS above the "
        "RSS before the step (shared 2-core machine).",
        "",
        "| configuration | peak above base MiB | / plain k | / plain B | step s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        peak = r["peak_above_base_bytes"]
        lines.append(
            f"| {r['config']} | {peak / 2**20:.0f} | {peak / by['plain_k']['peak_above_base_bytes']:.2f} | "
            f"{peak / by['plain_B']['peak_above_base_bytes']:.2f} | {r['step_s']:.2f} |"
        )
    out = Path(args.out)
    stem = f"target_memory_h{args.hidden}_c{args.curvature:g}"
    data = save_json(out / f"{stem}.json", {"args": vars(args), "rows": rows}, "target_memory", indent=2)
    (out / f"{stem}.md").write_text(md_header(data["produced_by"]) + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
