"""Shared set-up for the selection-quality benchmarks: tiny Llama, the synthetic mixture, eval."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

from coreset_optim.datasets.synthetic import VOCAB_SIZE, answer_losses

RESULTS = Path(__file__).resolve().parent / "results"


def results_dir(script: str) -> Path:
    """``benchmarks/results/<script>/``: every script's results go to a folder of their own."""
    return RESULTS / script


def _git(*args: str) -> str:
    try:
        out = subprocess.run(
            ["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def machine_summary() -> str:
    """One line: CPU model, cores, torch version, and the GPU when there is one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = re.search(r"model name\s*:\s*(.*)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        pass
    line = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}"
    if torch.cuda.is_available():
        line += f", GPU {torch.cuda.get_device_name()}"
    else:
        line += ", no GPU"
    return line


def provenance(script: str) -> dict:
    """Who wrote a result file: ``{"script", "commit", "date", "machine"}``. ``script`` is the
    benchmark's stem (``"depth"``); the commit is the checkout's HEAD (``+dirty`` when tracked
    files outside benchmarks/results differ from it), the date UTC."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if commit != "unknown" and _git(
        "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)benchmarks/results"
    ):
        commit += "+dirty"
    return {
        "script": f"benchmarks/{script}.py",
        "commit": commit,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": machine_summary(),
    }


def stamped(data: dict, script: str) -> dict:
    """``data`` with a top-level ``"produced_by"`` (:func:`provenance`) first; an existing one is
    kept (a replot of saved results does not re-date them)."""
    return {
        "produced_by": data.get("produced_by") or provenance(script),
        **{k: v for k, v in data.items() if k != "produced_by"},
    }


def md_header(produced_by: dict) -> str:
    """The first line of a result's markdown file: which script, commit, date and machine wrote it."""
    p = produced_by
    return f"<!-- written by {p['script']} at commit {p['commit']}, {p['date']}, {p['machine']} -->\n"


def unconstrained_matching(x, k, *, watch=None, **_):
    """Experiment only: GradMatch's raw NNLS weights (no count coordinate, no rescale to n), so
    the weights do NOT sum to the source's count: it measures what the coreset contract costs."""
    from coreset_optim.methods.gradient_matching import greedy_matching

    return greedy_matching(x, k, count_weight=0.0, rescale=False)


def select_whole_rows(wrapper, batch, loss_fn, rows, valid, losses, big: int, k: int):
    """select()'s choose and backward stages on rows built whole (the former path the bounded
    sketch replaced): the wrapper's method, budgets and generator; returns the selection."""
    from coreset_optim.batching import index_batch
    from coreset_optim.mixture.budget import keep_mask
    from coreset_optim.loss import backward_weighted
    from coreset_optim.mixture.choose import select_from_sketches
    from coreset_optim.mixture.sources import encode_sources

    codes, names = encode_sources(batch["source"], big)
    counts = torch.bincount(codes[valid], minlength=len(names)).tolist()
    keep = keep_mask(wrapper.config.keep_sources, names, counts, k)
    context = {"losses": losses, "generator": wrapper.generator, "total": sum(counts)}
    result = select_from_sketches(rows, valid, codes, len(names), k, keep, wrapper.selection, context=context)
    backward_weighted(index_batch(batch, result.indices), result.weights, loss_fn, sum(counts), None)
    return result


def register_experiments() -> None:
    """Register the benchmarks' experimental selection methods (here: unconstrained matching)."""
    from coreset_optim.methods.gradient_matching import GradientMatching
    from coreset_optim.methods.registry import register_method, METHODS

    if "gradient_matching_unconstrained" not in METHODS:
        choose = staticmethod(lambda x, k, **context: unconstrained_matching(x, k, **context))
        name = "gradient_matching_unconstrained"
        register_method(type("UnconstrainedMatching", (GradientMatching,), {"name": name, "choose": choose}))


def tiny_llama(seed: int, hidden: int = 64, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    model.config.use_cache = False
    return model


def make_loss_fn(model):
    def loss_fn(batch):
        logits = model(input_ids=batch["input_ids"]).logits
        return answer_losses(logits, batch["labels"])

    return loss_fn


class ActivationMeter:
    """Largest bytes saved for backward by one forward (parameters excluded)."""

    def __init__(self, model):
        self.params = {p.data_ptr() for p in model.parameters()}
        self.current = self.peak = 0

    def pack(self, t):
        if t.data_ptr() not in self.params:
            self.current += t.numel() * t.element_size()
        return t

    def wrap(self, loss_fn):
        def measured(batch):
            self.current = 0
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                out = loss_fn(batch)
            self.peak = max(self.peak, self.current)
            return out

        return measured


class BatchStream:
    """Large batches drawn uniformly (without replacement within an epoch) from the pool."""

    def __init__(self, train: dict, seed: int):
        self.train, self.n = train, train["input_ids"].shape[0]
        self.gen = torch.Generator().manual_seed(seed)
        self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0

    def next(self, size: int) -> dict:
        if self.pos + size > self.n:
            self.perm, self.pos = torch.randperm(self.n, generator=self.gen), 0
        idx = self.perm[self.pos : self.pos + size]
        self.pos += size
        return {k: v[idx] for k, v in self.train.items()}


@torch.no_grad()
def evaluate(model, mixture) -> dict:
    """Held-out loss per source and overall (weighted by the mixture's shares)."""
    was = model.training
    model.eval()
    per = {}
    for name, data in mixture.eval.items():
        logits = model(input_ids=data["input_ids"]).logits
        per[name] = float(answer_losses(logits, data["labels"]).mean())
    model.train(was)
    total = sum(mixture.shares)
    overall = sum(s * per[n] for n, s in zip(mixture.names, mixture.shares)) / total
    return {"overall": overall, "per_source": per}


def machine() -> dict:
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def save_json(path: Path, data: dict, script: str) -> Path:
    """``data`` with its ``"produced_by"`` (:func:`stamped`) as ``path`` (folders made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamped(data, script), indent=1))
    return path
