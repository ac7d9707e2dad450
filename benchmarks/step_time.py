"""Step time at the proportions users train, a FLOP time model checked against it, the step of a
``torch.compile``'d model, and where a tiny model's step goes (issue 23, items 3-5).

Question: at the proportions of a Llama-3-8B or a 70B (output head about 7 % / 1.5 % of the forward,
one layer about 3 % / 1.2 %), what does the default coreset step of k from B cost next to CoLM's
ideal, to accumulating B in micro-batches of k and to a plain step of k random examples; and does
a model of FLOPs predict it?

Modes (``--mode``), each configuration in a fresh process, the methods side by side in it:

  proportional  Llamas scaled down to hidden 128 that keep their model's proportions (head share of
                the forward FLOPs, layer count, FFN ratio 3.5, grouped-query ratio): ``8b`` (32
                layers, vocabulary 4,096: Llama-3-8B's 7.0 % head, 2.9 % per layer) and ``70b``
                (80 layers, vocabulary 2,048: Llama-3-70B's 1.5 % head, 1.2 % per layer). LoRA r = 8
                on q, v, and full fine-tuning; T = 128 and 512; B = 32, k = 8 (k = B/4).
  compile       one small shape (hidden 128, 4 layers, LoRA q, v, T = 128): the same methods on the
                eager model and on ``torch.compile(model)`` (inductor), side by side.
  tiny          the fine-tuning benchmark's model (the committed 337k-parameter base, LoRA on every
                linear, B = 64, k = 16): the default's ``Coreset.timings`` stage by stage, next to
                random k, the library's ``selection="random"``, accumulation and the ideal.

Methods (all with the library's per-example loss, ``causal_lm_loss_fn``, so they differ only in
their passes; AdamW):

  default   ``select()`` with every option at its default, then ``step()``
  ideal     CoLM's ideal, as ``real_shapes.py`` defines it: a no-grad forward of B in chunks of k
            (eval mode), then forward/backward of k and the step (``lib.steps.ideal_step``)
  accum     B in micro-batches of k, forward/backward each, one step (``lib.steps.accumulation_step``)
  random_k  forward/backward of k examples and the step (``lib.steps.plain_step``)

Timing: one warm-up round, then ``--reps`` rounds, each calling every method once in turn
(``lib.timing.interleave_times``); a ratio is the median over rounds of the per-round ratio. The
machine is a shared 2-core CPU at one torch thread: read the ratios, not the seconds.

The time model (:func:`predict`) counts matmul and attention FLOPs of each pass from the shape;
``--model-only`` prints its predictions for the real Llamas.

Usage: ``PYTHONPATH=. python benchmarks/step_time.py --mode proportional|compile|tiny [--quick]``;
``--mode proportional --long --batch 16 --k 4``: the 8b shape at T = 2,048 (``step_time_long``).
Results: benchmarks/results/step_time/{step_time,step_time_long,step_time_compile,step_time_tiny,time_model}.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lib.options import add_step_options  # noqa: E402
from lib.results import machine_info, md_header, results_dir, save_json, table_head  # noqa: E402
from lib.workers import WorkerFailed, spawn  # noqa: E402

METHODS = ("default", "ideal", "accum", "random_k")
LORA_RANK, LORA_TARGETS = 8, ("q_proj", "v_proj")


# --- the shapes and the time model ------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """A Llama's dimensions (``kv_heads``: grouped-query attention's key/value heads)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @property
    def layer_params(self) -> int:
        """One block's linear weights: q, k, v, o and the gated MLP."""
        h = self.hidden
        return h * (2 * h + 2 * self.kv_dim) + 3 * h * self.intermediate


REAL = {
    "Llama-3-8B": Shape(4096, 32, 32, 8, 14336, 128256),
    "Llama-3-70B": Shape(8192, 80, 64, 8, 28672, 128256),
    "Llama-2-70B": Shape(8192, 80, 64, 8, 28672, 32000),
}
# name: (scaled-down shape, the real model whose proportions it keeps)
SCALED = {
    "8b": (Shape(128, 32, 4, 1, 448, 4096), "Llama-3-8B"),
    "70b": (Shape(128, 80, 8, 1, 448, 2048), "Llama-3-70B"),
}
COMPILE_SHAPE = Shape(128, 4, 4, 1, 448, 1024)
# Attention's backward over its forward in FLOPs: flash attention (torch's CPU kernel too) recomputes
# the scores, so 5 matmuls against the forward's 2 (FlashAttention-2's count).
ATTENTION_BACKWARD = 2.5


def token_flops(shape: Shape, seq_len: int, lora: bool, targets=LORA_TARGETS) -> dict[str, float]:
    """Forward FLOPs per token, by part: the blocks' linear layers, causal attention (QK^T and AV
    over (T + 1) / 2 keys on average), the output head, and LoRA's adapters (rank 8 on ``targets``)."""
    h, layers, inter = shape.hidden, shape.layers, shape.intermediate
    dims = {"q_proj": (h, h), "k_proj": (h, shape.kv_dim), "v_proj": (h, shape.kv_dim), "o_proj": (h, h)}
    dims.update({"gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)})
    lora_f = 2 * LORA_RANK * sum(sum(dims[t]) for t in targets) * layers if lora else 0.0
    return {
        "linear": 2.0 * shape.layer_params * layers,
        "attention": 4.0 * (seq_len + 1) / 2 * h * layers,
        "head": 2.0 * h * shape.vocab,
        "lora": float(lora_f),
        "top_block": 2.0 * (h * h + 3 * h * shape.intermediate),  # o_proj and MLP of the last block
    }


def proportions(shape: Shape, seq_len: int) -> dict[str, float]:
    """Shares of the forward FLOPs: the output head, one block (its linears and attention), attention."""
    f = token_flops(shape, seq_len, lora=False)
    total = f["linear"] + f["attention"] + f["head"]
    return {
        "head": f["head"] / total,
        "one_layer": (f["linear"] + f["attention"]) / shape.layers / total,
        "attention": f["attention"] / total,
    }


def predict(shape: Shape, batch: int, k: int, seq_len: int, lora: bool, targets=LORA_TARGETS) -> dict[str, float]:
    """Predicted cost of each method relative to accumulating B in micro-batches of k, from FLOPs.

    Per token: forward F = linear + attention + head (+ LoRA). Backward: the linear layers' and
    the head's input and weight gradients (2x their forward) with full fine-tuning, their input
    gradients only (1x) with LoRA (the adapters: 2x); attention :data:`ATTENTION_BACKWARD` x its
    forward either way. The sketch pass: a forward of B (autograd kept only from the sketch layer
    up) plus its backward to the sketch layer: with LoRA (the last block's v_proj LoRA-B) the
    head's and the top block's o_proj/MLP input gradients and one block's attention backward; with
    full fine-tuning (the head) the per-example head gradients, one head forward's worth. The
    coreset's backward: a forward and backward of k. Optimizer steps, normalization, compression,
    norms, activations and the loss's softmax are not counted (memory-bound; small next to the
    matmuls at real widths, not at hidden 128)."""
    f = token_flops(shape, seq_len, lora, targets)
    fwd = f["linear"] + f["attention"] + f["head"] + f["lora"]
    att_back = ATTENTION_BACKWARD * f["attention"]
    if lora:
        bwd = f["linear"] + f["head"] + att_back + 2 * f["lora"]
        sketch_back = f["head"] + f["top_block"] + att_back / shape.layers
    else:
        bwd = 2 * (f["linear"] + f["head"]) + att_back
        sketch_back = f["head"]
    share = k / batch
    step_k = share * (fwd + bwd)
    cost = {
        "accum": fwd + bwd,
        "ideal": fwd + step_k,
        "default": fwd + sketch_back + step_k,
        "random_k": step_k,
    }
    return {m: c / cost["accum"] for m, c in cost.items()}


# --- measuring ----------------------------------------------------------------------------------
def timed_methods(model, opt, loss_fn, batch: dict, k: int, wrapper) -> tuple[dict, list[dict]]:
    """The four methods as argument-free calls on one fixed batch; the default's stage timings."""
    from lib.steps import accumulation_step, coreset_step, ideal_step, plain_step

    fields = {key: batch[key] for key in ("input_ids", "labels")}
    stages: list[dict] = []
    return {
        "default": lambda: stages.append(coreset_step(wrapper, loss_fn, fields, sources=batch["source"]).timings),
        "ideal": lambda: ideal_step(model, opt, loss_fn, fields, k),
        "accum": lambda: accumulation_step(opt, loss_fn, fields, k),
        "random_k": lambda: plain_step(opt, loss_fn, fields, k),
    }, stages


def summarize_times(times: dict[str, list[float]]) -> dict:
    """Median seconds of each method and the median (min-max) per-round ratios to accum, ideal and random k."""
    from lib.timing import round_ratios

    out = {"seconds": {m: statistics.median(t) for m, t in times.items()}, "ratios": {}}
    for ref in ("accum", "ideal", "random_k"):
        if ref not in times:
            continue
        for name, r in round_ratios(times, ref).items():
            if name != ref:
                out["ratios"][f"{name}/{ref}"] = {"median": statistics.median(r), "min": min(r), "max": max(r)}
    return out


def median_stages(stages: list[dict]) -> dict[str, float]:
    """Median seconds of each stage over the steps, and of ``other``: a step's total minus its stages
    (bookkeeping outside them)."""
    stages = [{**s, "other": s["total"] - sum(v for key, v in s.items() if key != "total")} for s in stages]
    keys = sorted({key for s in stages for key in s})
    return {key: statistics.median(s.get(key, 0.0) for s in stages) for key in keys}


def llama_model(shape: Shape, seq_len: int, lora: bool):
    from lib.models import llama, with_lora

    s = shape
    model = llama(s.vocab, s.hidden, s.layers, s.heads, s.kv_heads, s.intermediate, positions=max(seq_len, 16))
    model.config.use_cache = False
    return with_lora(model, LORA_RANK, list(LORA_TARGETS), lora_dropout=0.0) if lora else model


def run_proportional(args) -> dict:
    import torch

    from lib.data import labeled_batch
    from lib.timing import interleave_times

    from coreset_optim import CoresetOptimizer
    from coreset_optim.integrations.causal_lm import causal_lm_loss_fn

    shape = SCALED[args.shape][0]
    model = llama_model(shape, args.seq_len, args.lora)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    loss_fn = causal_lm_loss_fn(model)
    wrapper = CoresetOptimizer(opt, model, coreset_size=args.k)
    fns, stages = timed_methods(
        model, opt, loss_fn, labeled_batch(args.batch, args.seq_len, shape.vocab, 1), args.k, wrapper
    )
    times = interleave_times(fns, args.reps, warmup=1)
    return {
        "shape": args.shape,
        "lora": args.lora,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "k": args.k,
        "params": sum(p.numel() for p in model.parameters()),
        "trained": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "sketch_modules": [t.name for t in wrapper.sketch_layers],
        "selection": wrapper.selection.name,
        "sketch": getattr(wrapper.selection, "sketch", None),
        "times": times,
        **summarize_times(times),
        "default_stages": median_stages(stages[1:]),  # the warm-up's first select() left out
        "predicted": predict(shape, args.batch, args.k, args.seq_len, args.lora),
    }


def run_compile(args) -> dict:
    """The four methods on the eager model and on ``torch.compile(model)`` (one model, shared
    weights and optimizer), side by side; compilation happens in the warm-up rounds."""
    import torch
    import torch._dynamo

    from lib.data import labeled_batch
    from lib.timing import interleave_times

    from coreset_optim import CoresetOptimizer
    from coreset_optim.integrations.causal_lm import causal_lm_loss_fn

    shape = COMPILE_SHAPE
    model = llama_model(shape, args.seq_len, lora=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    compiled = torch.compile(model, backend=args.backend)
    batch = labeled_batch(args.batch, args.seq_len, shape.vocab, 1)
    fns, stages = {}, {}
    for tag, runner in (("eager", model), ("compiled", compiled)):
        wrapper = CoresetOptimizer(opt, model, coreset_size=args.k)
        methods, stages[tag] = timed_methods(runner, opt, causal_lm_loss_fn(runner), batch, args.k, wrapper)
        fns.update({f"{name}:{tag}": fn for name, fn in methods.items()})
    start = time.perf_counter()
    for fn in fns.values():  # compile (first calls), outside the timed rounds
        fn()
    compile_s = time.perf_counter() - start
    times = interleave_times(fns, args.reps, warmup=1)
    counters = torch._dynamo.utils.counters
    out = {
        "shape": asdict(shape),
        "lora": True,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "k": args.k,
        "backend": args.backend,
        "first_calls_s": compile_s,
        "graph_breaks": dict(counters["graph_break"]),
        "frames_compiled": counters["frames"]["total"],
        "unique_graphs": counters["stats"]["unique_graphs"],
        "times": times,
        "predicted": predict(shape, args.batch, args.k, args.seq_len, True),
        "default_stages": {tag: median_stages(s[2:]) for tag, s in stages.items()},
    }
    for tag in ("eager", "compiled"):
        out[tag] = summarize_times({m: times[f"{m}:{tag}"] for m in METHODS})
    from lib.timing import round_ratios

    out["compiled/eager"] = {
        m: statistics.median(round_ratios({"c": times[f"{m}:compiled"], "e": times[f"{m}:eager"]}, "e")["c"])
        for m in METHODS
    }
    return out


def run_tiny(args) -> dict:
    """The fine-tuning benchmark's model and batches: each arm steps on the same batches in turn."""
    from lib.finetune import ARMS, Arm, build_context, default_args, make_trainer
    from lib.steps import ideal_step
    from lib.timing import interleave_times
    from lib.training import BatchStream

    from coreset_optim.integrations.causal_lm import causal_lm_per_example_loss

    setup = default_args()
    setup.pool = 4000  # the pool's size does not change a step; a smaller one builds faster
    ctx = build_context(setup)
    batch, k = setup.batch, setup.k
    stream = BatchStream(ctx.mixture.train, seed=0)
    batches = [stream.next(batch) for _ in range(args.reps + 1)]
    arms = {
        "default": ARMS["default"],
        "default_one_chunk": Arm("coreset", {"sketch_batch_size": batch}),  # the sketch pass in one chunk of B
        "stratified_k": ARMS["stratified_k"],  # selection="random": a no-grad loss pass of B, then k
        "random_k": ARMS["random_k"],
        "accum": ARMS["accum_B"],
    }
    trainers = {name: make_trainer(arm, 0, ctx) for name, arm in arms.items()}
    ideal_t = make_trainer(ARMS["random_k"], 0, ctx)  # a model, optimizer and loss for the ideal
    stages: dict[str, list[dict]] = {}
    for name, t in [*trainers.items(), ("ideal", ideal_t)]:
        # the loss without the benchmark's activation meter (a saved-tensor hook on every forward with grad)
        t.loss_fn = lambda b, model=t.model: causal_lm_per_example_loss(model(input_ids=b["input_ids"]), b["labels"])
        if t.wrapper is not None:
            stages[name] = []
            t.on_select = lambda big, coreset, log=stages[name]: log.append(coreset.timings)

    def stepper(step):
        it = iter(batches)
        return lambda: step(next(it))

    fns = {name: stepper(t.step) for name, t in trainers.items()}
    fns["ideal"] = stepper(lambda b: ideal_step(ideal_t.model, ideal_t.opt, ideal_t.loss_fn, b, k))
    times = interleave_times(fns, args.reps, warmup=1)
    out = {
        "batch": batch,
        "k": k,
        "seq_len": int(batches[0]["input_ids"].shape[1]),
        "shape": asdict(tiny_shape()),
        "params": sum(p.numel() for p in ideal_t.model.parameters()),
        "trained": sum(p.numel() for p in ideal_t.model.parameters() if p.requires_grad),
        "times": times,
        **summarize_times(times),
        "stages": {name: median_stages(s[1:]) for name, s in stages.items()},
    }
    out["predicted"] = tiny_predicted(out)
    return out


def tiny_shape() -> Shape:
    """The fine-tuning benchmark's base (``coreset_optim.datasets.base_model``), as a :class:`Shape`."""
    from coreset_optim.datasets.base_model import base_config

    c = base_config()
    return Shape(
        c.hidden_size,
        c.num_hidden_layers,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.intermediate_size,
        c.vocab_size,
    )


def tiny_predicted(result: dict) -> dict[str, float]:
    from lib.finetune import LORA_TARGETS as ALL_LINEAR

    return predict(Shape(**result["shape"]), result["batch"], result["k"], result["seq_len"], True, ALL_LINEAR)


# --- the driver ---------------------------------------------------------------------------------
def configs(quick: bool, long: bool = False) -> list[dict]:
    """(shape, T, LoRA, reps) of the proportional mode: cheapest first (``long``: T = 2,048 only)."""
    if quick:
        return [{"shape": "8b", "seq_len": 32, "lora": True, "reps": 2}]
    if long:
        return [{"shape": "8b", "seq_len": 2048, "lora": lora, "reps": 2} for lora in (True, False)]
    out = []
    for shape, seq_len, reps in (("8b", 128, 5), ("70b", 128, 4), ("8b", 512, 3)):
        for lora in (True, False):
            out.append({"shape": shape, "seq_len": seq_len, "lora": lora, "reps": reps})
    return out


def load(averages) -> str:
    """A load average triple (1, 5, 15 min) as text."""
    return "n/a" if not averages else ", ".join(f"{x:.1f}" for x in averages)


def ratio_cell(r: dict | None) -> str:
    return "n/a" if r is None else f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f})"


def markdown_proportional(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Step time at the proportions users train (`benchmarks/step_time.py --mode proportional`)",
        "",
        f"{m['cpu']}, {m['cores']} cores shared with other jobs (load average "
        f"{load(m['load_average_start'])} at the start, {load(result.get('load_average_end'))} at the end), "
        f"1 torch thread; B = {result['batch']}, k = {result['k']} "
        "(k = B/4), AdamW, random init, the library's per-example loss for every method, one fixed batch "
        "(random tokens, the first quarter a prompt without loss, 4 sources). Each configuration in a fresh "
        "process; its methods side by side in rounds after one warm-up round. Ratios: median (min-max) of the "
        "per-round ratios. " + time_model_line(result),
        "",
        "Shapes (hidden 128, FFN 3.5x, LoRA r = 8 on q, v):",
        "",
    ]
    lines += table_head(
        "name",
        "keeps the proportions of",
        "layers",
        "heads / kv",
        "vocabulary",
        "params",
        *(["head share", "one layer", "attention at T = 128 / 512", "real model: head, one layer"]),
    )
    for name, (shape, real) in SCALED.items():
        p128, p512, pr = proportions(shape, 128), proportions(shape, 512), proportions(REAL[real], 128)
        params = shape.layers * shape.layer_params + 2 * shape.vocab * shape.hidden
        lines.append(
            f"| {name} | {real} | {shape.layers} | {shape.heads} / {shape.kv_heads} | {shape.vocab} | "
            f"{params / 1e6:.1f}M | {p128['head']:.1%} | {p128['one_layer']:.1%} | "
            f"{p128['attention']:.1%} / {p512['attention']:.1%} | {pr['head']:.1%}, {pr['one_layer']:.1%} |"
        )
    lines += ["", "Measured (median seconds per step; ratios per round):", ""]
    lines += table_head(
        "shape",
        "tuning",
        "T",
        "rounds",
        "default s",
        "default / ideal",
        "default / accum",
        "ideal / accum",
        "random k / accum",
        "default / random k",
    )
    for r in result["rows"]:
        q = r["ratios"]
        lines.append(
            f"| {r['shape']} | {'LoRA' if r['lora'] else 'full'} | {r['seq_len']} | {len(r['times']['default'])} | "
            f"{r['seconds']['default']:.2f} | {ratio_cell(q.get('default/ideal'))} | "
            f"{ratio_cell(q.get('default/accum'))} | {ratio_cell(q.get('ideal/accum'))} | "
            f"{ratio_cell(q.get('random_k/accum'))} | {ratio_cell(q.get('default/random_k'))} |"
        )
    lines += ["", "The default's stages (median seconds; `Coreset.timings`) against the ideal's parts:", ""]
    lines += table_head(
        "shape", "tuning", "T", "sketch", "backward (k)", "selection stages", "total", "ideal", "random k"
    )
    for r in result["rows"]:
        s = r["default_stages"]
        select_stages = sum(v for key, v in s.items() if key not in ("sketch", "backward", "total", "prepare", "other"))
        lines.append(
            f"| {r['shape']} | {'LoRA' if r['lora'] else 'full'} | {r['seq_len']} | {s.get('sketch', 0):.3f} | "
            f"{s.get('backward', 0):.3f} | {select_stages:.3f} | {s.get('total', 0):.3f} | "
            f"{r['seconds']['ideal']:.3f} | {r['seconds']['random_k']:.3f} |"
        )
    lines += ["", model_check_table(result["rows"])]
    return "\n".join(lines) + "\n"


def time_model_line(result: dict) -> str:
    t = result.get("time_model") or {}
    return (
        f"Time model: `predict()` in `benchmarks/step_time.py` at commit {t.get('commit', '?')} (FLOPs; attention's "
        f"backward {t.get('attention_backward', '?')}x its forward)."
    )


def model_check_table(rows: list[dict]) -> str:
    """Predicted vs measured ratios to accumulation, every row (and default / ideal)."""
    lines = ["Time model vs measured (ratio to accumulation; 'error' = predicted / measured - 1):", ""]
    lines += table_head(
        "shape",
        "tuning",
        "T",
        *(f"{m} / accum: predicted, measured, error" for m in ("default", "ideal", "random_k")),
        "default / ideal: predicted, measured",
    )
    for r in rows:
        cells = []
        for m in ("default", "ideal", "random_k"):
            p, meas = r["predicted"][m], r["ratios"][f"{m}/accum"]["median"]
            cells.append(f"{p:.2f}, {meas:.2f}, {p / meas - 1:+.0%}")
        pd = r["predicted"]["default"] / r["predicted"]["ideal"]
        cells.append(f"{pd:.2f}, {r['ratios']['default/ideal']['median']:.2f}")
        lines.append(
            f"| {r['shape']} | {'LoRA' if r['lora'] else 'full'} | {r['seq_len']} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def markdown_compile(result: dict) -> str:
    m, s = result["machine"], result["shape"]
    lines = [
        "# A compiled model's coreset step (`benchmarks/step_time.py --mode compile`)",
        "",
        f"{m['cpu']}, {m['cores']} cores shared with other jobs (load average "
        f"{load(m['load_average_start'])} at the start, {load(result.get('load_average_end'))} at the end), "
        f"1 torch thread. Llama hidden {s['hidden']}, {s['layers']} "
        f"layers, vocabulary {s['vocab']}, LoRA r = 8 on q, v; T = {result['seq_len']}, B = {result['batch']}, "
        f"k = {result['k']}. `torch.compile(model, backend={result['backend']!r})` against the same model eager "
        "(shared weights and optimizer), the eight steps side by side in rounds. First calls (compilation): "
        f"{result['first_calls_s']:.0f} s; frames compiled {result['frames_compiled']}, unique graphs "
        f"{result['unique_graphs']}, graph breaks {sum(result['graph_breaks'].values())} "
        f"({'; '.join(sorted({k.splitlines()[0] for k in result['graph_breaks']})) or 'none'}).",
        "",
    ]
    lines += table_head("", "default / ideal", "default / accum", "ideal / accum", "random k / accum", "default s")
    for tag in ("eager", "compiled"):
        q = result[tag]["ratios"]
        lines.append(
            f"| {tag} | {ratio_cell(q['default/ideal'])} | {ratio_cell(q['default/accum'])} | "
            f"{ratio_cell(q['ideal/accum'])} | {ratio_cell(q['random_k/accum'])} | "
            f"{result[tag]['seconds']['default']:.3f} |"
        )
    p = result["predicted"]
    lines += [
        "",
        time_model_line(result),
        f"Predicted: default / accum {p['default']:.2f}, ideal / accum {p['ideal']:.2f}, random k / accum "
        f"{p['random_k']:.2f}. Compiled / eager, per method (median per-round ratio): "
        + ", ".join(f"{k} {v:.2f}" for k, v in result["compiled/eager"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def markdown_tiny(result: dict) -> str:
    m = result["machine"]
    sec = result["seconds"]
    lines = [
        "# Where a tiny model's step goes (`benchmarks/step_time.py --mode tiny`)",
        "",
        f"{m['cpu']}, {m['cores']} cores shared with other jobs (load average "
        f"{load(m['load_average_start'])} at the start, {load(result.get('load_average_end'))} at the end), "
        "1 torch thread. The fine-tuning benchmark's model "
        f"({result['params']:,} parameters, {result['trained']:,} trained: LoRA r = 8 on every linear), its batches "
        f"(B = {result['batch']}, k = {result['k']}), its arms; every arm steps on the same batches in turn, "
        f"{len(result['times']['default'])} rounds after one warm-up round.",
        "",
    ]
    lines += table_head("arm", "ms / step (median)", "/ accum", "/ random k")
    for name, s in sec.items():
        q = result["ratios"]
        a = "1.00" if name == "accum" else ratio_cell(q.get(f"{name}/accum"))
        r = "1.00" if name == "random_k" else ratio_cell(q.get(f"{name}/random_k"))
        lines.append(f"| {name} | {s * 1e3:.1f} | {a} | {r} |")
    lines += ["", "`Coreset.timings` of the coreset arms (median ms):", ""]
    keys = ["prepare", "sketch", "compress", "weights", "backward", "other", "total"]
    keys += sorted({key for st in result["stages"].values() for key in st} - set(keys))
    lines += table_head("arm", *keys)
    for name, st in result["stages"].items():
        lines.append(f"| {name} | " + " | ".join(f"{st.get(key, 0) * 1e3:.1f}" for key in keys) + " |")
    lines += ["", "('other': a step's total minus its stages, the median over steps.)"]
    p = result.get("predicted")
    if p is not None:
        q = result["ratios"]
        lines += [
            "",
            time_model_line(result),
            f"Predicted / measured, ratio to accumulation: default {p['default']:.2f} / "
            f"{q['default/accum']['median']:.2f}, ideal {p['ideal']:.2f} / {q['ideal/accum']['median']:.2f}, "
            f"random k {p['random_k']:.2f} / {q['random_k/accum']['median']:.2f} (T = {result['seq_len']}).",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["proportional", "compile", "tiny"], default="proportional")
    parser.add_argument("--worker")
    parser.add_argument("--shape", default="8b", choices=list(SCALED))
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--long", action="store_true", help="proportional mode at T = 2,048 (8b shape; run with --batch 16 --k 4)"
    )
    parser.add_argument("--model-only", action="store_true", help="print the time model's predictions for real Llamas")
    parser.add_argument(
        "--replot",
        action="store_true",
        help="recompute the time model's predictions of the saved rows, rewrite the .md",
    )
    parser.add_argument("--out", default=str(results_dir("step_time")))
    add_step_options(parser, batch=32, k=8, seq_len=128)
    args = parser.parse_args(argv)
    if args.worker:
        run = {"proportional": run_proportional, "compile": run_compile, "tiny": run_tiny}[args.worker]
        print(json.dumps(run(args)))
        return
    if args.model_only:
        path = Path(args.out) / "time_model.json"
        rows = real_predictions(args.batch, args.k)
        result = save_json(
            path, {"batch": args.batch, "k": args.k, "time_model": time_model_record(), "rows": rows}, "step_time"
        )
        text = real_predictions_markdown(result)
        path.with_suffix(".md").write_text(md_header(result["produced_by"]) + text)
        print(text)
        return
    out = Path(args.out)
    args.machine = machine_info("cpu", args.threads)  # the load average at the start
    args.started = time.time()
    name = {"proportional": "step_time", "compile": "step_time_compile", "tiny": "step_time_tiny"}[args.mode]
    name += "_long" if args.long and args.mode == "proportional" else ""
    path = out / f"{name}{'_quick' if args.quick else ''}.json"  # a smoke run never replaces the results
    if args.replot:
        replot(path, args.mode)
        return
    if args.mode == "proportional":
        old = json.loads(path.read_text()) if path.exists() and not args.quick else {}
        rows = [r for r in old.get("rows", [])]
        done = {(r["shape"], r["seq_len"], r["lora"]) for r in rows}
        result = {}
        for c in configs(args.quick, args.long):
            if (c["shape"], c["seq_len"], c["lora"]) in done:
                continue
            try:
                row = spawn(
                    __file__,
                    "proportional",
                    args.threads,
                    shape=c["shape"],
                    seq_len=c["seq_len"],
                    lora=c["lora"],
                    reps=c["reps"],
                    batch=args.batch,
                    k=args.k,
                )
            except WorkerFailed as e:
                print(f"FAILED {c}: {e}", flush=True)
                continue
            rows.append(row)
            q = row["ratios"]
            print(
                f"[{time.time() - args.started:5.0f}s] {c['shape']} {'lora' if c['lora'] else 'full'} "
                f"T={c['seq_len']}: "
                f"default/ideal {q['default/ideal']['median']:.2f} /accum {q['default/accum']['median']:.2f} "
                f"ideal/accum {q['ideal/accum']['median']:.2f} random/accum {q['random_k/accum']['median']:.2f} "
                f"(predicted {row['predicted']['default']:.2f}, {row['predicted']['ideal']:.2f}, "
                f"{row['predicted']['random_k']:.2f})",
                flush=True,
            )
            result = save(path, args, {"rows": rows}, markdown_proportional)
        print(markdown_proportional(result) if result else "nothing new to run")
        return
    worker = "compile" if args.mode == "compile" else "tiny"
    reps = 2 if args.quick else args.reps
    row = spawn(
        __file__,
        worker,
        args.threads,
        reps=reps,
        batch=args.batch if worker == "compile" else None,
        k=args.k if worker == "compile" else None,
        seq_len=args.seq_len if worker == "compile" else None,
        backend=args.backend if worker == "compile" else None,
    )
    write = markdown_compile if worker == "compile" else markdown_tiny
    print(write(save(path, args, row, write)))


def save(path: Path, args, data: dict, write) -> dict:
    import os

    data = {**data, "seconds": time.time() - args.started}  # this invocation's, so far
    machine = args.machine
    result = save_json(
        path,
        {
            "machine": machine,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "threads": args.threads,
            "batch": args.batch,
            "k": args.k,
            **data,
            "load_average_end": os.getloadavg(),
            "time_model": time_model_record(),
        },
        "step_time",
    )
    path.with_suffix(".md").write_text(md_header(result["produced_by"]) + write(result))
    return result


def time_model_record() -> dict:
    """Which time model predicted: this checkout's commit and its constants."""
    from lib.results import git

    return {"commit": git("rev-parse", "--short", "HEAD") or "unknown", "attention_backward": ATTENTION_BACKWARD}


def replot(path: Path, mode: str) -> None:
    """The saved measurements with the current time model's predictions (recorded in ``time_model``)."""
    result = json.loads(path.read_text())
    if mode == "proportional":
        for r in result["rows"]:
            r["predicted"] = predict(SCALED[r["shape"]][0], r["batch"], r["k"], r["seq_len"], r["lora"])
    elif mode == "tiny":
        result["predicted"] = tiny_predicted(result)
    elif mode == "compile":
        s = result["shape"]
        shape = Shape(s["hidden"], s["layers"], s["heads"], s["kv_heads"], s["intermediate"], s["vocab"])
        result["predicted"] = predict(shape, result["batch"], result["k"], result["seq_len"], True)
    result["time_model"] = time_model_record()
    result = save_json(path, result, "step_time")
    write = {"proportional": markdown_proportional, "compile": markdown_compile, "tiny": markdown_tiny}[mode]
    path.with_suffix(".md").write_text(md_header(result["produced_by"]) + write(result))
    print(write(result))


def real_predictions(batch: int, k: int) -> list[dict]:
    """The time model's ratios to accumulation for the real Llamas, LoRA (q, v) and full, T 512-8192."""
    rows = []
    for name, shape in REAL.items():
        for lora in (True, False):
            for seq_len in (512, 2048, 8192):
                rows.append(
                    {
                        "model": name,
                        "lora": lora,
                        "seq_len": seq_len,
                        "proportions": proportions(shape, seq_len),
                        "predicted": predict(shape, batch, k, seq_len, lora),
                    }
                )
    return rows


def real_predictions_markdown(result: dict) -> str:
    lines = [
        "# The time model at real Llama shapes (`benchmarks/step_time.py --model-only`)",
        "",
        f"Computed, not measured: B = {result['batch']}, k = {result['k']}, LoRA r = 8 on q, v. "
        + time_model_line(result)
        + " Checked against measured steps in `step_time.md`, `step_time_compile.md` and `step_time_tiny.md`.",
        "",
    ]
    lines += table_head(
        "model",
        "tuning",
        "T",
        "head / one layer / attention share",
        "default / accum",
        "ideal / accum",
        "random k / accum",
        "default / ideal",
    )
    for r in result["rows"]:
        p, s = r["predicted"], r["proportions"]
        lines.append(
            f"| {r['model']} | {'LoRA' if r['lora'] else 'full'} | {r['seq_len']} | {s['head']:.1%} / "
            f"{s['one_layer']:.1%} / {s['attention']:.1%} | {p['default']:.2f} | {p['ideal']:.2f} | "
            f"{p['random_k']:.2f} | {p['default'] / p['ideal']:.2f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
