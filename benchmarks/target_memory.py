"""Peak memory of one full fine-tuning step with selection="target": the streamed target stage
against plain steps and against the whole-row target stage it replaced.

Same method as benchmarks/sketch_memory.py (fresh process per configuration, AdamW over every
parameter, one warm-up step of the same kind, then one measured step; memory above base = peak
RSS during the measured step minus the RSS just before it). The sketch layer is ``lm_head``.

Configurations: ``plain_k``, ``plain_B`` (forward/backward of k or B examples + step),
``target`` (``select()`` with ``selection="target"``, the bounded path, + step), ``target_whole``
(the same step computed as before: the target's and the batch's whole per-example gradients of
``lm_head``, normalized, aligned; reimplemented here from the library's whole-row functions).

Usage: ``python benchmarks/target_memory.py [--hidden 384] [--batch 16] [--k 4] [--curvature 0]``; writes
benchmarks/results/target_memory/target_memory_h<hidden>_c<curvature>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from e2e import _status_kb, host_peak  # noqa: E402
from sketch_memory import build_model  # noqa: E402

CONFIGS = ("plain_k", "plain_B", "target", "target_whole")


def make_step(config, model, loss_fn, opt, wrapper, k, big, target):
    import torch

    from coreset_optim.batching import index_batch
    from coreset_optim.loss import backward_weighted
    from coreset_optim.precondition.normalize import normalize_sketches
    from coreset_optim.mixture.choose import select_from_sketches
    from coreset_optim.sketch.capture import exact_sketches, sketch_params
    from coreset_optim.methods.target import step_sizes, target_features, target_gradient

    def plain(batch, n):
        loss_fn(index_batch(batch, torch.arange(n))).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if config == "plain_k":
        return lambda batch: plain(batch, k)
    if config == "plain_B":
        return lambda batch: plain(batch, big)
    if config == "target":

        def streamed(batch):
            wrapper.selection.set_target(target)
            wrapper.select(batch, loss_fn)
            wrapper.step()
            wrapper.zero_grad(set_to_none=True)

        return streamed

    def whole(batch):  # the target stage as it was: [T, D] and [B, D] rows
        c, method = wrapper.config, wrapper.selection
        targets = wrapper.sketch_layers
        params = sketch_params(targets)
        traw, tlosses = exact_sketches(model, targets, target, loss_fn, target["input_ids"].shape[0], k)
        g_t = target_gradient(traw, tlosses)
        del traw
        raw, losses = exact_sketches(model, targets, batch, loss_fn, big, k)
        rows = normalize_sketches(raw, opt, params, method.normalize)
        del raw
        rows = target_features(rows, g_t, params, step_sizes(opt, params), method.curvature, method.sketch_dim, c.seed)
        valid = torch.isfinite(losses) & torch.isfinite(rows).all(1)
        n = int(valid.sum())
        result = select_from_sketches(
            rows,
            valid,
            torch.zeros(big, dtype=torch.long),
            1,
            k,
            [False],
            method,
            context={"losses": losses, "generator": wrapper.generator, "total": n},
        )
        backward_weighted(index_batch(batch, result.indices), result.weights, loss_fn, n, None)
        del rows
        opt.step()
        opt.zero_grad(set_to_none=True)

    return whole


def run_worker(args) -> dict:
    import torch

    from coreset_optim import CoresetOptimizer
    from tinyllm import make_batch

    torch.set_num_threads(args.threads)
    model, loss_fn = build_model("gpt2-768", args.seq_len, None, args.hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    wrapper = CoresetOptimizer(
        opt,
        model,
        coreset_size=args.k,
        sketch_modules="lm_head",
        selection="target",
        curvature=args.curvature,
        per_source=False,
    )
    vocab = model.config.vocab_size
    target = make_batch(args.target_size, args.seq_len, vocab=vocab, seed=99)
    del target["source"]
    step = make_step(args.worker, model, loss_fn, opt, wrapper, args.k, args.batch, target)
    batches = [make_batch(args.batch, args.seq_len, vocab=vocab, seed=i) for i in range(2)]
    for b in batches:
        del b["source"]
    step(batches[0])  # warm-up: Adam's state, caches
    base = _status_kb("VmRSS") * 1024
    peak, seconds = host_peak(step, batches[1])
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
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--target-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--curvature", type=float, default=0.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(HERE / "results" / "target_memory"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    rows = []
    for config in CONFIGS:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", config]
        for key in ("hidden", "batch", "k", "target_size", "seq_len", "curvature", "threads"):
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {config} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
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
    from common import md_header, provenance

    produced_by = provenance("target_memory")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"target_memory_h{args.hidden}_c{args.curvature:g}"
    (out / f"{stem}.json").write_text(
        json.dumps({"produced_by": produced_by, "args": vars(args), "rows": rows}, indent=2)
    )
    (out / f"{stem}.md").write_text(md_header(produced_by) + "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
