"""``CoresetOptimizer``: a torch.optim wrapper that trains each step on a weighted coreset.

The class does bookkeeping (options, delegation, state); the math lives in free functions:
:mod:`.sketch` (per-example gradients), :mod:`.normalize` (Adam's scaling), :mod:`.selection`
(compress, similarity, greedy, weights) and :func:`backward_weighted` below.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .batching import batch_size
from .budget import small_sources, sources_kept_whole
from .config import CoresetConfig
from .coreset import Coreset, SourceCount
from .distributed import LocalBatch, Shards, batch_layout, comm_device, paused_gradient_sync
from .loss import LossFn, losses_in_chunks
from .normalize import normalize_sketches
from .presets import FROM_PRESET, resolve_preset
from .selection import SELECTORS, Selection, select_from_sketches, take_every_valid
from .sketch import SketchSpec, Sketches, resolve_sketch_modules, sketch_mode, sketch_params
from .streaming import DEFAULT_BLOCK_BYTES, compressed_sketches, summed_gradients, target_sketches
from .target import batch_fingerprint, check_target_structure, mean_target_gradient, step_sizes
from .zeroth_order import fixed_direction, sketch_numel, zeroth_order_sketches

_STATE_KEY = "coreset_optim"


def encode_sources(values: Sequence[Any] | None, size: int) -> tuple[torch.Tensor, list[Any]]:
    """Integer codes (in order of first appearance) and the source names they stand for."""
    if values is None:
        return torch.zeros(size, dtype=torch.long), ["all"]
    names: dict[Any, int] = {}
    codes = [names.setdefault(v, len(names)) for v in values]
    return torch.tensor(codes, dtype=torch.long), list(names)


def _check_loss_scale(loss_scale: Any) -> None:
    """A finite, non-zero number (or a tensor, not checked: that would synchronize the device)."""
    if isinstance(loss_scale, torch.Tensor):
        return
    if isinstance(loss_scale, bool) or not isinstance(loss_scale, (int, float)):
        raise TypeError(f"loss_scale must be a float, got {type(loss_scale).__name__}")
    if not math.isfinite(loss_scale) or loss_scale == 0:
        raise ValueError(f"loss_scale must be a finite, non-zero number, got {loss_scale}")


@contextlib.contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the seconds the block takes to ``timings[stage]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


class CoresetOptimizer(torch.optim.Optimizer):
    """Wraps a torch optimizer; ``select(batch, loss_fn)`` backpropagates a weighted coreset.

    ``param_groups``, ``state``, ``defaults``, ``step``, ``zero_grad``, ``add_param_group`` and the
    state dict belong to the wrapped optimizer, so LR schedulers and checkpoints work unchanged.
    The wrapped optimizer's per-parameter state is only ever read.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        coreset_size: int | None = None,
        coreset_ratio: float | None = None,
        sketch_modules: SketchSpec = None,
        sketch_dim: int = FROM_PRESET,
        normalize: str | None = FROM_PRESET,
        similarity: str = FROM_PRESET,
        keep_sources: Any = FROM_PRESET,
        source_key: str | None = None,
        sketch_batch_size: int | None = None,
        sketch_block_bytes: int = DEFAULT_BLOCK_BYTES,
        micro_batch_size: int | None = None,
        seed: int = 0,
        sketch: str = FROM_PRESET,
        selection: str = FROM_PRESET,
        temperature: float = FROM_PRESET,
        zo_eps: float = 1e-3,
        zo_probes: int = 1,
        zo_fixed_direction: bool = FROM_PRESET,
        preset: str = "default",
        distributed: Any = "auto",
        process_group: Any = None,
        target_curvature: float = 0.0,
        target_refresh: int = 1,
        target_per_source: bool = False,
    ) -> None:
        if isinstance(optimizer, CoresetOptimizer):
            raise TypeError("optimizer is already a CoresetOptimizer; wrap the inner optimizer once")
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer (e.g. torch.optim.AdamW or a "
                f"bitsandbytes optimizer), got {type(optimizer).__name__}"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be the torch.nn.Module being trained, got {type(model).__name__}")
        chosen = resolve_preset(
            preset,
            dict(
                sketch_dim=sketch_dim,
                normalize=normalize,
                similarity=similarity,
                keep_sources=keep_sources,
                sketch=sketch,
                selection=selection,
                zo_fixed_direction=zo_fixed_direction,
                temperature=temperature,
            ),
        )
        self.config = CoresetConfig(
            coreset_size=coreset_size,
            coreset_ratio=coreset_ratio,
            source_key=source_key,
            sketch_batch_size=sketch_batch_size,
            sketch_block_bytes=sketch_block_bytes,
            micro_batch_size=micro_batch_size,
            seed=seed,
            zo_eps=zo_eps,
            zo_probes=zo_probes,
            **chosen,
            distributed=distributed,
            target_curvature=target_curvature,
            target_refresh=target_refresh,
            target_per_source=target_per_source,
        )
        self.process_group = process_group  # None: the default group (not saved in checkpoints)
        self.optimizer = optimizer
        self.model = model
        self.sketch_targets = resolve_sketch_modules(model, optimizer, sketch_modules)
        self.generator = torch.Generator().manual_seed(seed)
        self.num_selections = 0
        self.num_steps = 0
        self.target: Any = None  # the held-out batch of selection="target" (set_target)
        self._target_fingerprint: str | None = None
        # The target's mean sketch gradient, reused for ``target_refresh`` selections; checkpointed.
        self._target_cache: dict | None = None
        # What torch.optim.Optimizer.__init__ would create, so hooks and schedulers work.
        self._optimizer_step_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict = OrderedDict()

    # --- delegation to the wrapped optimizer -------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict) -> None:
        self.optimizer.defaults = value

    def __getattr__(self, name: str):
        """Anything else the wrapped optimizer offers (e.g. schedule-free's ``train()``/``eval()``)."""
        if name == "optimizer" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    def __getstate__(self) -> dict:
        return self.__dict__

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        c = self.config
        size = f"coreset_size={c.coreset_size}" if c.coreset_size else f"coreset_ratio={c.coreset_ratio}"
        modules = [t.name for t in self.sketch_targets]
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"{type(self).__name__}({size}, sketch_modules={modules}, sketch_dim={c.sketch_dim}, "
            f"normalize={c.normalize!r}, similarity={c.similarity!r}, "
            f"keep_sources={c.keep_sources!r}, sketch={c.sketch!r}, selection={c.selection!r}) wrapping\n{inner}"
        )

    @torch.no_grad()
    def step(self, closure=None):
        """Step the wrapped optimizer on the gradients ``select()`` accumulated."""
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self.num_steps += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    # Hooks go to the wrapped optimizer, whose step()/state_dict() run them (this class does not
    # call Optimizer.__init__, so hooks kept here would silently never run).
    def register_step_pre_hook(self, hook):
        return self.optimizer.register_step_pre_hook(hook)

    def register_step_post_hook(self, hook):
        return self.optimizer.register_step_post_hook(hook)

    def register_state_dict_pre_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_state_dict_pre_hook(hook, prepend=prepend)

    def register_state_dict_post_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_state_dict_post_hook(hook, prepend=prepend)

    def register_load_state_dict_pre_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_load_state_dict_pre_hook(hook, prepend=prepend)

    def register_load_state_dict_post_hook(self, hook, prepend: bool = False):
        return self.optimizer.register_load_state_dict_post_hook(hook, prepend=prepend)

    def state_dict(self) -> dict:
        """The wrapped optimizer's state dict plus this wrapper's own (options, counters, RNG)."""
        sd = self.optimizer.state_dict()
        sd[_STATE_KEY] = {
            "config": self.config.to_dict(),
            "sketch_modules": [t.name for t in self.sketch_targets],
            "num_selections": self.num_selections,
            "num_steps": self.num_steps,
            "rng_state": self.generator.get_state(),
            "target_cache": None
            if self._target_cache is None
            else {
                "fingerprint": self._target_cache["fingerprint"],
                "grad": self._target_cache["grad"].detach().cpu().clone(),
                "computed_at": self._target_cache["computed_at"],
            },
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from :meth:`state_dict` (or a plain one of the wrapped optimizer)."""
        state_dict = dict(state_dict)
        own = state_dict.pop(_STATE_KEY, None)
        config = None
        if own is not None:
            config = CoresetConfig(**own["config"])
            names = own["sketch_modules"]
            targets = self.sketch_targets
            if names != [t.name for t in targets]:
                targets = resolve_sketch_modules(self.model, self.optimizer, names)
        self.optimizer.load_state_dict(state_dict)
        if own is not None:
            self.config, self.sketch_targets = config, targets
            self.num_selections = int(own["num_selections"])
            self.num_steps = int(own["num_steps"])
            self.generator.set_state(own["rng_state"])
            cache = own.get("target_cache")
            self._target_cache = None if cache is None else dict(cache)

    # --- selection ----------------------------------------------------------------------------
    def _source_values(self, batch: Any, size: int, sources: Any) -> list | None:
        if sources is None and self.config.source_key is not None:
            key = self.config.source_key
            if not isinstance(batch, Mapping) or key not in batch:
                raise ValueError(
                    f"source_key={key!r} is not a key of the batch; add the source ids to the "
                    "batch under that key, pass sources=..., or set source_key=None"
                )
            sources = batch[key]
        if sources is None:
            return None
        if isinstance(sources, torch.Tensor):
            sources = sources.tolist()
        elif hasattr(sources, "tolist"):
            sources = sources.tolist()
        if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence):
            raise TypeError(f"sources must be a list or 1-D tensor of source ids, got {type(sources).__name__}")
        if len(sources) != size:
            raise ValueError(
                f"sources has {len(sources)} entries for a batch of {size} examples; give one source id per example"
            )
        return list(sources)

    def _keep_mask(self, names: list, counts: list[int], budget: int) -> list[bool]:
        keep = self.config.keep_sources
        if keep is None:
            return [False] * len(names)
        if keep == "auto":
            return small_sources(counts, budget)
        return [name in keep for name in names]

    def select(
        self,
        batch: Any,
        loss_fn: LossFn,
        *,
        sources: Any = None,
        loss_scale: float = 1.0,
        model: nn.Module | None = None,
        target: Any = None,
    ) -> Coreset:
        """Choose a weighted coreset of ``batch`` and backpropagate only its examples.

        Afterwards every trained parameter's ``.grad`` has grown by
        ``loss_scale * sum_j w_j * grad(loss_j) / N`` (N: valid examples in the batch).
        ``loss_fn(sub_batch)`` must return one loss per example of ``sub_batch``.
        Under torch.distributed the coreset is chosen from the global batch of all ranks and N is
        its valid count; see ``docs/distributed.md``. ``model``: the module ``loss_fn`` runs when
        it wraps the one given at construction (e.g. the DDP wrapper Trainer or Accelerate create
        after the optimizer), so select() can pause its gradient sync. ``target``: held-out
        examples for ``selection="target"`` (this call only; :meth:`set_target` sets them for all).

        One pipeline for one process and many: sketch -> normalize -> gather -> choose ->
        backward. ``layout`` does the communication (identity gather and local backward in one
        process, :mod:`.distributed`); when the budget covers the batch, the sketch stage computes
        losses only and the choose stage takes every valid example. ``selection="target"`` adds
        one stage before sketch: the target's mean gradient, with which the sketch stage folds
        each example's alignment (and its update) instead of a compressed sketch.
        """
        start = time.perf_counter()
        wrapper = self._check_select_call(loss_fn, loss_scale, model)
        size = batch_size(batch)
        codes, names = encode_sources(self._source_values(batch, size, sources), size)
        aim = self._resolve_target(batch, target)
        layout = batch_layout(size, codes, names, self.config.distributed, self.process_group)
        budget = self.config.budget(layout.total)
        take_all = budget >= layout.total
        timings: dict[str, float] = {}
        target_grad = None
        if aim is not None and not take_all:
            with timed(timings, "target"):
                target_grad = self._aim(*aim, loss_fn, wrapper, layout, budget)
        with timed(timings, "sketch"), paused_gradient_sync(wrapper):
            raw = self._sketch(
                batch, loss_fn, size, budget, gradients=not take_all, layout=layout, target_grad=target_grad
            )
        with timed(timings, "normalize"):
            local = self._normalize(raw)
        sketches = layout.gather(local, self._gather_dim(local), timings)
        self._require_valid(sketches, raw)
        choose = self._take_all if take_all else self._choose
        selection, kept, num_valid = choose(sketches, layout, budget)
        timings.update(selection.timings)
        with timed(timings, "backward"):
            share = layout.backward(
                batch,
                selection.indices,
                selection.weights,
                loss_fn,
                num_valid / loss_scale,
                self.config.micro_batch_size,
                wrapper,
                sketches.valid,
            )
        self.num_selections += 1
        timings["total"] = time.perf_counter() - start
        return self._coreset(layout, sketches, selection, kept, num_valid, share, loss_scale, timings)

    # --- the stages of select() ----------------------------------------------------------------
    def _coreset(
        self,
        layout: LocalBatch | Shards,
        sketches: Sketches,
        selection: Selection,
        kept: list[bool],
        num_valid: int,
        share: tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor],
        loss_scale: Any,
        timings: dict[str, float],
    ) -> Coreset:
        """The :class:`Coreset` of one selection; ``share``: :meth:`backward`'s ``(sub_batch,
        local indices, local weights, loss)``."""
        sub_batch, local_indices, local_weights, loss = share
        names = layout.names  # under torch.distributed: the global batch's sources
        in_batch = torch.bincount(layout.codes, minlength=len(names)).tolist()
        flag = getattr(SELECTORS[self.config.selection], "suspects", None)
        suspects = (
            None
            if flag is None
            else flag(selection.compressed, sketches.losses, sketches.valid, layout.codes, len(names))
        )
        return Coreset(
            indices=selection.indices,
            weights=selection.weights,
            batch=sub_batch,
            sketches=selection.compressed,
            losses=sketches.losses,
            source_counts={
                n: SourceCount(in_batch[i], selection.selected_per_source[i], kept[i]) for i, n in enumerate(names)
            },
            num_valid=num_valid,
            num_invalid=layout.total - num_valid,
            loss=loss / loss_scale,  # the weighted loss backpropagated, without the scale
            timings=timings,
            local_indices=local_indices,
            local_weights=local_weights,
            rank_sizes=layout.sizes,
            suspects=suspects,
        )

    def _check_select_call(self, loss_fn: LossFn, loss_scale: Any, model: Any) -> nn.Module:
        """The module whose gradient sync select() pauses; TypeError/ValueError on bad arguments."""
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (batch -> Tensor[n]), got {type(loss_fn).__name__}")
        _check_loss_scale(loss_scale)
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be the torch.nn.Module loss_fn runs (or None), got {type(model).__name__}")
        return self.model if model is None else model

    def _sketch(
        self,
        batch: Any,
        loss_fn: LossFn,
        size: int,
        budget: int,
        gradients: bool = True,
        layout: LocalBatch | Shards | None = None,
        target_grad: torch.Tensor | None = None,
    ) -> Sketches:
        """This process's sketches ``[B, d]`` and losses; ``valid``: both finite.

        Exact and projected sketches come out Adam-normalized and compressed, built block by
        block (:mod:`.streaming`: no ``[B, layer size]`` tensor exists); ``layout``'s sources
        choose the top coordinates, and under torch.distributed the ranks agree on them while
        streaming (``None``: one source). ``selection="target"``: each example's ``[alignment |
        update]`` row against ``target_grad``, built the same way (:func:`.streaming.target_sketches`).
        Zeroth-order sketches come out raw, for the normalize stage. ``gradients=False`` (or a
        chooser that reads no sketch: random, loss, trimmed_loss): losses only, d = 0.
        """
        c = self.config
        chunk = c.sketch_batch_size or c.micro_batch_size or budget
        if not gradients or not getattr(SELECTORS[c.selection], "needs_sketch", True):
            losses = self._losses_without_grad(batch, loss_fn, size, chunk)
            rows = torch.empty(size, 0, device=losses.device)
        elif c.sketch == "zeroth_order":
            numel = sketch_numel(self.sketch_targets)
            if c.zo_fixed_direction:
                directions = fixed_direction(numel, c.seed)[None, :]
            else:
                directions = torch.randn(c.zo_probes, numel, generator=self.generator)
            rows, losses = zeroth_order_sketches(
                self.model,
                self.sketch_targets,
                batch,
                loss_fn,
                size,
                chunk,
                eps=c.zo_eps,
                directions=directions,
            )
        elif c.selection == "target":
            assert target_grad is not None
            params = sketch_params(self.sketch_targets)
            return Sketches(
                *target_sketches(
                    self.model,
                    self.sketch_targets,
                    batch,
                    loss_fn,
                    size,
                    chunk,
                    optimizer=self.optimizer,
                    normalize=c.normalize,
                    target_grad=target_grad,
                    step_sizes=step_sizes(self.optimizer, params),
                    curvature=c.target_curvature,
                    dim=c.sketch_dim,
                    seed=c.seed,
                    block_bytes=c.sketch_block_bytes,
                )
            )
        else:
            codes = torch.zeros(size, dtype=torch.long) if layout is None else layout.local_codes
            return Sketches(
                *compressed_sketches(
                    self.model,
                    self.sketch_targets,
                    batch,
                    loss_fn,
                    size,
                    chunk,
                    optimizer=self.optimizer,
                    normalize=c.normalize,
                    sketch=c.sketch,
                    dim=c.sketch_dim,
                    seed=c.seed,
                    source_codes=codes,
                    num_sources=1 if layout is None else len(layout.names),
                    block_bytes=c.sketch_block_bytes,
                    agreement=None if layout is None else layout.agreement(),
                )
            )
        valid = torch.isfinite(losses).to(rows.device) & torch.isfinite(rows).all(1)
        return Sketches(rows, losses, valid)

    def _normalize(self, raw: Sketches) -> Sketches:
        """Zeroth-order rows as Adam will scale them; rows the normalization makes non-finite
        become invalid. Exact and projected sketches were normalized while streaming."""
        rows = raw.rows
        if rows.shape[1] == 0 or self.config.sketch != "zeroth_order":
            return raw
        rows = normalize_sketches(rows, self.optimizer, sketch_params(self.sketch_targets), self.config.normalize)
        return Sketches(rows, raw.losses, raw.valid & torch.isfinite(rows).all(1))

    def _require_valid(self, sketches: Sketches, raw: Sketches) -> None:
        """ValueError, before any gradient is touched, when no example of the (global) batch is valid.

        Every rank sees the same gathered validity, so all raise together."""
        if not bool(sketches.valid.any()):
            lost = bool(raw.valid.any())  # valid before normalization: Adam's scaling made them NaN
            raise ValueError(
                self._no_valid_message(int(sketches.valid.numel())) + (" (after Adam normalization)" if lost else "")
            )

    def _source_counts(self, sketches: Sketches, layout: LocalBatch | Shards) -> list[int]:
        """Valid examples per source of the (global) batch."""
        return torch.bincount(layout.codes[sketches.valid.cpu()], minlength=len(layout.names)).tolist()

    def _choose(
        self, sketches: Sketches, layout: LocalBatch | Shards, budget: int
    ) -> tuple[Selection, list[bool], int]:
        """The configured selector on the gathered sketches (run on the first rank, shared);
        returns the selection, the sources kept whole and the number of valid examples."""
        counts = self._source_counts(sketches, layout)
        keep = self._keep_mask(layout.names, counts, budget)
        c = self.config
        extra = {"losses": sketches.losses, "generator": self.generator}
        groups, num_groups, group_keep = layout.codes, len(layout.names), keep
        if c.selection == "target":
            extra.update(curvature=c.target_curvature, total=sum(counts))
            if not c.target_per_source:  # one greedy over the whole batch, no per-source budgets
                groups, num_groups, group_keep = torch.zeros_like(layout.codes), 1, [False]
        selection = layout.on_first_rank(select_from_sketches)(
            sketches.rows,
            sketches.valid,
            groups,
            num_groups,
            budget,
            group_keep,
            self._gather_dim(sketches),
            c.similarity,
            method=c.selection,
            extra=extra,
            temperature=c.temperature,
        )
        if groups is not layout.codes:  # count the picks per source
            per_source = torch.bincount(layout.codes[selection.indices.cpu()], minlength=len(layout.names)).tolist()
            return dataclasses.replace(selection, selected_per_source=per_source), [False] * len(counts), sum(counts)
        kept = sources_kept_whole(counts, budget, keep) if c.temperature == 1.0 else [False] * len(counts)
        return selection, kept, sum(counts)

    def _gather_dim(self, sketches: Sketches) -> int:
        """Columns kept by compression: ``sketch_dim``, or all of the target stage's features."""
        return sketches.rows.shape[1] if self.config.selection == "target" else self.config.sketch_dim

    # --- the target of selection="target" -------------------------------------------------------
    def set_target(self, target: Any) -> None:
        """The held-out examples ``selection="target"`` aims at (``None`` to clear).

        A batch like the training batches (same fields; the source field may be absent), small
        enough for one sketch pass in ``sketch_batch_size`` chunks. Not saved in checkpoints (it is
        data): set it again after loading; the cached target gradient is kept when it is the same.
        """
        if target is None:
            self.target, self._target_fingerprint = None, None
            return
        self._check_target_mode()
        batch_size(target)  # a clear error for an empty or malformed batch
        self.target, self._target_fingerprint = target, batch_fingerprint(target)

    def _check_target_mode(self) -> None:
        if self.config.selection != "target":
            raise ValueError(
                f"a target is only used by selection='target' (this optimizer has selection="
                f"{self.config.selection!r}); build CoresetOptimizer(..., selection='target')"
            )

    def _resolve_target(self, batch: Any, target: Any) -> tuple[Any, str, list[str]] | None:
        """The target this selection aims at, its fingerprint and the batch fields it lacks;
        checked before anything runs."""
        if target is not None:
            self._check_target_mode()
            batch_size(target)
            fingerprint = batch_fingerprint(target)
        elif self.config.selection == "target":
            if self.target is None:
                raise ValueError(
                    "selection='target' needs held-out target examples: call "
                    "optimizer.set_target(batch) once, or pass select(..., target=batch)"
                )
            target, fingerprint = self.target, self._target_fingerprint
        else:
            return None
        return target, fingerprint, check_target_structure(batch, target, self.config.source_key)

    def _aim(
        self,
        target: Any,
        fingerprint: str,
        missing: list[str],
        loss_fn: LossFn,
        wrapper: nn.Module,
        layout: LocalBatch | Shards,
        budget: int,
    ) -> torch.Tensor:
        """The target stage: the target's mean sketch gradient, which the sketch stage aligns each
        example's update with (:func:`.streaming.target_sketches`)."""
        c = self.config
        chunk = c.sketch_batch_size or c.micro_batch_size or budget
        try:
            grad = self._target_gradient(target, fingerprint, loss_fn, wrapper, getattr(layout, "group", None), chunk)
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            if not missing:
                raise
            raise ValueError(
                f"loss_fn failed on the target ({type(exc).__name__}: {exc}); the target lacks the "
                f"batch's fields {missing}: give it the fields loss_fn reads"
            ) from exc
        return grad

    def _target_gradient(
        self, target: Any, fingerprint: str, loss_fn: LossFn, wrapper: nn.Module, group: Any, chunk: int
    ) -> torch.Tensor:
        """The target's mean sketch gradient (over every rank's target), recomputed every
        ``target_refresh`` selections or when the target changes; the ranks decide together."""
        cache = self._target_cache
        stale = int(
            cache is None
            or cache["fingerprint"] != fingerprint
            or self.num_selections - cache["computed_at"] >= self.config.target_refresh
        )
        if group is not None:
            flag = torch.tensor([stale], device=comm_device(group, torch.device("cpu")))
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
            stale = int(flag.item())
        if not stale:
            return cache["grad"]
        size = batch_size(target)
        with paused_gradient_sync(wrapper):
            summed, finite = summed_gradients(
                self.model, self.sketch_targets, target, loss_fn, size, chunk, self.config.sketch_block_bytes
            )
        if group is None:
            grad = mean_target_gradient(summed, finite)
        else:
            # Sum and count over the ranks' targets (identical targets give their own mean).
            counts = torch.tensor([float(size), float((~finite).sum())], dtype=torch.double, device=summed.device)
            packed = torch.cat([summed.double(), counts]).to(comm_device(group, summed.device))
            dist.all_reduce(packed, group=group)
            if packed[-1] > 0:
                raise ValueError(
                    f"{int(packed[-1])} target example(s) over the ranks have a non-finite loss or "
                    "gradient; fix or drop them (the target must be clean held-out examples)"
                )
            grad = (packed[:-2] / packed[-2]).float().to(summed.device)
        self._target_cache = {"fingerprint": fingerprint, "grad": grad, "computed_at": self.num_selections}
        return grad

    def _take_all(
        self, sketches: Sketches, layout: LocalBatch | Shards, budget: int
    ) -> tuple[Selection, list[bool], int]:
        """The shortcut when the budget covers the batch: every valid example, weight 1."""
        counts = self._source_counts(sketches, layout)
        return take_every_valid(sketches.rows, sketches.valid, counts), [False] * len(counts), sum(counts)

    def _losses_without_grad(self, batch: Any, loss_fn: LossFn, size: int, chunk: int) -> torch.Tensor:
        """Per-example losses in eval mode, ``chunk`` examples per call (the coreset size unless
        ``sketch_batch_size``/``micro_batch_size`` say otherwise): the pass over the large batch
        never holds more activations than a forward of the coreset does."""
        with sketch_mode(self.model, []), torch.no_grad():
            return losses_in_chunks(loss_fn, batch, size, chunk)

    @staticmethod
    def _no_valid_message(size: int) -> str:
        return (
            f"no example of the batch of {size} has a finite loss and sketch; nothing was "
            "backpropagated. Check the data and the model for NaN/inf (e.g. a too-high learning rate)"
        )
