"""Exact per-example gradients of a few Linear layers ("sketch modules"), from hooks.

For ``y = x W^T + b`` the gradient of example i's loss is ``sum_t dy[i, t]^T x[i, t]`` (and
``sum_t dy[i, t]`` for the bias): a batched matmul over what a forward hook saw and what autograd
gives for the layer's output, for any block of output rows (:func:`linear_grad_block`;
:mod:`coreset_optim.sketch.streaming` folds block after block into the compressed sketch). The pass
backpropagates the *sum* of per-example losses (so every example's gradient is unscaled), only as
far as the sketch modules: every other parameter is excluded from autograd for the pass, so
nothing below them is kept for backward, and ``torch.autograd.grad`` is used so no ``.grad`` is
touched.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
from torch import nn

from ..batching import LossFn, call_loss_fn, chunk_slices, index_batch, losses_in_chunks
from ..extensions import check_sketch_layers, extension_default_sketch_modules, sketch_pass_contexts

SketchSpec = Union[str, nn.Module, Sequence[Union[str, nn.Module]], None]


@dataclass
class SketchLayer:
    """One Linear layer whose per-example gradient is part of the sketch."""

    name: str
    module: nn.Linear
    with_bias: bool
    params: list[torch.Tensor] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)


@dataclass
class BatchPass:
    """One pass over a batch, ``chunk_size`` examples at a time: what every pass of ``select()``
    (losses, sketch, target gradient) takes. ``layers``: the sketched Linear layers."""

    model: nn.Module
    layers: Sequence[SketchLayer]
    batch: Any
    loss_fn: LossFn
    num_examples: int
    chunk_size: int | None

    def on(self, batch: Any, num_examples: int) -> BatchPass:
        """The same pass over another batch (e.g. the held-out target)."""
        return BatchPass(self.model, self.layers, batch, self.loss_fn, num_examples, self.chunk_size)

    def losses(self) -> torch.Tensor:
        """``loss_fn`` chunk by chunk (no mode or grad switched: the caller decides)."""
        return losses_in_chunks(self.loss_fn, self.batch, self.num_examples, self.chunk_size)

    def chunks(self) -> Iterator[tuple[slice, list[LayerCalls], torch.Tensor]]:
        """:func:`captured_chunks` of this pass (inside ``sketch_mode(model, layers)``, grad on)."""
        return captured_chunks(self)


def sketch_params(layers: Sequence[SketchLayer]) -> list[torch.Tensor]:
    """The sketched parameters, in the order their gradients sit side by side in a sketch row."""
    return [p for t in layers for p in t.params]


def _trained_param_ids(optimizer: torch.optim.Optimizer) -> set[int]:
    return {id(p) for group in optimizer.param_groups for p in group["params"] if p.requires_grad}


def default_sketch_modules(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The last ``nn.Linear`` (in ``named_modules()`` order) whose weight the optimizer trains.

    A registered :class:`~coreset_optim.extensions.ModelExtension` answers first: for a peft LoRA
    model, the last block's ``v_proj`` LoRA-B of each active adapter (CoLM's choice).
    """
    trained = _trained_param_ids(optimizer)
    named = extension_default_sketch_modules(model, trained)
    if named is not None:
        return named
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and id(module.weight) in trained:
            last = name
    if last is None:
        raise ValueError(
            "found no nn.Linear whose weight the optimizer trains; pass sketch_modules=[...] "
            "naming the Linear layer(s) to sketch"
        )
    return [last]


def resolve_sketch_modules(model: nn.Module, optimizer: torch.optim.Optimizer, spec: SketchSpec) -> list[SketchLayer]:
    """Turn names, regexes (full match) or modules into checked :class:`SketchLayer` s."""
    if spec is None:
        spec = default_sketch_modules(model, optimizer)
    if isinstance(spec, (str, nn.Module)):
        spec = [spec]
    if not isinstance(spec, Iterable):
        raise TypeError(
            f"sketch_modules must be a module name, a regex, a module or a list of them, got {type(spec).__name__}"
        )
    named = list(model.named_modules())
    by_id = {id(m): n for n, m in named}
    chosen: dict[str, nn.Module] = {}
    for item in spec:
        if isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError(
                    f"sketch_modules: module {type(item).__name__} is not a submodule of the "
                    "model; pass a module of the model or its name"
                )
            chosen.setdefault(by_id[id(item)], item)
        elif isinstance(item, str):
            matches = [(n, m) for n, m in named if n == item]
            if not matches:
                try:
                    pattern = re.compile(item)
                except re.error as exc:
                    raise ValueError(f"sketch_modules: {item!r} is not a valid regex: {exc}") from exc
                matches = [(n, m) for n, m in named if n and pattern.fullmatch(n)]
            if not matches:
                sample = ", ".join(n for n, m in named if isinstance(m, nn.Linear))[:300]
                raise ValueError(
                    f"sketch_modules: {item!r} matches no module name of the model; Linear layers are: {sample}"
                )
            for n, m in matches:
                chosen.setdefault(n, m)
        else:
            raise TypeError(f"sketch_modules entries must be names, regexes or modules, got {type(item).__name__}")
    if not chosen:
        raise ValueError(
            "sketch_modules is empty; name at least one Linear layer, or pass None for the default "
            "(the last Linear layer the optimizer trains)"
        )
    trained = _trained_param_ids(optimizer)
    layers = []
    for name, module in chosen.items():
        if not isinstance(module, nn.Linear):
            raise TypeError(
                f"sketch_modules: {name!r} is a {type(module).__name__}; only nn.Linear layers "
                "(including LoRA's lora_A/lora_B) can be sketched; name a Linear layer instead"
            )
        if id(module.weight) not in trained:
            raise ValueError(
                f"sketch_modules: the weight of {name!r} is not trained by the wrapped optimizer "
                "(not in its param_groups or requires_grad=False); sketch a trained layer"
            )
        with_bias = module.bias is not None and id(module.bias) in trained
        params = [module.weight] + ([module.bias] if with_bias else [])
        layers.append(SketchLayer(name, module, with_bias, params))
    check_sketch_layers(model, [t.name for t in layers])
    return layers


@dataclass
class LayerCalls:
    """What one sketch layer saw in a pass over some examples: its inputs and output gradients,
    one pair per call (a layer called twice in one forward, e.g. tied weights, adds its calls up)."""

    inputs: list[torch.Tensor]  # [n, ..., in] each
    grad_outputs: list[torch.Tensor]  # [n, ..., out] each

    @property
    def num_examples(self) -> int:
        return int(self.inputs[0].shape[0])


def linear_grad_block(
    calls: LayerCalls, rows: slice, with_bias: bool, out: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-example gradients of output rows ``rows`` of a Linear layer, float32:
    ``(weight[n, rows*in] flattened row-major, bias[n, rows] or None)``.

    For ``y = x W^T + b``: example i's weight gradient is ``sum_t dy[i, t]^T x[i, t]``, its bias
    gradient ``sum_t dy[i, t]``; rows r0:r1 of them need only ``dy[..., r0:r1]``. ``out``: a
    contiguous float32 ``[n, rows*in]`` to write the weight gradients into (e.g. a slice of a
    block that holds several chunks of examples).
    """
    weight = bias = None
    for x, dy in zip(calls.inputs, calls.grad_outputs):
        n = x.shape[0]
        x3 = x.reshape(n, -1, x.shape[-1]).float()
        dy3 = dy.reshape(n, -1, dy.shape[-1])[..., rows].float()
        if weight is None:
            if out is None:
                out = torch.empty(n, dy3.shape[-1] * x3.shape[-1], dtype=torch.float32, device=x3.device)
            weight = out
            torch.bmm(dy3.transpose(1, 2), x3, out=out.view(n, dy3.shape[-1], x3.shape[-1]))
        else:
            weight.view(n, dy3.shape[-1], x3.shape[-1]).baddbmm_(dy3.transpose(1, 2), x3)
        if with_bias:
            b = dy3.sum(1)
            bias = b if bias is None else bias + b
    assert weight is not None
    return weight, bias


def linear_per_example_grads(
    inputs: Sequence[torch.Tensor], grad_outputs: Sequence[torch.Tensor], with_bias: bool
) -> torch.Tensor:
    """Per-example gradient of a whole Linear layer, flattened: Tensor[n, out*in (+ out)], float32.

    Holds the full ``[n, layer]`` tensor: for tests and analysis; ``select()`` folds blocks of it
    into the compressed sketch instead (:mod:`coreset_optim.sketch.streaming`).
    """
    weight, bias = linear_grad_block(LayerCalls(list(inputs), list(grad_outputs)), slice(None), with_bias)
    return weight if bias is None else torch.cat([weight, bias], dim=1)


@contextlib.contextmanager
def sketch_mode(model: nn.Module, layers: Sequence[SketchLayer]) -> Iterator[None]:
    """Eval mode, and autograd limited to the sketch parameters; everything restored afterwards.

    Every registered extension's sketch-pass context is entered too (the built-in one switches
    gradient checkpointing and input-require-grads hooks off, :mod:`coreset_optim.extensions`).
    """
    keep = {id(p) for t in layers for p in t.params}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p in frozen:
            p.requires_grad_(False)
        model.eval()
        with sketch_pass_contexts(model):
            yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for m, training in modes:
            m.training = training


def _capture(layers: Sequence[SketchLayer]):
    """Forward hooks that record each sketch layer's ``(input, output)``.

    The hook is excluded from ``torch.compile`` (a graph break at the sketch layer): traced into a
    compiled graph, the recorded output would be an intermediate of that graph, not the tensor the
    loss was computed from, and its gradient would come back unused (zero sketches, no error).
    At the break the output is a real tensor that the rest of the forward takes as input. The hooks
    exist only during the sketch pass, so the breaks are in the graphs dynamo compiles for it (the
    training step's graphs differ from those by the parameters the pass freezes)."""
    records: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in layers]

    def make_hook(slot):
        @torch.compiler.disable
        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"sketch module {layers[slot].name!r} returned a non-tensor")
            records[slot].append((args[0].detach(), output))

        return hook

    handles = [t.module.register_forward_hook(make_hook(i)) for i, t in enumerate(layers)]
    return records, handles


def _compile_hint() -> str:
    """What to do when the hooks did not run because a compiled graph skipped them."""
    if not getattr(torch._dynamo.config, "skip_nnmodule_hook_guards", False):
        return ""
    return (
        " (or, under torch.compile, a graph compiled before the sketch hooks existed was reused: "
        "torch._dynamo.config.skip_nnmodule_hook_guards is True, so that graph does not check for "
        "hooks; set it to False before the compiled model first runs)"
    )


def captured_chunks(batch_pass: BatchPass) -> Iterator[tuple[slice, list[LayerCalls], torch.Tensor]]:
    """For each chunk of the pass's examples: ``(examples, per-layer LayerCalls, losses[n])``.

    One forward and one backward of the chunk's summed finite losses, stopping at the sketch
    layers (:func:`sketch_mode`); a non-finite loss contributes nothing. Each chunk's autograd
    graph is freed before the next one starts. Must be consumed inside ``sketch_mode(model, layers)``
    with grad enabled.
    """
    layers = batch_pass.layers
    for piece in chunk_slices(batch_pass.num_examples, batch_pass.chunk_size):
        n = piece.stop - piece.start
        records, handles = _capture(layers)
        try:
            losses = call_loss_fn(batch_pass.loss_fn, index_batch(batch_pass.batch, piece), n)
        finally:
            for h in handles:
                h.remove()
        finite = torch.isfinite(losses)
        outputs = [out for rec in records for _, out in rec]
        if not outputs:
            raise ValueError(
                "the sketch modules were not called by loss_fn; sketch layers that the model's forward uses"
                + _compile_hint()
            )
        if not losses.requires_grad or any(not o.requires_grad for o in outputs):
            raise ValueError(
                "loss_fn's losses do not depend on the sketch modules through autograd; "
                "do not run the model under torch.no_grad() inside loss_fn"
            )
        total = torch.where(finite, losses, torch.zeros_like(losses)).sum()
        grads = torch.autograd.grad(total, outputs, allow_unused=True)
        grads = [torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grads)]
        calls, pos = [], 0
        for layer, rec in zip(layers, records):
            if not rec:
                raise ValueError(f"sketch module {layer.name!r} was not called by loss_fn" + _compile_hint())
            if rec[0][0].shape[0] != n:
                raise ValueError(
                    f"sketch module {layer.name!r} saw a leading dimension of "
                    f"{rec[0][0].shape[0]} for {n} examples; its inputs must be batch-first"
                )
            calls.append(LayerCalls([x for x, _ in rec], list(grads[pos : pos + len(rec)])))
            pos += len(rec)
        losses = losses.detach()
        del records, outputs, grads, total, rec  # rec: the last layer's (input, output), e.g. the logits
        yield piece, calls, losses
        del calls, losses  # not alive through the next chunk's pass (the consumer may have let go)


def exact_sketches(
    model: nn.Module,
    layers: Sequence[SketchLayer],
    batch: Any,
    loss_fn: LossFn,
    num_examples: int,
    chunk_size: int | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole per-example gradients of the sketch parameters and the per-example losses.

    Returns ``(sketches[B, D] float32, losses[B])``: a ``[B, layer size]`` tensor, for tests and
    analysis only (``select()`` uses :func:`coreset_optim.sketch.streaming.compressed_sketches`, which
    never holds it). Rows of examples whose loss is not finite are NaN. The model's ``.grad``
    fields, train/eval modes and ``requires_grad`` flags are unchanged.
    """
    sketch_rows, loss_rows = [], []
    with sketch_mode(model, layers), torch.enable_grad():
        for _, calls, losses in captured_chunks(BatchPass(model, layers, batch, loss_fn, num_examples, chunk_size)):
            parts = [linear_per_example_grads(c.inputs, c.grad_outputs, t.with_bias) for t, c in zip(layers, calls)]
            rows = torch.cat(parts, dim=1)
            finite = torch.isfinite(losses)[:, None].to(rows.device)
            sketch_rows.append(torch.where(finite, rows, torch.full_like(rows, float("nan"))))
            loss_rows.append(losses)
    return torch.cat(sketch_rows), torch.cat(loss_rows)
