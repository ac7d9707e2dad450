"""One coreset for a batch spread over the ranks of ``torch.distributed`` (DDP, torchrun, Accelerate).

``select()`` talks to the ranks through one *layout* object with three stages: ``gather``
(this rank's sketches -> the global batch's), ``on_first_rank`` (run the chooser once, share its
result) and ``backward`` (each rank its own share). :class:`LocalBatch` is the one-process form,
where all three are the identity or local; :class:`Shards` is the many-rank form;
:func:`batch_layout` picks one.

The *global batch* is rank 0's examples, then rank 1's, and so on. Every rank sketches and
normalizes its own examples; the ranks agree on the compressed coordinates, all-gather the
compressed rows (with losses, validity and source ids), rank 0 selects and broadcasts indices and
weights (so no rank can disagree through floating-point differences), and every rank
backpropagates only its own selected examples, scaled so that the rank-averaged gradient (DDP,
FSDP and DeepSpeed average) equals the one-process coreset gradient of the global batch.

What travels per step is listed in ``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .batching import chunk_slices, index_batch
from .sketch.compress import top_coordinates
from .batching import LossFn
from .loss import backward_weighted, backward_weighted_losses
from .records import Selection
from .records import Sketches
from .records import Agreement

DISTRIBUTED_MODES = ("auto", True, False)


def process_group(setting: Any, group: Any = None) -> Any:
    """The group ``select()`` selects across, or ``None`` to select from this process's batch only.

    ``setting``: ``"auto"`` uses the group when ``torch.distributed`` is initialized and has more
    than one rank; ``True`` requires an initialized process group; ``False`` never gathers.
    """
    if setting is False:
        return None
    ready = dist.is_available() and dist.is_initialized()
    if not ready:
        if setting is True:
            raise ValueError(
                "distributed=True but torch.distributed is not initialized; call "
                "torch.distributed.init_process_group() first (torchrun and Accelerate do it for "
                "you) or use distributed='auto'"
            )
        return None
    group = dist.group.WORLD if group is None else group
    return group if dist.get_world_size(group) > 1 else None


def shutdown(group: Any = None, *, settle_seconds: float = 0.2) -> None:
    """End a torchrun/Accelerate script cleanly: barrier, a short pause, ``destroy_process_group``.

    Gloo's worker threads release each finished collective's tensors themselves, which needs the
    GIL; the group's destructor (at ``destroy_process_group``, or later when DDP drops its last
    reference) joins those threads while holding the GIL. A worker still releasing the last
    collective then hangs the process, or aborts it at interpreter exit. The barrier waits for
    every earlier collective and the pause (``time.sleep`` releases the GIL) lets the workers
    finish: it makes the race unlikely (none in 48 loaded test runs), not impossible. Does
    nothing when no process group is initialized.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier(group=group)
    time.sleep(settle_seconds)
    dist.destroy_process_group(group)


def comm_device(group: Any, data_device: torch.device) -> torch.device:
    """Where collective buffers live: the data's GPU under NCCL, otherwise the CPU (gloo)."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend:
        if data_device.type == "cuda":
            return data_device
        if "gloo" not in backend:
            return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_source_names(per_rank_names: Sequence[Sequence[Any]]) -> tuple[list[Any], list[list[int]]]:
    """Source names in order of first appearance in the global batch, and each rank's code map.

    ``per_rank_names[r]`` are rank r's names in their local order of first appearance; the result's
    ``maps[r][local_code]`` is the global code of that name.
    """
    names: dict[Any, int] = {}
    maps = [[names.setdefault(n, len(names)) for n in local] for local in per_rank_names]
    return list(names), maps


def all_gather_rows(x: torch.Tensor, sizes: Sequence[int], group: Any) -> torch.Tensor:
    """Every rank's rows of ``x`` concatenated in rank order (padded to the largest count to gather)."""
    rows = max(sizes)
    padded = x.new_zeros((rows, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def source_abs_sums(sketches: torch.Tensor, valid: torch.Tensor, codes: torch.Tensor, num_sources: int) -> torch.Tensor:
    """``Tensor[S, D]``: per source, the sum of |sketch| over its valid rows (zeros for none)."""
    sums = sketches.new_zeros(num_sources, sketches.shape[1])
    rows = torch.nonzero(valid).flatten()
    return sums.index_add_(0, codes.to(sketches.device)[rows], sketches.index_select(0, rows).abs())


def rows_on_coordinates(
    sketches: torch.Tensor, valid: torch.Tensor, codes: torch.Tensor, coords: torch.Tensor | None
) -> torch.Tensor:
    """Each row on its source's coordinates ``coords[code]`` (all columns when ``None``); NaN if invalid."""
    if coords is not None:
        sketches = torch.gather(sketches, 1, coords.to(sketches.device)[codes.to(sketches.device)])
    return torch.where(valid[:, None].to(sketches.device), sketches, torch.full_like(sketches, float("nan")))


def is_deepspeed_engine(model: Any) -> bool:
    """Whether ``model`` is a DeepSpeed engine (found by its ZeRO query, without importing deepspeed)."""
    return callable(getattr(model, "zero_optimization_partition_gradients", None))


def gradient_sync_pause(model: Any) -> Callable[[], Any] | None:
    """``model``'s ``no_sync`` when backward passes under it communicate nothing (DDP, FSDP1,
    DeepSpeed ZeRO-0/1), so ranks may make different numbers of them; else None (FSDP2 has
    none; a DeepSpeed engine's refuses ZeRO-2/3, which reduce gradients into partitions in
    every backward)."""
    if is_deepspeed_engine(model) and model.zero_optimization_partition_gradients():
        return None
    no_sync = getattr(model, "no_sync", None)
    return no_sync if callable(no_sync) else None


def accumulation_deferral(model: Any) -> Callable[[], Any] | None:
    """For a DeepSpeed ZeRO-2/3 engine, a context that runs backward passes off the gradient
    accumulation boundary (DeepSpeed's documented pattern for several backward passes before one
    ``step()``: all off the boundary but the last); None for other models."""
    if not (is_deepspeed_engine(model) and model.zero_optimization_partition_gradients()):
        return None
    return lambda: _off_accumulation_boundary(model)


@contextlib.contextmanager
def _off_accumulation_boundary(engine: Any):
    """``engine.set_gradient_accumulation_boundary(False)`` for the block, then the engine's own
    setting back (DeepSpeed's attribute: None when it counts micro-steps itself)."""
    saved = getattr(engine, "_is_gradient_accumulation_boundary", None)
    engine.set_gradient_accumulation_boundary(False)
    try:
        yield
    finally:
        engine._is_gradient_accumulation_boundary = saved


def averages_gradients(model: torch.nn.Module) -> bool:
    """Whether ``model`` is a wrapper known to average gradients over ranks (DDP, FSDP1, FSDP2, DeepSpeed)."""
    return (
        callable(getattr(model, "no_sync", None))
        or callable(getattr(model, "set_requires_gradient_sync", None))
        or is_deepspeed_engine(model)
    )


def init_fsdp_dtypes(model: torch.nn.Module) -> bool:
    """Run FSDP2's lazy initialization of ``model`` now, while every trained parameter requires grad.

    ``fully_shard`` fixes each parameter group's mixed-precision dtypes (the dtype gradients are
    reduced in and cast back to) at the root's first forward, from the parameters that require
    grad *then*. When that first forward is a sketch pass, which freezes every parameter but the
    sketched ones, groups without a sketched parameter record none: under a
    ``MixedPrecisionPolicy`` their reduced bf16 gradients are then assigned to the fp32 sharded
    parameters (a ``RuntimeError`` in the coreset's backward) and an fp32 ``reduce_dtype`` is
    ignored. Call this before the first ``select()`` on a model sharded with ``fully_shard``.
    Returns whether ``model`` is an FSDP2 root; a model already initialized is left as it is.
    Uses FSDP2's internal ``_get_fsdp_state()._lazy_init()`` (tested with torch 2.13), which is
    idempotent: the first forward does exactly this.
    """
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return False
    if not isinstance(model, FSDPModule):
        return False
    model._get_fsdp_state()._lazy_init()
    return True


@contextlib.contextmanager
def paused_gradient_sync(model: torch.nn.Module):
    """DDP's ``no_sync()`` around passes that must not arm its gradient reducer (sketch passes).

    Under it only the first forward may broadcast buffers, so ranks may make different numbers of
    sketch forwards without their collectives falling out of step. Other models: nothing.
    """
    no_sync = gradient_sync_pause(model)
    with no_sync() if no_sync is not None else contextlib.nullcontext():
        yield


def split_selection(
    indices: torch.Tensor, weights: torch.Tensor, start: int, stop: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The part of a global selection on the rank holding global rows ``[start, stop)``, as local indices."""
    mine = (indices >= start) & (indices < stop)
    return indices[mine] - start, weights[mine]


@dataclass
class LocalBatch:
    """One process: the global batch is this batch, the gather is the identity, backward is local."""

    sizes: list[int]  # [len(batch)]
    names: list[Any]  # source names
    codes: torch.Tensor  # LongTensor[B]: source code of every example
    local_codes: torch.Tensor  # the same codes (this process holds the whole batch)

    @classmethod
    def of(cls, size: int, codes: torch.Tensor, names: Sequence[Any]) -> LocalBatch:
        return cls([size], list(names), codes, codes)

    @property
    def total(self) -> int:
        return self.sizes[0]

    def gather(self, sketches: Sketches, dim: int, timings: dict[str, float]) -> Sketches:
        return sketches

    def agreement(self) -> None:
        """Nothing to agree on with other ranks while streaming sketch blocks."""
        return None

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on some rank: here, on this one."""
        return bool(flag)

    def sum_over_ranks(
        self, summed: torch.Tensor, count: float, bad: torch.Tensor
    ) -> tuple[torch.Tensor, float, torch.Tensor]:
        """A sum, its count and its non-finite count over the ranks: here, as they are."""
        return summed, count, bad

    def on_first_rank(self, select: Callable[..., Selection]) -> Callable[..., Selection]:
        return select

    def backward(
        self,
        batch: Any,
        indices: torch.Tensor,
        weights: torch.Tensor,
        loss_fn: LossFn,
        denominator: float,
        micro_batch_size: int | None,
        model: torch.nn.Module,
        valid: torch.Tensor,
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backpropagate the selected examples; returns ``(sub_batch, indices, weights, loss)``.

        A DeepSpeed ZeRO-2/3 engine gets all micro-batches but the last off its accumulation
        boundary (:func:`accumulation_deferral`)."""
        sub_batch = index_batch(batch, indices)
        defer = accumulation_deferral(model)
        if defer is None:
            loss = backward_weighted(sub_batch, weights, loss_fn, denominator, micro_batch_size)
            return sub_batch, indices, weights, loss
        pieces = chunk_slices(int(weights.numel()), micro_batch_size)
        total = None
        for i, piece in enumerate(pieces):
            with defer() if i < len(pieces) - 1 else contextlib.nullcontext():
                part = backward_weighted_losses(loss_fn, index_batch(sub_batch, piece), weights[piece], denominator)
            total = part if total is None else total + part
        return sub_batch, indices, weights, total


def batch_layout(
    size: int, codes: torch.Tensor, names: Sequence[Any], setting: Any, group: Any = None
) -> LocalBatch | Shards:
    """The layout ``select()`` runs on: :class:`Shards` when ``process_group(setting, group)`` finds
    ranks to select across (one ``all_gather_object`` to learn the layout), else :class:`LocalBatch`."""
    group = process_group(setting, group)
    if group is None:
        return LocalBatch.of(size, codes, names)
    return Shards.from_ranks(size, codes, names, group)


@dataclass
class Shards:
    """How the global batch is laid out over the ranks, and the collectives ``select()`` uses."""

    group: Any
    rank: int
    sizes: list[int]  # examples per rank
    names: list[Any]  # global source names
    codes: torch.Tensor  # LongTensor[total]: global source code of every global example
    local_codes: torch.Tensor  # LongTensor[sizes[rank]]: this rank's examples, global codes

    @classmethod
    def from_ranks(cls, size: int, codes: torch.Tensor, names: Sequence[Any], group: Any) -> Shards:
        """Exchange batch sizes and source ids (one ``all_gather_object``) and agree on source codes."""
        world = dist.get_world_size(group)
        objects: list[Any] = [None] * world
        dist.all_gather_object(objects, (size, list(names), codes.tolist()), group=group)
        global_names, maps = global_source_names([o[1] for o in objects])
        per_rank = [torch.tensor([m[c] for c in o[2]], dtype=torch.long) for o, m in zip(objects, maps)]
        rank = dist.get_rank(group)
        return cls(group, rank, [o[0] for o in objects], global_names, torch.cat(per_rank), per_rank[rank])

    @property
    def world_size(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def start(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def stop(self) -> int:
        return self.start + self.sizes[self.rank]

    def _first(self) -> int:
        return dist.get_global_rank(self.group, 0)

    def agreement(self) -> Agreement:
        """What the ranks share while streaming sketch blocks: summed top-coordinate scores (each
        rank gets the same sums, so all keep the same columns), a "some rank must redo" flag, and
        the largest shard, so every rank cuts the layers into the same blocks."""

        return Agreement(self.all_reduce, self.any_rank, max(self.sizes))

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sum ``t`` over the ranks, in place."""
        buffer = t.to(comm_device(self.group, t.device))
        dist.all_reduce(buffer, group=self.group)
        t.copy_(buffer)

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is set on some rank (one all-reduce of one number)."""
        buffer = torch.tensor([float(flag)], device=comm_device(self.group, torch.device("cpu")))
        dist.all_reduce(buffer, op=dist.ReduceOp.MAX, group=self.group)
        return bool(buffer.item() > 0)

    def sum_over_ranks(
        self, summed: torch.Tensor, count: float, bad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``summed`` (float64), ``count`` and ``bad`` summed over the ranks in one all-reduce (e.g.
        the ranks' held-out targets pooled: identical targets give their own mean)."""
        extra = torch.stack(
            [torch.tensor(count, dtype=torch.double, device=summed.device), bad.double().to(summed.device)]
        )
        packed = torch.cat([summed.double(), extra]).to(comm_device(self.group, summed.device))
        dist.all_reduce(packed, group=self.group)
        packed = packed.to(summed.device)
        return packed[:-2], packed[-2], packed[-1]

    def gather(self, sketches: Sketches, dim: int, timings: dict[str, float]) -> Sketches:
        """The global batch's sketches (see :meth:`gather_sketches`); its seconds go to ``timings["gather"]``."""
        start = time.perf_counter()
        reference = sketches.reference_losses
        extra = None if reference is None else reference[:, None]
        rows, losses, valid = self.gather_sketches(sketches.rows, sketches.losses, sketches.valid, dim, extra)
        if reference is not None:  # its column rode along with the rows
            rows, reference = rows[:, :-1], rows[:, -1].to(reference.dtype)
        timings["gather"] = time.perf_counter() - start
        return Sketches(rows, losses, valid, reference_losses=reference)

    def gather_sketches(
        self,
        normalized: torch.Tensor,
        losses: torch.Tensor,
        valid: torch.Tensor,
        dim: int,
        extra_columns: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Global compressed sketches ``[total, min(dim, D)]``, losses and validity.
        ``extra_columns[n, e]`` (e.g. the reference losses) ride along in the same all-gather and
        come back as the rows' last ``e`` columns.

        ``select()`` passes sketches already compressed on agreed coordinates
        (:meth:`agreement`), which are only gathered. Wider ones (zeroth-order) are compressed
        here: compression keeps, per source, the ``dim`` coordinates with the largest mean |value| over
        the source's valid rows of the *global* batch: the ranks sum |sketch| per source (``S*D``
        floats reduced to rank 0), rank 0 picks the coordinates and broadcasts them (``S*dim``
        longs), then only the compressed rows are all-gathered.
        """
        device = comm_device(self.group, normalized.device)
        coords = None
        num_sources = len(self.names)
        if normalized.shape[1] > dim:
            sums = source_abs_sums(normalized, valid, self.local_codes, num_sources).to(device)
            dist.reduce(sums, dst=self._first(), group=self.group)
            coords = torch.empty(num_sources, dim, dtype=torch.long, device=device)
            if self.rank == 0:
                coords = torch.stack([top_coordinates(sums[s : s + 1], dim) for s in range(num_sources)])
            dist.broadcast(coords, src=self._first(), group=self.group)
        rows = rows_on_coordinates(normalized, valid, self.local_codes, coords)
        if extra_columns is not None:
            rows = torch.cat([rows.float(), extra_columns.detach().float().to(rows.device)], 1)
        extra = torch.stack([losses.detach().float().to(rows.device), valid.float().to(rows.device)], 1)
        packed = torch.cat([rows.float(), extra], 1).to(device)
        full = all_gather_rows(packed, self.sizes, self.group).to(normalized.device)
        return full[:, :-2], full[:, -2], full[:, -1] > 0

    def on_first_rank(self, select: Callable[..., Selection]) -> Callable[..., Selection]:
        """``select`` run on rank 0 only, its indices and weights broadcast to the other ranks.

        The wrapped function's first argument is the gathered sketches; the other ranks return
        them as ``compressed`` and report rank 0's stage timings (they waited that long).
        """

        def run(sketches: torch.Tensor, *args: Any, **kwargs: Any) -> Selection:
            payload: list[Any] = [None]
            if self.rank == 0:
                result = select(sketches, *args, **kwargs)
                payload = [(result.indices.cpu(), result.weights.cpu(), result.selected_per_source, result.timings)]
            device = comm_device(self.group, sketches.device)
            dist.broadcast_object_list(payload, src=self._first(), group=self.group, device=device)
            indices, weights, per_source, timings = payload[0]
            if self.rank == 0:
                return result
            device = sketches.device
            return Selection(indices.to(device), weights.to(device), sketches, list(per_source), dict(timings))

        return run

    def backward(
        self,
        batch: Any,
        indices: torch.Tensor,
        weights: torch.Tensor,
        loss_fn: LossFn,
        denominator: float,
        micro_batch_size: int | None,
        model: torch.nn.Module,
        valid: torch.Tensor,
    ) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backpropagate this rank's selected examples; returns ``(sub_batch, local indices, local weights, loss)``.

        Each rank backpropagates ``sum_j w_j loss_j * world_size / denominator`` over its own
        selected examples, so the rank average is ``sum_j w_j grad_j / denominator``. Every rank
        makes the same number of gradient-synchronizing backward calls: with a DDP module
        (``model.no_sync``) all but the last micro-batch run under ``no_sync`` and there is exactly
        one; otherwise every rank runs as many calls as the busiest rank (a DeepSpeed ZeRO-2/3
        engine: all but the last off its accumulation boundary). A rank with nothing (or
        less) to do runs zero-weight calls on one of its examples (a valid one when it has one).
        ``loss`` is the global weighted loss (one scalar all-reduce).
        """
        local, local_w = split_selection(indices, weights, self.start, self.stop)
        pieces = chunk_slices(int(local.numel()), micro_batch_size) if local.numel() else []
        calls = [(local[p], local_w[p], True) for p in pieces]
        no_sync = gradient_sync_pause(model)
        defer = accumulation_deferral(model)
        if not averages_gradients(model):
            warnings.warn(
                "select() chose one coreset across the ranks of the process group, but `model` is "
                "not DDP- or FSDP-wrapped: the gradients are only right if something averages them "
                "over the ranks (e.g. a DDP wrapper used inside loss_fn). Pass the wrapped model to "
                "CoresetOptimizer or to select(model=...), or distributed=False to select per rank "
                "(docs/distributed.md)",
                stacklevel=3,
            )
        if no_sync is not None:
            wanted = 1
        else:
            per_rank = [
                split_selection(indices, weights, a, a + n)[0].numel() for a, n in zip(self._offsets(), self.sizes)
            ]
            step = micro_batch_size or max(1, max(per_rank))
            wanted = max(max(1, math.ceil(k / step)) for k in per_rank)
        local_valid = torch.nonzero(valid[self.start : self.stop]).flatten()
        filler = local_valid[:1].cpu() if local_valid.numel() else torch.zeros(1, dtype=torch.long)
        while len(calls) < wanted:
            calls.append((filler, torch.zeros(1), False))
        rank_denominator = denominator / self.world_size  # DDP averages over the ranks
        total = torch.zeros((), dtype=torch.float32)
        for i, (idx, w, real) in enumerate(calls):
            last = i == len(calls) - 1
            pause = no_sync or defer
            quiet = pause() if pause is not None and not last else contextlib.nullcontext()
            with quiet:
                part = backward_weighted_losses(loss_fn, index_batch(batch, idx), w, rank_denominator)
            if real:
                total = total.to(part.device) + part.float()
        device = comm_device(self.group, total.device)
        reduced = total.to(device)
        dist.all_reduce(reduced, group=self.group)
        loss = (reduced / self.world_size).to(total.device)
        return index_batch(batch, local), local, local_w, loss

    def _offsets(self) -> list[int]:
        return [sum(self.sizes[:r]) for r in range(self.world_size)]
