"""Target-aware selection (GREATS's idea): the k examples whose update most lowers a target loss.

Given a small batch of held-out "target" examples, the greedy adds, one at a time, the example
whose gradient, once the optimizer has turned it into an update, is predicted to lower the
target's mean loss the most. The prediction is the second-order Taylor model of the target loss
along the step (derivation in ``docs/algorithm.md``, "Target-aware selection"):

    D(S) = sum_{j in S} c_j a_j - (h / 2) * || sum_{j in S} c_j delta_j ||^2,
    a_j = g_t . delta_j

where ``delta_j`` is example j's update per unit of its weight (its gradient, preconditioned by
the optimizer and scaled by the step size that this step's gradient gets), ``g_t`` the target's
mean (raw) gradient, ``c_j = w_j / N`` the coefficient the weighted step gives example j, and
``h`` the curvature of the target loss along the step (the Hessian taken as ``h * I``: ``h = 1``
is GREATS's identity Hessian, ``h = 0`` the first-order term alone). ``D`` is in units of the
target loss: the predicted decrease from the sketched parameters' part of the step.

The functions here are pure tensor math; :class:`TargetAware` (``selection="target"``) is the
method object: it holds the target batch, its options and the cached target gradient (saved in
checkpoints), computes the inputs (the target's mean gradient and each example's
``[a_j | delta_j]`` row, both folded block by block in :mod:`coreset_optim.sketch.streaming`; the
optimizer's step sizes) and chooses with :func:`greedy_target`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..batching import batch_size
from ..distributed import paused_gradient_sync
from ..records import ChooseContext
from ..timing import Stopwatch
from .base import SelectionContext, SketchedMethod
from ..checks import check_number, is_int
from ..precondition.moments import find_group, step_count
from ..sketch.projection import countsketch
from ..records import Sketches
from ..sketch.capture import sketch_params
from .target_passes import summed_gradients, target_sketches


def target_gradient(sketches: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """The target's mean gradient ``[D]`` from its per-example sketches ``[T, D]`` (the reference
    :meth:`TargetAware.prepare` is tested against).

    Raises ``ValueError`` unless every target example has a finite loss and gradient: a target
    with a NaN would silently drop an example the user chose, or poison every gain.
    """
    finite = torch.isfinite(losses).to(sketches.device) & torch.isfinite(sketches).all(1)
    summed = torch.where(finite[:, None], sketches, torch.zeros_like(sketches)).sum(0)
    return pooled_target_gradient(summed, finite)


def _same(summed: torch.Tensor, count: float, bad: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor]:
    return summed, count, bad


def pooled_target_gradient(
    summed: torch.Tensor,
    finite: torch.Tensor,
    sum_over_ranks: Callable[[torch.Tensor, float, torch.Tensor], tuple[torch.Tensor, Any, torch.Tensor]] = _same,
) -> torch.Tensor:
    """The target's mean gradient (float32) from the sum of its examples' gradients and which are
    finite (:func:`~coreset_optim.methods.target_passes.summed_gradients`), pooled over the ranks' targets by
    ``sum_over_ranks(summed, count, non-finite count)`` (the layout's; one process: nothing to
    pool, and ``summed`` is divided in place, no second layer-sized vector). ValueError when a
    target example (on any rank) has a non-finite loss or gradient: one host read."""
    if finite.numel() == 0:
        raise ValueError("target is empty (0 examples); pass at least one held-out example")
    summed, count, bad = sum_over_ranks(summed, float(finite.numel()), (~finite).sum())
    if bool(bad > 0):
        local = torch.nonzero(~finite).flatten().tolist()
        where = f"target examples {local[:10]}" if local else f"{int(bad)} target example(s) on other ranks"
        raise ValueError(
            f"{where} have a non-finite loss or gradient; fix or drop them (the target must be clean held-out examples)"
        )
    return summed.div_(count).float()


def step_sizes(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor]) -> list[float]:
    """Per parameter: the factor by which this step's gradient, once preconditioned, moves it.

    Adam-like groups (with ``betas``): ``lr * (1 - beta1) / (1 - beta1**(t + 1))`` with ``t`` the
    steps taken (the new gradient enters the first moment with weight ``1 - beta1``, bias
    correction divides by ``1 - beta1**(t+1)``; the part of the update that comes from earlier
    momentum does not depend on the selection and is left out). Other groups (SGD): ``lr``.
    """
    sizes = []
    for p in params:
        group = find_group(optimizer, p)
        lr = float(group["lr"])
        betas = group.get("betas")
        if betas is None:
            sizes.append(lr)
            continue
        t = step_count(optimizer.state.get(p) or {})
        beta1 = float(betas[0])
        sizes.append(lr * (1.0 - beta1) / (1.0 - beta1 ** (t + 1)))
    return sizes


def scale_columns(sketches: torch.Tensor, params: Sequence[torch.Tensor], sizes: Sequence[float]) -> torch.Tensor:
    """``sketches[n, sum numel]`` with each parameter's block of columns multiplied by its size."""
    scale = torch.cat([torch.full((p.numel(),), float(s), dtype=sketches.dtype) for p, s in zip(params, sizes)])
    return sketches * scale.to(sketches.device)


def predicted_decrease(
    updates: torch.Tensor, target_grad: torch.Tensor, coefficients: torch.Tensor, curvature: float
) -> torch.Tensor:
    """``D`` for one weighted set: ``c . (U g_t) - h/2 ||U^T c||^2`` (rows of ``updates``: delta_j).

    The reference the greedy is tested against.
    """
    u = updates.double()
    c = coefficients.double().to(u.device)
    step = c @ u
    first = step @ target_grad.double().to(u.device)
    return first - 0.5 * float(curvature) * step.dot(step)


def greedy_target(
    alignment: torch.Tensor,
    updates: torch.Tensor | None,
    k: int,
    coefficient: float,
    curvature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` rows maximizing ``D`` greedily, each with the same coefficient ``c``; and their gains.

    ``alignment[n]``: ``a_j``. ``updates[n, d]``: the rows ``delta_j`` (only read when
    ``curvature > 0``; may be compressed coordinates). The gain of adding j to S is

        c a_j - h c^2 (delta_j . sum_{i in S} delta_i + ||delta_j||^2 / 2)

    (exactly ``D(S + j) - D(S)``). Ties go to the lowest index. With ``curvature == 0`` this is the
    top-k of ``a`` (the optimum, since ``D`` is then modular). Returns (chosen in pick order,
    the gain of each pick), on ``alignment``'s device, without host synchronization.
    """
    n = alignment.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    a = alignment.double()
    c, h = float(coefficient), float(curvature)
    if h == 0.0 or updates is None:
        # Stable descending sort: equal gains keep the lowest index first.
        order = torch.sort(a, descending=True, stable=True).indices[:k]
        return order, c * a[order]
    u = updates.double().to(a.device)
    half_sq = 0.5 * u.square().sum(1)
    overlap = torch.zeros(n, dtype=torch.double, device=a.device)  # delta_j . sum_{i in S} delta_i
    taken = torch.zeros(n, dtype=torch.bool, device=a.device)
    chosen, gains = [], []
    minus_inf = torch.tensor(float("-inf"), dtype=torch.double, device=a.device)
    for _ in range(k):
        gain = c * a - h * c * c * (overlap + half_sq)
        gain = torch.where(taken, minus_inf, gain)
        j = torch.argmax(gain)  # first maximum: lowest index on ties
        chosen.append(j)
        gains.append(gain[j])
        taken[j] = True
        overlap = overlap + u @ u[j]
    return torch.stack(chosen), torch.stack(gains)


def target_features(
    normalized: torch.Tensor,
    target_grad: torch.Tensor,
    params: Sequence[torch.Tensor],
    sizes: Sequence[float],
    curvature: float,
    dim: int,
    seed: int,
) -> torch.Tensor:
    """What the greedy needs per example: ``[a_j | delta_j]`` rows, ``[B, 1 (+ d)]``, from whole
    normalized rows (the reference: ``select()`` folds the same rows block by block,
    :func:`coreset_optim.methods.target_passes.target_sketches`, never holding ``normalized``).

    ``a_j = g_t . delta_j`` on all sketch coordinates. The update rows are only needed for the
    second-order term (``curvature > 0``); beyond ``dim`` coordinates they are CountSketched
    (seeded, the same on every rank; inner products kept in expectation). Rows of invalid
    examples stay NaN.
    """
    updates = scale_columns(normalized, params, sizes)
    alignment = (updates @ target_grad.to(updates.device, updates.dtype))[:, None]
    if curvature <= 0:
        return alignment
    if updates.shape[1] > dim:
        updates = countsketch(updates, dim, seed)
    return torch.cat([alignment, updates], dim=1)


def target_coreset(
    x: torch.Tensor, k: int, curvature: float, total: int, watch: Stopwatch | None = None
) -> torch.Tensor:
    """The greedy on one group of rows.

    ``x[n, 1 + d]``: the group's :func:`target_features` rows; ``total``: N, the valid examples of
    the whole batch. Every chosen example gets weight n / k (the pipeline's default): the step
    applies the group's mean gradient over the chosen examples, the update whose effect the
    greedy predicted.
    """
    n = x.shape[0]
    coefficient = (n / k) / total
    updates = x[:, 1:] if curvature > 0 and x.shape[1] > 1 else None
    chosen, _ = greedy_target(x[:, 0], updates, k, coefficient, curvature)
    if watch is not None:
        watch.lap("greedy")
    return chosen


# --- the method object --------------------------------------------------------------------------


@dataclass(kw_only=True)
class TargetAware(SketchedMethod):
    """``selection="target"``: the examples whose update most lowers a held-out target's loss.

    Options: ``curvature`` (h >= 0 of the second-order term; 0: the first-order gain, the top-k
    alignments), ``refresh`` (selections between recomputations of the target's gradient),
    ``per_source`` (True: per-source budgets as the other methods; False: one greedy over the
    batch). The target itself is data, set with :meth:`set_target` and not checkpointed; the
    cached target gradient is (``state_dict``), and kept after a reload when the target set again
    is the same. Needs exact sketches and a per-coordinate normalization ("adam" or None).
    """

    name: ClassVar[str] = "target"

    curvature: float = 0.0
    refresh: int = 1
    per_source: bool = False
    target: Any = field(default=None, init=False, repr=False, compare=False)
    fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)
    cache: dict | None = field(default=None, init=False, repr=False, compare=False)
    _missing: list[str] = field(default_factory=list, init=False, repr=False, compare=False)
    _grad: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = isinstance(self.curvature, (int, float)) and math.isfinite(self.curvature) and self.curvature >= 0
        self.curvature = check_number(
            "curvature", self.curvature, ok, "a finite float >= 0 (0: first-order gains only)"
        )
        if not is_int(self.refresh) or self.refresh <= 0:
            raise ValueError(
                f"refresh must be a positive int (selections between target-gradient refreshes), got {self.refresh!r}"
            )
        if not isinstance(self.per_source, bool):
            raise TypeError(f"per_source must be a bool, got {self.per_source!r}")
        if self.normalize == "adam_update":
            raise ValueError(
                "selection='target' models the step as the gradient times Adam's current "
                "preconditioner (normalize='adam', or None for SGD-like optimizers); "
                "normalize='adam_update' is a per-example update with the momentum inside: use 'adam'"
            )
        if self.sketch not in ("auto", "exact"):
            raise ValueError(
                f"selection='target' needs exact sketches (the target's gradient is compared with each "
                f"example's on the same coordinates); got sketch={self.sketch!r}: use sketch='exact' (or 'auto')"
            )

    def set_target(self, target: Any) -> None:
        """The held-out examples to aim at (``None`` to clear): a batch like the training batches
        (same fields; the source field may be absent), small enough for one pass in
        ``sketch_batch_size`` chunks. Not saved in checkpoints (it is data): set it again after
        loading; the cached target gradient is kept when it is the same."""
        if target is None:
            self.target, self.fingerprint = None, None
            return
        batch_size(target)  # a clear error for an empty or malformed batch
        self.target, self.fingerprint = target, batch_fingerprint(target)

    def check(self, batch: Any, source_key: str | None) -> None:
        if self.target is None:
            raise ValueError(
                "selection='target' needs held-out target examples: call "
                "optimizer.selection.set_target(batch) once (CoresetTrainer: target_dataset=...)"
            )
        self._missing = check_target_structure(batch, self.target, source_key)

    def prepare(self, context: SelectionContext) -> None:
        """The target stage: the target's mean sketch gradient (over every rank's target), which
        :meth:`sketches` aligns each example's update with; recomputed every ``refresh``
        selections or when the target changes (the ranks decide together)."""
        try:
            self._grad = self._target_gradient(context)
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            if not self._missing:
                raise
            raise ValueError(
                f"loss_fn failed on the target ({type(exc).__name__}: {exc}); the target lacks the "
                f"batch's fields {self._missing}: give it the fields loss_fn reads"
            ) from exc

    def _target_gradient(self, context: SelectionContext) -> torch.Tensor:
        cache = self.cache
        stale = (
            cache is None
            or cache["fingerprint"] != self.fingerprint
            or context.num_selections - cache["computed_at"] >= self.refresh
        )
        if not context.layout.any_rank(stale):
            return cache["grad"]
        size = batch_size(self.target)
        with paused_gradient_sync(context.wrapper):
            summed, finite = summed_gradients(context.batch_pass.on(self.target, size), self.sketch_block_bytes)
        grad = pooled_target_gradient(summed, finite, context.layout.sum_over_ranks)
        self.cache = {"fingerprint": self.fingerprint, "grad": grad, "computed_at": context.num_selections}
        return grad

    def sketches(self, context: SelectionContext) -> Sketches:
        """Each example's ``[alignment | update]`` row against the target's gradient."""
        params = sketch_params(context.layers)
        return Sketches(
            *target_sketches(
                context.batch_pass,
                optimizer=context.optimizer,
                normalize=self.normalize,
                target_grad=self._grad,
                step_sizes=step_sizes(context.optimizer, params),
                curvature=self.curvature,
                dim=self.sketch_dim,
                seed=context.seed,
                block_bytes=self.sketch_block_bytes,
            )
        )

    def compressed_width(self, rows: torch.Tensor) -> int:
        return rows.shape[1]  # every feature: the alignment and the (already sketched) update

    def groups(self, codes, num_sources, keep):
        if self.per_source:
            return codes, num_sources, keep
        return torch.zeros_like(codes), 1, [False]  # one greedy over the batch, no per-source budgets

    def choose(self, x: torch.Tensor, k: int, context: ChooseContext) -> tuple[torch.Tensor, None]:
        return target_coreset(x, k, self.curvature, context.total, context.watch), None

    def state_dict(self) -> dict[str, Any]:
        cache = self.cache
        if cache is None:
            return {"cache": None}
        grad = cache["grad"].detach().cpu().clone()
        return {"cache": {"fingerprint": cache["fingerprint"], "grad": grad, "computed_at": cache["computed_at"]}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cache = state.get("cache")
        self.cache = None if cache is None else dict(cache)

    def carry_over(self, method: SketchedMethod) -> None:
        method.target, method.fingerprint = self.target, self.fingerprint


# --- the target batch ---------------------------------------------------------------------------


def _structure(batch: Any, skip: str | None, top: bool = True) -> Any:
    if batch is None:
        return None
    if isinstance(batch, torch.Tensor):
        return ("tensor", batch.ndim, batch.dtype)
    if type(batch).__module__ == "numpy" and hasattr(batch, "ndim"):
        return ("array", batch.ndim, str(batch.dtype))
    if isinstance(batch, Mapping):
        return {k: _structure(v, None, False) for k, v in batch.items() if not (top and k == skip)}
    if isinstance(batch, (tuple, list)):
        if top:
            return (type(batch).__name__, tuple(_structure(v, None, False) for v in batch))
        return "list"
    return type(batch).__name__


def check_target_structure(batch: Any, target: Any, source_key: str | None) -> list[str]:
    """``ValueError`` unless every field of ``target`` is a field of the batch of the same kind
    (tensor rank and dtype); returns the batch's fields the target lacks.

    A target may leave out fields (the source ids, metadata): if ``loss_fn`` needs one, the target
    pass says which (see ``CoresetOptimizer``).
    """
    want, got = _structure(batch, source_key), _structure(target, source_key)
    if isinstance(want, dict) and isinstance(got, dict):
        extra = [k for k in got if k not in want]
        clash = [k for k in got if k in want and got[k] != want[k]]
        if not extra and not clash:
            return [str(k) for k in want if k not in got]
    elif want == got:
        return []
    raise ValueError(
        f"target must have the batch's structure (its fields, tensor ranks and dtypes) so loss_fn "
        f"can score it; batch: {want}, target: {got}"
    )


def batch_fingerprint(batch: Any) -> str:
    """A hash of a (small) batch's structure and values: tells whether a cached target gradient
    belongs to the target now given (e.g. after a checkpoint reload and ``set_target`` again)."""
    digest = hashlib.sha256()

    def visit(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif type(x).__module__ == "numpy" and hasattr(x, "tobytes"):
            digest.update(f"A{x.dtype}{x.shape}".encode() + x.tobytes())
        elif isinstance(x, Mapping):
            for key in x:
                digest.update(f"K{key!r}".encode())
                visit(x[key])
        elif isinstance(x, (tuple, list)):
            digest.update(f"L{len(x)}".encode())
            for v in x:
                visit(v)
        else:
            digest.update(f"V{x!r}".encode())

    visit(batch)
    return digest.hexdigest()
