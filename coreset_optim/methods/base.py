"""What ``select()`` asks a selection method, and the two shapes every built-in method takes.

A selection method is one object (a dataclass): its fields are its options, with their defaults
and their checks (``__post_init__``), and a few methods answer the pipeline's questions:

* :meth:`SelectionMethod.check`: is this batch something the method can select from? (before
  anything runs, so a bad call changes nothing);
* :meth:`SelectionMethod.prepare`: a stage before the pass over the batch (the target method's
  held-out gradient), skipped when every example is taken;
* :meth:`SelectionMethod.sketches`: the pass over the batch. The base class computes the losses
  only (one no-grad forward in chunks); :class:`SketchedMethod` adds the Adam-normalized,
  compressed per-example gradient sketch; a method whose ``reads_losses`` is False (``"random"``)
  gets no pass at all (:func:`unjudged`);
* :meth:`SelectionMethod.observe`: what the method keeps from the whole gathered batch before
  choosing (a running statistic across steps, e.g. the anchored default's noise gate);
* :meth:`SelectionMethod.choose`: ``k`` rows of one source's rows and their weights (the pure
  selectors of the other modules);
* :meth:`SelectionMethod.groups` / :meth:`SelectionMethod.suspects`: how budgets split (per
  source by default), and which examples look mislabeled (``None``: the method does not say);
* :meth:`SelectionMethod.state_dict` / :meth:`SelectionMethod.load_state_dict`: what a
  checkpoint keeps besides the options (e.g. a cache).

``coreset_optim.methods.registry`` maps the registered names (``selection="loss"``...) to the classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import nn

from ..precondition.normalize import normalize_sketches, NORMALIZE_MODES
from ..sketch.capture import sketch_mode, sketch_params, BatchPass, SketchLayer
from ..sketch.streaming import compressed_sketches, DEFAULT_BLOCK_BYTES
from ..checks import check_number, check_optional_positive_int, is_int
from ..records import ChooseContext, Layout, Sketches
from ..sketch.zeroth_order import fixed_direction, sketch_numel, zeroth_order_sketches

SKETCH_MODES = ("auto", "exact", "zeroth_order", "projection")


@dataclass
class SelectionContext:
    """Everything one ``select()`` call gives the method's stages: the pass over the batch and the
    optimizer's side (the wrapped optimizer, the generator, the batch's layout over the ranks)."""

    batch_pass: BatchPass
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    seed: int
    layout: Layout
    wrapper: nn.Module  # the module whose gradient sync is paused during passes
    num_selections: int  # selections made before this one
    timings: dict[str, float] = field(default_factory=dict)  # select()'s: a stage may time a sub-stage

    @property
    def layers(self) -> list[SketchLayer]:
        return self.batch_pass.layers


def losses_only(batch_pass: BatchPass) -> Sketches:
    """Per-example losses in eval mode, no gradient, ``chunk_size`` examples per call: the pass
    over the large batch never holds more activations than a forward of the coreset does. The
    rows have no columns."""
    with sketch_mode(batch_pass.model, []), torch.no_grad():
        losses = batch_pass.losses()
    rows = torch.empty(batch_pass.num_examples, 0, device=losses.device)
    return Sketches(rows, losses, torch.isfinite(losses).to(rows.device) & torch.isfinite(rows).all(1))


def unjudged(num_examples: int, device: torch.device) -> Sketches:
    """The rows of a batch no pass ran over: no columns, every loss NaN (never computed), every
    row valid (validity cannot be judged without a forward, so none is set aside)."""
    return Sketches(
        torch.empty(num_examples, 0, device=device),
        torch.full((num_examples,), float("nan"), device=device),
        torch.ones(num_examples, dtype=torch.bool, device=device),
    )


@dataclass(kw_only=True)
class SelectionMethod:
    """A selection rule that reads losses only. Subclasses set ``name`` and :meth:`choose`.

    ``sketch_batch_size``: examples per chunk of the passes over the large batch (None: the
    optimizer's ``micro_batch_size``, else the coreset size).

    ``reads_losses`` (class attribute): False for a rule that needs neither losses nor sketches
    (``"random"``). ``select()`` then makes no pass over the large batch: a step costs the coreset's
    forward and backward plus bookkeeping. Without a forward no example can be judged, so every row
    counts as valid, ``choose`` sees NaN losses, and an example whose loss is non-finite is only
    found in the coreset's backward (``CoresetOptimizer.select`` says what happens then).
    """

    name: ClassVar[str] = ""
    runs_on_host: ClassVar[bool] = False  # choose() wants host tensors (copied once for all sources)
    reads_losses: ClassVar[bool] = True  # False: no pass over the batch (see the class docstring)

    sketch_batch_size: int | None = None

    def __post_init__(self) -> None:
        check_optional_positive_int("sketch_batch_size", self.sketch_batch_size)

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls) if f.init)

    def options(self) -> dict[str, Any]:
        """The options as given to the constructor (what a checkpoint saves)."""
        return {name: getattr(self, name) for name in self.option_names()}

    # --- the stages ---------------------------------------------------------------------------
    def check(self, batch: Any, source_key: str | None) -> None:
        """ValueError/TypeError when this batch cannot be selected from; runs before anything."""

    def prepare(self, context: SelectionContext) -> None:
        """A stage before the pass over the batch (timed as ``"prepare"``); nothing by default."""

    def sketches(self, context: SelectionContext) -> Sketches:
        """This process's rows ``[B, d]``, losses ``[B]`` and validity; here losses only (d = 0)."""
        return losses_only(context.batch_pass)

    def compressed_width(self, rows: torch.Tensor) -> int:
        """Columns each source keeps when rows are compressed (the gather and the selector)."""
        return rows.shape[1]

    def groups(self, codes: torch.Tensor, num_sources: int, keep: list[bool]) -> tuple[torch.Tensor, int, list[bool]]:
        """How the budget is split: by default one group per source, ``keep`` kept whole."""
        return codes, num_sources, keep

    def observe(self, sketches: Sketches, codes: torch.Tensor, num_sources: int) -> None:
        """Read the whole (gathered) batch before any group is chosen: ``sketches`` (rows, losses,
        validity, reference losses), ``codes[B]`` each example's source among ``num_sources``.
        Called on every rank with the same rows, so state kept here agrees across ranks; not
        called when every example is taken. Nothing by default."""

    def choose(self, x: torch.Tensor, k: int, context: ChooseContext) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``k`` of one group's rows ``x[n, d]`` (``1 <= k < n``: the pipeline takes a group whole
        when its budget covers it) as local indices ``[k]``, and their weights ``[k]`` summing to
        ``n``, or None for ``n / k`` each. ``context``: the rows' batch indices, the batch's
        losses, the generator, the number of valid examples, a stopwatch."""
        raise NotImplementedError(f"{type(self).__name__} must define choose()")

    def suspects(
        self,
        compressed: torch.Tensor,
        losses: torch.Tensor,
        valid: torch.Tensor,
        codes: torch.Tensor,
        num_sources: int,
        reference_losses: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """``BoolTensor[B]``: examples that look mislabeled, or None (the method does not say).
        ``reference_losses``: the batch's losses under the method's reference (None: none)."""
        return None

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps besides the options (e.g. a cache); nothing by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"{type(self).__name__} keeps no state; got {sorted(state)}")

    def restored(self, options: dict[str, Any], state: dict[str, Any]) -> SelectionMethod:
        """A method of this class with a checkpoint's options and state (what it holds that is not
        saved, e.g. data, is carried over: :meth:`carry_over`)."""
        method = type(self)(**options)
        method.load_state_dict(state)
        self.carry_over(method)
        return method

    def carry_over(self, method: SelectionMethod) -> None:
        """Give ``method`` (of the same class) what this one holds and checkpoints do not save."""


@dataclass(kw_only=True)
class SketchedMethod(SelectionMethod):
    """A selection rule that reads each example's gradient sketch, as the wrapped optimizer will
    scale it. Options of the sketch pass:

    ``sketch``: "auto" (top coordinates while the batch's sketch-layer activations fit in 4
    blocks, else "projection"), "exact" (top ``sketch_dim`` coordinates per source), "projection"
    (a ``sketch_dim``-wide CountSketch, streamed), or "zeroth_order" (CoLM's SPSA estimate along
    ``zo_probes`` random directions, or one fixed for the run). ``normalize``: "adam" (divide by
    Adam's ``sqrt(v_hat) + eps``), "adam_update" (CoLM's per-example Adam update) or None (raw).
    ``sketch_block_bytes``: the bytes of one block of per-example gradients.
    """

    sketch: str = "auto"
    sketch_dim: int = 2560
    normalize: str | None = "adam"
    sketch_block_bytes: int = DEFAULT_BLOCK_BYTES
    zo_eps: float = 1e-3
    zo_probes: int = 1
    zo_fixed_direction: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sketch not in SKETCH_MODES:
            raise ValueError(f"sketch must be one of {SKETCH_MODES}, got {self.sketch!r}")
        if not is_int(self.sketch_dim) or self.sketch_dim <= 0:
            raise ValueError(f"sketch_dim must be a positive int, got {self.sketch_dim!r}")
        if self.normalize not in NORMALIZE_MODES:
            raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {self.normalize!r}")
        if not is_int(self.sketch_block_bytes) or self.sketch_block_bytes <= 0:
            raise ValueError(
                f"sketch_block_bytes must be a positive int (bytes for one block of per-example "
                f"gradients, e.g. 64 * 2**20), got {self.sketch_block_bytes!r}"
            )
        ok = isinstance(self.zo_eps, (int, float)) and math.isfinite(self.zo_eps) and self.zo_eps > 0
        self.zo_eps = check_number("zo_eps", self.zo_eps, ok, "a positive finite float (e.g. 1e-3)")
        if not is_int(self.zo_probes) or self.zo_probes <= 0:
            raise ValueError(f"zo_probes must be a positive int (directions per step), got {self.zo_probes!r}")
        if not isinstance(self.zo_fixed_direction, bool):
            raise TypeError(f"zo_fixed_direction must be a bool, got {self.zo_fixed_direction!r}")
        if self.zo_fixed_direction and self.zo_probes != 1:
            raise ValueError(
                "zo_probes > 1 with zo_fixed_direction=True would repeat one direction; "
                "use zo_probes=1 or zo_fixed_direction=False"
            )

    def sketches(self, context: SelectionContext) -> Sketches:
        """Exact and projected sketches come out Adam-normalized and compressed, built block by
        block (:mod:`.streaming`: no ``[B, layer size]`` tensor exists); the layout's sources
        choose the top coordinates, and under torch.distributed the ranks agree on them while
        streaming. Zeroth-order sketches are normalized whole (they are ``zo_probes`` wide in
        direction space, D wide once expanded); rows the normalization makes non-finite become
        invalid, and ``Sketches.valid_before_normalization`` says so."""
        if self.sketch == "zeroth_order":
            return self._zeroth_order(context)
        layout = context.layout
        return Sketches(
            *compressed_sketches(
                context.batch_pass,
                optimizer=context.optimizer,
                normalize=self.normalize,
                sketch=self.sketch,
                dim=self.sketch_dim,
                seed=context.seed,
                source_codes=layout.local_codes,
                num_sources=len(layout.names),
                block_bytes=self.sketch_block_bytes,
                agreement=layout.agreement(),
            )
        )

    def _zeroth_order(self, context: SelectionContext) -> Sketches:
        layers = context.layers
        if self.zo_fixed_direction:
            directions = fixed_direction(sketch_numel(layers), context.seed)[None, :]
        else:
            directions = torch.randn(self.zo_probes, sketch_numel(layers), generator=context.generator)
        rows, losses = zeroth_order_sketches(context.batch_pass, eps=self.zo_eps, directions=directions)
        raw_valid = torch.isfinite(losses).to(rows.device) & torch.isfinite(rows).all(1)
        rows = normalize_sketches(rows, context.optimizer, sketch_params(layers), self.normalize)
        valid = raw_valid & torch.isfinite(rows).all(1)
        return Sketches(rows, losses, valid, valid_before_normalization=raw_valid)

    def compressed_width(self, rows: torch.Tensor) -> int:
        return self.sketch_dim
