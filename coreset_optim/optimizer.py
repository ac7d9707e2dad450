"""``CoresetOptimizer``: a torch.optim wrapper that trains each step on a weighted coreset.

The class does bookkeeping (options, delegation, state); the math lives in free functions:
:mod:`.sketch` (per-example gradients), :mod:`.normalize` (Adam's scaling), :mod:`.selection`
(compress, similarity, greedy, weights) and :func:`backward_weighted` below.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .batching import batch_size, chunk_slices, index_batch
from .budget import small_sources, sources_kept_whole
from .config import CoresetConfig
from .coreset import Coreset, SourceCount
from .distributed import Shards, paused_gradient_sync, process_group as distributed_group
from .loss import LossFn, backward_weighted_losses, losses_in_chunks
from .normalize import normalize_sketches
from .presets import FROM_PRESET, resolve_preset
from .projection import countsketch
from .selection import select_from_sketches
from .sketch import SketchSpec, exact_sketches, resolve_sketch_modules, sketch_mode, sketch_params
from .zeroth_order import fixed_direction, sketch_numel, zeroth_order_sketches

_STATE_KEY = "coreset_optim"


def backward_weighted(
    batch: Any,
    weights: torch.Tensor,
    loss_fn: LossFn,
    denominator: float,
    micro_batch_size: int | None,
) -> torch.Tensor:
    """Backpropagate ``sum_j weights[j] * loss_j / denominator`` over ``batch`` in micro-batches.

    Gradients accumulate into ``.grad`` like ordinary gradient accumulation. Returns the
    (detached) value of the weighted loss.
    """
    total = None
    for piece in chunk_slices(int(weights.numel()), micro_batch_size):
        part = backward_weighted_losses(loss_fn, index_batch(batch, piece), weights[piece], denominator)
        total = part if total is None else total + part
    return total


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
        chosen = resolve_preset(preset, dict(
            sketch_dim=sketch_dim, normalize=normalize, similarity=similarity,
            keep_sources=keep_sources, sketch=sketch, selection=selection,
            zo_fixed_direction=zo_fixed_direction, temperature=temperature,
        ))
        self.config = CoresetConfig(
            coreset_size=coreset_size,
            coreset_ratio=coreset_ratio,
            source_key=source_key,
            sketch_batch_size=sketch_batch_size,
            micro_batch_size=micro_batch_size,
            seed=seed,
            zo_eps=zo_eps,
            zo_probes=zo_probes,
            **chosen,
            distributed=distributed,
        )
        self.process_group = process_group  # None: the default group (not saved in checkpoints)
        self.optimizer = optimizer
        self.model = model
        self.sketch_targets = resolve_sketch_modules(model, optimizer, sketch_modules)
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
                f"sources has {len(sources)} entries for a batch of {size} examples; give one "
                "source id per example"
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
        self, batch: Any, loss_fn: LossFn, *, sources: Any = None, loss_scale: float = 1.0, model: nn.Module | None = None
    ) -> Coreset:
        """Choose a weighted coreset of ``batch`` and backpropagate only its examples.

        Afterwards every trained parameter's ``.grad`` has grown by
        ``loss_scale * sum_j w_j * grad(loss_j) / N`` (N: valid examples in the batch).
        ``loss_fn(sub_batch)`` must return one loss per example of ``sub_batch``.
        Under torch.distributed the coreset is chosen from the global batch of all ranks and N is
        its valid count; see ``docs/distributed.md``. ``model``: the module ``loss_fn`` runs when
        it wraps the one given at construction (e.g. the DDP wrapper Trainer or Accelerate create
        after the optimizer), so select() can pause its gradient sync.
        """
        start = time.perf_counter()
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (batch -> Tensor[n]), got {type(loss_fn).__name__}")
        _check_loss_scale(loss_scale)
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be the torch.nn.Module loss_fn runs (or None), got {type(model).__name__}")
        wrapper = self.model if model is None else model
        size = batch_size(batch)
        codes, names = encode_sources(self._source_values(batch, size, sources), size)
        shards = None
        if (group := distributed_group(self.config.distributed, self.process_group)) is not None:
            shards = Shards.gather(size, codes, names, group)
            codes, names = shards.local_codes, shards.names
        total = size if shards is None else shards.total
        budget = self.config.budget(total)
        timings: dict[str, float] = {}

        if budget >= total:
            t0 = time.perf_counter()
            with paused_gradient_sync(wrapper):
                losses = self._losses_without_grad(batch, loss_fn, size)
            valid = torch.isfinite(losses)
            if shards is not None:
                (losses, valid), codes, size = shards.gather_losses(losses, valid), shards.codes, total
            timings["sketch"] = time.perf_counter() - t0
            sketches = torch.empty(size, 0, device=losses.device)
            indices = torch.nonzero(valid).flatten()
            weights = torch.ones(indices.numel(), device=losses.device)
            selected = torch.bincount(codes[valid.cpu()], minlength=len(names)).tolist()
            keep = [False] * len(names)
            num_valid = int(indices.numel())
            if num_valid == 0:
                raise ValueError(self._no_valid_message(size))
        else:
            t0 = time.perf_counter()
            with paused_gradient_sync(wrapper):
                raw, losses = self._sketch(batch, loss_fn, size, budget)
            timings["sketch"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            valid = torch.isfinite(losses).to(raw.device) & torch.isfinite(raw).all(1)
            if shards is None and not bool(valid.any()):
                raise ValueError(self._no_valid_message(size))
            params = sketch_params(self.sketch_targets)
            normalized = raw
            if raw.shape[1] > 0:  # random/loss selection need no sketch
                normalized = normalize_sketches(raw, self.optimizer, params, self.config.normalize)
            if self.config.sketch == "projection":
                normalized = countsketch(normalized, self.config.sketch_dim, self.config.seed)
            valid &= torch.isfinite(normalized).all(1)
            if shards is None and not bool(valid.any()):  # e.g. eps=0 and a zero second moment
                raise ValueError(self._no_valid_message(size) + " (after Adam normalization)")
            timings["normalize"] = time.perf_counter() - t0
            if shards is not None:
                t0 = time.perf_counter()
                normalized, losses, valid = shards.gather_sketches(normalized, losses, valid, self.config.sketch_dim)
                codes, size = shards.codes, total
                timings["gather"] = time.perf_counter() - t0
                if not bool(valid.any()):
                    raise ValueError(self._no_valid_message(size))
            counts = torch.bincount(codes[valid.cpu()], minlength=len(names)).tolist()
            keep = self._keep_mask(names, counts, budget)
            result = (select_from_sketches if shards is None else shards.on_first_rank(select_from_sketches))(
                normalized, valid, codes, len(names), budget, keep,
                self.config.sketch_dim, self.config.similarity,
                method=self.config.selection,
                extra={"losses": losses, "generator": self.generator},
                temperature=self.config.temperature,
            )
            timings.update(result.timings)
            sketches, indices, weights = result.compressed, result.indices, result.weights
            selected, num_valid = result.selected_per_source, sum(counts)
            keep = sources_kept_whole(counts, budget, keep) if self.config.temperature == 1.0 else [False] * len(names)

        t0 = time.perf_counter()
        local = {}
        if shards is None:
            sub_batch = index_batch(batch, indices)
            loss = backward_weighted(
                sub_batch, weights, loss_fn, num_valid / loss_scale, self.config.micro_batch_size
            )
        else:
            sub_batch, local_indices, local_weights, loss = shards.backward(
                batch, indices, weights, loss_fn, num_valid / loss_scale,
                self.config.micro_batch_size, wrapper, valid,
            )
            local = dict(local_indices=local_indices, local_weights=local_weights, rank_sizes=shards.sizes)
        loss = loss / loss_scale  # the estimate of the batch's mean loss, without the scale
        timings["backward"] = time.perf_counter() - t0
        self.num_selections += 1
        in_batch = torch.bincount(codes, minlength=len(names)).tolist()
        timings["total"] = time.perf_counter() - start
        return Coreset(
            indices=indices,
            weights=weights,
            batch=sub_batch,
            sketches=sketches,
            losses=losses,
            source_counts={
                n: SourceCount(in_batch[i], selected[i], keep[i]) for i, n in enumerate(names)
            },
            num_valid=num_valid,
            num_invalid=size - num_valid,
            loss=loss,
            timings=timings,
            **local,
        )

    def _sketch(self, batch: Any, loss_fn: LossFn, size: int, budget: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw per-example sketches ``[B, D]`` (NaN rows: invalid) and per-example losses ``[B]``."""
        c = self.config
        chunk = c.sketch_batch_size or c.micro_batch_size or budget
        if c.selection in ("random", "loss"):
            losses = self._losses_without_grad(batch, loss_fn, size)
            return torch.empty(size, 0, device=losses.device), losses
        if c.sketch == "zeroth_order":
            numel = sketch_numel(self.sketch_targets)
            if c.zo_fixed_direction:
                directions = fixed_direction(numel, c.seed)[None, :]
            else:
                directions = torch.randn(c.zo_probes, numel, generator=self.generator)
            return zeroth_order_sketches(
                self.model, self.sketch_targets, batch, loss_fn, size, chunk,
                eps=c.zo_eps, directions=directions,
            )
        return exact_sketches(self.model, self.sketch_targets, batch, loss_fn, size, chunk)

    def _losses_without_grad(self, batch: Any, loss_fn: LossFn, size: int) -> torch.Tensor:
        """Per-example losses in eval mode, to find the valid examples when all are selected."""
        with sketch_mode(self.model, []), torch.no_grad():
            return losses_in_chunks(loss_fn, batch, size, self.config.sketch_batch_size or self.config.micro_batch_size)

    @staticmethod
    def _no_valid_message(size: int) -> str:
        return (
            f"no example of the batch of {size} has a finite loss and sketch; nothing was "
            "backpropagated. Check the data and the model for NaN/inf (e.g. a too-high learning rate)"
        )
