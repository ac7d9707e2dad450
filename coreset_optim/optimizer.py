"""``CoresetOptimizer``: a torch.optim wrapper that trains each step on a weighted coreset.

The class does bookkeeping (options, delegation, state); the selection method is an object
(:mod:`.methods.base`, registered by name in :mod:`.methods.registry`) that owns its passes and
its choose step; the math lives in free functions (:mod:`.sketch`, :mod:`.precondition`,
:mod:`.mixture`, :mod:`.loss`); the layout over the ranks is :mod:`.distributed`.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .batching import LossFn, batch_size, call_loss_fn, index_batch
from .checkpoints import STATE_KEY, WrapperState, read_wrapper_state, wrapper_state
from .config import CoresetConfig
from .distributed import batch_layout, init_fsdp_dtypes, paused_gradient_sync
from .loss import check_loss_scale
from .methods.base import SelectionContext, SelectionMethod, losses_only, unjudged
from .methods.registry import method_class, resolve_options, restore_method
from .mixture.budget import keep_mask, sources_kept_whole
from .mixture.choose import select_from_sketches, take_every_valid
from .mixture.sources import encode_sources, source_values
from .precondition.moments import has_second_moment
from .presets import DEFAULT_PRESET, FROM_PRESET
from .records import Coreset, Layout, Selection, Sketches, SourceCount
from .sketch.capture import BatchPass, SketchSpec, resolve_sketch_modules
from .timing import timed


def warn_if_raw_gradients(method: SelectionMethod, optimizer: torch.optim.Optimizer) -> None:
    """Warn when the method asks for Adam's normalization but no param group of the wrapped optimizer
    keeps an Adam second moment (SGD, Lion, ...): its sketches are then the raw gradients."""
    normalize = getattr(method, "normalize", None)
    if normalize is not None and not any(has_second_moment(g) for g in optimizer.param_groups):
        warnings.warn(
            f"{type(optimizer).__name__} keeps no Adam second moment, so normalize={normalize!r} selects on raw "
            "gradients; wrap an Adam-type optimizer (torch.optim.AdamW, bitsandbytes AdamW8bit, ...) to select on "
            "the update Adam will make, or pass normalize=None to say raw gradients are meant",
            UserWarning,
            stacklevel=3,
        )


def param_device(optimizer: torch.optim.Optimizer) -> torch.device:
    """Where the wrapped optimizer's first parameter lives (the device a pass's losses would be on)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            return p.device
    return torch.device("cpu")


def skipping_nonfinite(loss_fn: LossFn, skipped: list[tuple[int, torch.Tensor]]) -> LossFn:
    """``loss_fn`` for a coreset no pass judged: a call whose losses are not all finite is made
    again on its finite examples only, and the others get a constant 0 (a NaN or inf in the forward
    would reach every gradient, even at weight 0). Appends ``(examples in the call, positions left
    out)`` to ``skipped`` for such calls. One host read per call (the finiteness check)."""

    def call(batch: Any) -> torch.Tensor:
        size = batch_size(batch)
        losses = call_loss_fn(loss_fn, batch, size)
        finite = torch.isfinite(losses.detach())
        if bool(finite.all()):
            skipped.append((size, torch.zeros(0, dtype=torch.long)))
            return losses
        del losses  # its graph, before the second forward
        keep = torch.nonzero(finite).flatten()
        if keep.numel() == 0:
            raise ValueError(
                f"every one of the {size} examples of a micro-batch of the coreset has a non-finite loss; "
                "nothing of it was backpropagated. The selection makes no pass over the batch, so examples "
                "are not judged before they are drawn: check the data and the model for NaN/inf (e.g. a "
                "too-high learning rate)"
            )
        skipped.append((size, torch.nonzero(~finite).flatten().cpu()))
        again = call_loss_fn(loss_fn, index_batch(batch, keep), int(keep.numel()))
        return again.new_zeros(size).index_put((keep.to(again.device),), again)

    return call


def warn_skipped(method: SelectionMethod, local_indices: torch.Tensor, skipped: list[tuple[int, torch.Tensor]]) -> None:
    """RuntimeWarning naming the drawn examples (this process's batch rows) the backward left out
    for a non-finite loss; ``skipped`` is :func:`skipping_nonfinite`'s record, call by call, the
    drawn examples first (calls after them, e.g. a rank's zero-weight filler, are not drawn ones)."""
    offset, rows = 0, []
    for size, positions in skipped:
        rows += [offset + int(p) for p in positions if offset + int(p) < local_indices.numel()]
        offset += size
    if not rows:
        return
    batch_rows = local_indices.cpu()[rows].tolist()
    warnings.warn(
        f"select() left {len(rows)} of the {local_indices.numel()} drawn examples (batch rows {batch_rows}) "
        f"out of the backward: their loss is non-finite. selection={method.name!r} makes no pass over the "
        "batch, so examples are not judged before they are drawn; the others were backpropagated with "
        "their weights, so this step's gradient is short by the left-out share. Check the data for NaN/inf",
        RuntimeWarning,
        stacklevel=3,
    )


class CoresetOptimizer(torch.optim.Optimizer):
    """Wraps a torch optimizer; ``select(batch, loss_fn)`` backpropagates a weighted coreset.

    ``param_groups``, ``state``, ``defaults``, ``step``, ``zero_grad``, ``add_param_group`` and the
    state dict belong to the wrapped optimizer, so LR schedulers and checkpoints work unchanged.
    The wrapped optimizer's per-parameter state is only ever read.

    ``selection``: a :class:`~coreset_optim.methods.base.SelectionMethod` object, or a registered name
    (``"anchored_consensus"``, ``"loss"``, ``"facility_location"``... see :mod:`.methods`) built with
    ``preset``'s values and ``**options`` (the method's own options, e.g. ``sketch_dim=512``).
    The method is ``self.selection``. Shared options: :class:`~coreset_optim.CoresetConfig`.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module,
        *,
        coreset_size: int | None = None,
        coreset_ratio: float | None = None,
        selection: SelectionMethod | str = FROM_PRESET,
        sketch_modules: SketchSpec = None,
        source_key: str | None = None,
        keep_sources: Any = CoresetConfig.keep_sources,
        temperature: float = CoresetConfig.temperature,
        micro_batch_size: int | None = None,
        seed: int = CoresetConfig.seed,
        preset: str = DEFAULT_PRESET,
        distributed: Any = CoresetConfig.distributed,
        process_group: Any = None,
        **options: Any,
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
        self.config, self.selection = resolve_options(
            selection,
            preset,
            coreset_size=coreset_size,
            coreset_ratio=coreset_ratio,
            source_key=source_key,
            keep_sources=keep_sources,
            temperature=temperature,
            micro_batch_size=micro_batch_size,
            seed=seed,
            distributed=distributed,
            **options,
        )
        warn_if_raw_gradients(self.selection, optimizer)
        self.process_group = process_group  # None: the default group (not saved in checkpoints)
        self.optimizer = optimizer
        self.model = model
        self.sketch_layers = resolve_sketch_modules(model, optimizer, sketch_modules)
        self.generator = torch.Generator().manual_seed(seed)
        self.num_selections = 0
        self.num_steps = 0
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
        modules = [t.name for t in self.sketch_layers]
        inner = "\n".join("    " + line for line in repr(self.optimizer).splitlines())
        return (
            f"{type(self).__name__}({size}, sketch_modules={modules}, keep_sources={c.keep_sources!r}, "
            f"selection={self.selection!r}) wrapping\n{inner}"
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
        """The wrapped optimizer's state dict plus this wrapper's own (options, the method's options
        and state, counters, RNG) under ``"coreset_optim"``."""
        sd = self.optimizer.state_dict()
        sd[STATE_KEY] = wrapper_state(
            WrapperState(
                self.config,
                self.selection.name,
                self.selection.options(),
                self.selection.state_dict(),
                [t.name for t in self.sketch_layers],
                self.num_selections,
                self.num_steps,
                self.generator.get_state(),
            )
        )
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state dict from :meth:`state_dict` (this version's or the one before method
        objects), or a plain one of the wrapped optimizer. Checked before anything changes."""
        state_dict = dict(state_dict)
        own = state_dict.pop(STATE_KEY, None)
        if own is not None:
            saved = read_wrapper_state(own, lambda name: method_class(name).option_names())
            method = restore_method(self.selection, saved.method_name, saved.method_options, saved.method_state)
            layers = self.sketch_layers
            if saved.sketch_modules != [t.name for t in layers]:
                layers = resolve_sketch_modules(self.model, self.optimizer, saved.sketch_modules)
        self.optimizer.load_state_dict(state_dict)
        if own is not None:
            self.config, self.selection, self.sketch_layers = saved.config, method, layers
            self.num_selections, self.num_steps = saved.num_selections, saved.num_steps
            self.generator.set_state(saved.rng_state)

    # --- selection ----------------------------------------------------------------------------
    def select(
        self,
        batch: Any,
        loss_fn: LossFn,
        *,
        sources: Any = None,
        loss_scale: float = 1.0,
        model: nn.Module | None = None,
    ) -> Coreset:
        """Choose a weighted coreset of ``batch`` and backpropagate only its examples.

        Afterwards every trained parameter's ``.grad`` has grown by
        ``loss_scale * sum_j w_j * grad(loss_j) / N`` (N: valid examples in the batch).
        ``loss_fn(sub_batch)`` must return one loss per example of ``sub_batch``.
        Under torch.distributed the coreset is chosen from the global batch of all ranks and N is
        its valid count; see ``docs/distributed.md``. ``model``: the module ``loss_fn`` runs when
        it wraps the one given at construction (e.g. the DDP wrapper Trainer or Accelerate create
        after the optimizer), so select() can pause its gradient sync.

        One pipeline for one process and many, each stage asked of the selection method:
        check -> prepare -> sketch -> gather -> observe -> choose -> backward. ``layout`` does the
        communication (identity gather and local backward in one process, :mod:`.distributed`);
        when the budget covers the batch, the pass computes losses only and every valid example
        is taken.

        A method that reads neither losses nor sketches (``reads_losses = False``: ``"random"``)
        gets no pass over the batch: nothing is judged before the draw, so every example counts
        as valid (N is the batch size), ``Coreset.losses`` is NaN and ``Coreset.batch_loss`` is the
        coreset's weighted loss. A drawn example whose loss turns out non-finite in the coreset's
        forward is left out of the backward (its micro-batch is computed again without it: a NaN
        in a forward reaches every gradient) and a RuntimeWarning names it; its weight stays in
        the Coreset, so the step's gradient is short by its share. When every example of a
        micro-batch of the coreset is non-finite, ValueError, before that micro-batch's backward
        (with ``micro_batch_size=None``: before any gradient changes). Under torch.distributed
        the check is each rank's own (no collective): a rank that raises leaves the others
        waiting in the backward's collectives until the process group's timeout; every rank
        raises together when the model itself has diverged (all losses non-finite).
        """
        start = time.perf_counter()
        wrapper = self._check_select_call(loss_fn, loss_scale, model)
        init_fsdp_dtypes(wrapper)  # FSDP2 (idempotent): its dtypes fixed before a sketch pass freezes parameters
        size = batch_size(batch)
        codes, names = encode_sources(source_values(batch, size, sources, self.config.source_key), size)
        method = self.selection
        method.check(batch, self.config.source_key)
        layout = batch_layout(size, codes, names, self.config.distributed, self.process_group)
        budget = self.config.budget(layout.total)
        take_all = budget >= layout.total
        chunk = method.sketch_batch_size or self.config.micro_batch_size or budget
        timings: dict[str, float] = {}
        context = SelectionContext(
            BatchPass(self.model, self.sketch_layers, batch, loss_fn, size, chunk),
            self.optimizer,
            self.generator,
            self.config.seed,
            layout,
            wrapper,
            self.num_selections,
            timings,
        )
        if not take_all:
            with timed(timings, "prepare"):
                method.prepare(context)
        skipped: list[tuple[int, torch.Tensor]] = []  # no pass: what the backward left out
        if method.reads_losses:
            with timed(timings, "sketch"), paused_gradient_sync(wrapper):
                local = losses_only(context.batch_pass) if take_all else method.sketches(context)
            sketches = layout.gather(local, method.compressed_width(local.rows), timings)
            self._require_valid(sketches, local)
        else:  # the same global rows on every rank, built without a collective
            sketches = unjudged(layout.total, param_device(self.optimizer))
            loss_fn = skipping_nonfinite(loss_fn, skipped)
        if not take_all:  # every rank sees the same gathered rows: the method's state stays in step
            method.observe(sketches, layout.codes, len(layout.names))
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
        if skipped:
            warn_skipped(method, share[1], skipped)
        # Taking every example compares nothing (no sketch ran): no example is judged a suspect.
        suspects = (
            None
            if take_all
            else method.suspects(
                selection.compressed,
                sketches.losses,
                sketches.valid,
                layout.codes,
                len(layout.names),
                sketches.reference_losses,
            )
        )
        timings["total"] = time.perf_counter() - start
        return self._coreset(layout, sketches, selection, kept, num_valid, share, loss_scale, timings, suspects)

    # --- the stages of select() ----------------------------------------------------------------
    def _coreset(
        self,
        layout: Layout,
        sketches: Sketches,
        selection: Selection,
        kept: list[bool],
        num_valid: int,
        share: tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor],
        loss_scale: Any,
        timings: dict[str, float],
        suspects: torch.Tensor | None,
    ) -> Coreset:
        """The :class:`Coreset` of one selection; ``share``: :meth:`backward`'s ``(sub_batch,
        local indices, local weights, loss)``."""
        sub_batch, local_indices, local_weights, loss = share
        names = layout.names  # under torch.distributed: the global batch's sources
        in_batch = torch.bincount(layout.codes, minlength=len(names)).tolist()
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
            source_codes=layout.codes,
            losses_computed=self.selection.reads_losses,
        )

    def _check_select_call(self, loss_fn: LossFn, loss_scale: Any, model: Any) -> nn.Module:
        """The module whose gradient sync select() pauses; TypeError/ValueError on bad arguments."""
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (batch -> Tensor[n]), got {type(loss_fn).__name__}")
        check_loss_scale(loss_scale)
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be the torch.nn.Module loss_fn runs (or None), got {type(model).__name__}")
        return self.model if model is None else model

    def _require_valid(self, sketches: Sketches, local: Sketches) -> None:
        """ValueError, before any gradient is touched, when no example of the (global) batch is valid.

        Every rank sees the same gathered validity, so all raise together."""
        if not bool(sketches.valid.any()):
            before = local.valid_before_normalization
            lost = before is not None and bool(before.any())  # Adam's scaling made them NaN
            raise ValueError(
                self._no_valid_message(int(sketches.valid.numel())) + (" (after Adam normalization)" if lost else "")
            )

    def _source_counts(self, sketches: Sketches, layout: Layout) -> list[int]:
        """Valid examples per source of the (global) batch."""
        return torch.bincount(layout.codes[sketches.valid.cpu()], minlength=len(layout.names)).tolist()

    def _choose(self, sketches: Sketches, layout: Layout, budget: int) -> tuple[Selection, list[bool], int]:
        """The method's choose step on the gathered sketches, group by group (run on the first
        rank, shared); returns the selection, the sources kept whole and the number of valid
        examples."""
        counts = self._source_counts(sketches, layout)
        keep = keep_mask(self.config.keep_sources, layout.names, counts, budget)
        method, temperature = self.selection, self.config.temperature
        groups, num_groups, group_keep = method.groups(layout.codes, len(layout.names), keep)
        selection = layout.on_first_rank(select_from_sketches)(
            sketches.rows,
            sketches.valid,
            groups,
            num_groups,
            budget,
            group_keep,
            method,
            temperature=temperature,
            losses=sketches.losses,
            generator=self.generator,
            reference_losses=sketches.reference_losses,
        )
        if groups is not layout.codes:  # not one group per source: count the picks per source
            per_source = torch.bincount(layout.codes[selection.indices.cpu()], minlength=len(layout.names)).tolist()
            return dataclasses.replace(selection, selected_per_source=per_source), [False] * len(counts), sum(counts)
        kept = sources_kept_whole(counts, budget, keep) if temperature == 1.0 else [False] * len(counts)
        return selection, kept, sum(counts)

    def _take_all(self, sketches: Sketches, layout: Layout, budget: int) -> tuple[Selection, list[bool], int]:
        """The shortcut when the budget covers the batch: every valid example, weight 1."""
        counts = self._source_counts(sketches, layout)
        return take_every_valid(sketches.rows, sketches.valid, counts), [False] * len(counts), sum(counts)

    @staticmethod
    def _no_valid_message(size: int) -> str:
        return (
            f"no example of the batch of {size} has a finite loss and sketch; nothing was "
            "backpropagated. Check the data and the model for NaN/inf (e.g. a too-high learning rate)"
        )
