"""``CoresetTrainer``: the Hugging Face ``Trainer`` training on a weighted coreset of each micro-batch.

The method lives in two mixins that compose with any ``transformers.Trainer`` subclass:
:class:`CoresetArguments` (the options, mixed into the trainer's arguments dataclass) and
:class:`CoresetTrainerMixin` (the overrides below). ``CoresetTrainer`` is
``CoresetTrainerMixin + Trainer`` with ``CoresetTrainingArguments = CoresetArguments +
TrainingArguments``; :mod:`coreset_optim.integrations.trl` builds ``CoresetSFTTrainer`` the same
way on TRL's ``SFTTrainer``.

Two overrides carry the method; nothing of the inner training loop is copied:

* ``create_optimizer`` lets the Trainer build whatever ``optim=`` names (or take the optimizer the
  user passed) and wraps it in :class:`~coreset_optim.CoresetOptimizer`; accelerate then wraps that.
* ``training_step`` runs ``select()`` on the micro-batch (the "large batch": its size is
  ``per_device_train_batch_size``), which backpropagates only the coreset.

Loss scale: ``select`` adds ``loss_scale * sum_j w_j grad(loss_j) / N`` to ``.grad`` with
``loss_scale = 1 / (micro-batches in this optimizer step)``, so one optimizer step's gradient is the
mean of its micro-batches' coreset estimates, each an estimate of that micro-batch's mean
per-example loss gradient. ``num_items_in_batch`` (the token count of the whole large batch) is not
used: a coreset's examples are weighted per example, not per token. This is also the value the
Trainer logs as ``loss``.

Two small glue overrides keep the source column alive: ``get_train_dataloader`` (the column
survives ``remove_unused_columns`` and the data collator, as a per-example list) and ``log``
(selection statistics join the training logs at ``logging_steps``).

Each selection is also an event for the Trainer's callbacks: ``on_selection(args, state, control,
coreset=..., inputs=..., **kwargs)``, called on every callback that defines it (see
:class:`CoresetCallback`).

Engines (``docs/distributed.md``): DDP; FSDP2 (``fsdp=True``, ``fsdp_config={"version": 2}``: the sketch
layers follow the sharded parameters, FSDP2's mixed-precision dtypes are set before the first
sketch pass); DeepSpeed ZeRO 1-3 (``deepspeed=config`` without an ``optimizer`` section: the
coreset's backward goes through the engine, which steps at the accumulation boundary). Under both,
the selector's state is checkpointed beside the engine's (``coreset_optim.pt``). Refused:
DataParallel, FSDP1, fp16 loss scaling.
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..checkpoints import STATE_KEY
from ..config import CoresetConfig
from ..distributed import init_fsdp_dtypes
from ..methods.registry import resolve_options
from ..methods.base import SelectionMethod
from ..presets import DEFAULT_PRESET
from ..records import Coreset
from ..precondition.moments import has_second_moment, read_adam_moments
from ..optimizer import CoresetOptimizer
from ..sketch.capture import resolve_sketch_modules
from .causal_lm import causal_lm_loss_fn, causal_lm_per_example_loss

__all__ = [
    "CoresetArguments",
    "CoresetCallback",
    "CoresetTrainer",
    "CoresetTrainerMixin",
    "CoresetTrainingArguments",
    "causal_lm_per_example_loss",
    "unwrap_coreset_optimizer",
]

PerExampleLoss = Callable[[nn.Module, Mapping[str, Any]], torch.Tensor]

# Under FSDP, the CoresetOptimizer's own state in a Trainer checkpoint (see _save_optimizer_and_scheduler).
CORESET_STATE_NAME = "coreset_optim.pt"


# The default of the two options for which None is a value of its own (keep_sources, normalize):
# "take the preset's value".
PRESET = "preset"


@dataclass
class CoresetArguments:
    """The :class:`~coreset_optim.CoresetOptimizer` options, mixed into a ``TrainingArguments`` dataclass.

    ``per_device_train_batch_size`` is the large batch a coreset is selected from; give exactly one
    of ``coreset_size`` / ``coreset_ratio``. ``coreset_seed`` and ``coreset_micro_batch_size`` are
    ``CoresetOptimizer``'s ``seed`` and ``micro_batch_size`` (renamed: the Trainer has a ``seed``).
    Use it first among the bases: ``@dataclass class MyArgs(CoresetArguments, TrainingArguments)``.
    """

    coreset_size: Optional[int] = field(default=None, metadata={"help": "Examples selected per micro-batch."})
    coreset_ratio: Optional[float] = field(
        default=None, metadata={"help": "Fraction of each micro-batch selected (ceil)."}
    )
    source_column: Optional[str] = field(
        default=None, metadata={"help": "Dataset column naming each example's source (data mixture)."}
    )
    id_column: Optional[str] = field(
        default=None,
        metadata={
            "help": "Dataset column with each example's id, kept like source_column; names the rows in suspects_file."
        },
    )
    suspects_file: Optional[str] = field(
        default=None,
        metadata={
            "help": "JSON-lines file: per logging window, the ids (id_column) most often "
            "flagged as suspect (likely mislabeled) by selection='consensus_loss' or 'trimmed_loss'."
        },
    )
    # Every option below defaults to "not given" (None, or PRESET where None is a value), so that
    # CoresetOptimizer and the preset decide its value: defaults are stated once (CoresetConfig and
    # the selection method's fields), and whatever is given is passed through as given.
    keep_sources: Optional[Union[str, list]] = field(
        default=PRESET,
        metadata={"help": "'auto', None, or source ids whose examples are all kept; default: the preset's."},
    )
    sketch_modules: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Linear layers (names or regexes) to sketch; default: LoRA-B of the last v_proj."},
    )
    sketch_dim: Optional[int] = field(
        default=None, metadata={"help": "Sketch dimension after compression; default: the preset's."}
    )
    normalize: Optional[str] = field(
        default=PRESET, metadata={"help": "'adam', 'adam_update' or None; default: the preset's."}
    )
    similarity: Optional[str] = field(
        default=None, metadata={"help": "Similarity used by facility location; default: the preset's."}
    )
    sketch_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Chunk size of the passes over the large batch; default: the coreset size."}
    )
    sketch_block_bytes: Optional[int] = field(
        default=None,
        metadata={"help": "Bytes for one block of per-example gradients in the sketch pass; default 32 MiB."},
    )
    coreset_micro_batch_size: Optional[int] = field(
        default=None, metadata={"help": "Chunk size of the coreset's backward."}
    )
    coreset_seed: Optional[int] = field(
        default=None, metadata={"help": "Seed of the selection's random generator; default 0."}
    )
    coreset_preset: str = field(
        default=DEFAULT_PRESET, metadata={"help": "'default' or 'colm': fills the options not given."}
    )
    sketch: Optional[str] = field(
        default=None, metadata={"help": "'auto', 'exact', 'zeroth_order' or 'projection'; None: the preset's."}
    )
    selection: Optional[str] = field(
        default=None,
        metadata={
            "help": "A registered selection method (coreset_optim.METHODS: 'consensus_loss', 'loss', "
            "'trimmed_loss', 'gradient_matching', 'facility_location', 'random', 'target', ...); None: the preset's."
        },
    )
    suspect_report: Optional[str] = field(
        default=None,
        metadata={
            "help": "selection='anchored_consensus' (the default): what coreset.suspects and suspects_file hold, "
            "'confident' (the method's default) or 'avoided' (every row its choice avoided)."
        },
    )
    coreset_reference: Optional[str] = field(
        default=PRESET,
        metadata={
            "help": "selection='anchored_consensus' (the default): its reference, 'auto' (the base model, adapters "
            "off, for a peft LoRA model; the method's default), 'base' (require it) or None (no reference)."
        },
    )
    noise_gate: Optional[float] = field(
        default=None,
        metadata={
            "help": "selection='anchored_consensus': the running share its noise gate reads (logged as "
            "coreset/implausible_share) at which the choice avoids the rows the reference finds implausible; "
            "None: the method's default (0.18)."
        },
    )
    target_curvature: Optional[float] = field(
        default=None,
        metadata={"help": "selection='target': the method's curvature h of the second-order term (0: first order)."},
    )
    target_refresh: Optional[int] = field(
        default=None,
        metadata={"help": "selection='target': the method's refresh, selections between target-gradient refreshes."},
    )
    target_per_source: Optional[bool] = field(
        default=None, metadata={"help": "selection='target': the method's per_source (True: per-source budgets)."}
    )
    coreset_temperature: Optional[float] = field(
        default=None,
        metadata={
            "help": "How much each source counts: 1 as sampled, 2 temperature sampling, inf every source "
            "equally (CoresetOptimizer's temperature=); None: the preset's."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        config, _ = self.coreset_options()  # raises ValueError on bad options, before anything runs
        world = max(1, int(self.world_size))  # under torchrun the large batch spans all ranks
        large = self.per_device_train_batch_size * world
        if config.coreset_size is not None and config.coreset_size > large:
            raise ValueError(
                f"coreset_size={config.coreset_size} is larger than "
                f"per_device_train_batch_size={self.per_device_train_batch_size}"
                f" x {world} process(es), the large batch it is selected from; raise "
                "per_device_train_batch_size or lower coreset_size"
            )
        for name in ("source_column", "id_column", "suspects_file"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(f"{name} must be a str or None, got {value!r}")
        if self.suspects_file is not None and self.id_column is None:
            raise ValueError(
                "suspects_file names rows by their id: give id_column (a dataset column with one id per "
                "example, e.g. the row index) or leave suspects_file unset"
            )

    def coreset_options(self) -> tuple[CoresetConfig, SelectionMethod]:
        """The optimizer's shared options and selection method these arguments stand for
        (checked: ValueError/TypeError), as ``CoresetOptimizer`` would build them."""
        return resolve_options(**self.coreset_kwargs(with_modules=False))

    def coreset_kwargs(self, with_modules: bool = True) -> dict[str, Any]:
        """The keyword arguments of ``CoresetOptimizer`` these arguments stand for: exactly the
        options given (a value equal to a default included); the rest is left to the optimizer."""
        kwargs: dict[str, Any] = {"preset": self.coreset_preset}
        for field_name, option in OPTION_NAMES.items():
            value = getattr(self, field_name)
            if value is not (PRESET if field_name in ("keep_sources", "normalize", "coreset_reference") else None):
                kwargs[option] = value
        if with_modules:
            kwargs["sketch_modules"] = self.sketch_modules
        return kwargs


# CoresetArguments field -> CoresetOptimizer keyword (renamed where the Trainer has its own).
OPTION_NAMES = {
    "coreset_size": "coreset_size",
    "coreset_ratio": "coreset_ratio",
    "keep_sources": "keep_sources",
    "sketch_dim": "sketch_dim",
    "normalize": "normalize",
    "similarity": "similarity",
    "sketch_batch_size": "sketch_batch_size",
    "sketch_block_bytes": "sketch_block_bytes",
    "coreset_micro_batch_size": "micro_batch_size",
    "coreset_seed": "seed",
    "sketch": "sketch",
    "selection": "selection",
    "suspect_report": "suspect_report",
    "coreset_reference": "reference",
    "noise_gate": "noise_gate",
    "target_curvature": "curvature",
    "target_refresh": "refresh",
    "target_per_source": "per_source",
    "coreset_temperature": "temperature",
}


@dataclass
class CoresetTrainingArguments(CoresetArguments, TrainingArguments):
    """``TrainingArguments`` plus the :class:`~coreset_optim.CoresetOptimizer` options (:class:`CoresetArguments`)."""


def unwrap_coreset_optimizer(optimizer: Any) -> Any:
    """The innermost optimizer short of a CoresetOptimizer (peels accelerate's AcceleratedOptimizer
    and DeepSpeed's ZeRO optimizer, which is no ``torch.optim.Optimizer`` but has param groups)."""
    while not isinstance(optimizer, CoresetOptimizer):
        inner = getattr(optimizer, "optimizer", None)
        if not (isinstance(inner, torch.optim.Optimizer) or hasattr(inner, "param_groups")):
            break
        optimizer = inner
    return optimizer


class CoresetCallback(TrainerCallback):
    """A ``transformers.TrainerCallback`` with one more event, :meth:`on_selection`, which the coreset
    trainers (``CoresetTrainer``, ``CoresetSFTTrainer``, any ``CoresetTrainerMixin`` subclass) fire
    after every selection.

    Subclass it and override ``on_selection``, then pass it like any callback
    (``callbacks=[...]`` or ``trainer.add_callback``). Subclassing is a convenience: the trainers call
    ``on_selection`` on every callback in ``trainer.callback_handler.callbacks`` that has one, and
    leave the others (a plain ``TrainerCallback``) alone.
    """

    def on_selection(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        coreset: Coreset | None = None,
        inputs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """Called once per micro-batch (``training_step``), on every process, right after ``select()``.

        By then the coreset's weighted gradient has been added to ``.grad`` (the optimizer step of this
        accumulation window has not run: ``state.global_step`` counts the steps before it), and the
        selection statistics have been counted for the logs. ``coreset`` is the
        :class:`~coreset_optim.Coreset` that ``select()`` returned; ``inputs`` is this process's
        micro-batch as the training step received it, on the device, with the ``source_column`` and
        ``id_column`` still in it (per-example lists); ``coreset.local_indices`` index its rows (under
        torchrun ``coreset.indices`` index the global batch). ``kwargs`` are those of every Trainer
        event (``model``, ``optimizer``, ``lr_scheduler``, ``processing_class``, ``train_dataloader``,
        ``eval_dataloader``). Like other events it may set flags on ``control`` or return it.
        """


class _StateLeftAlone:
    """Stands in for the wrapped optimizer while :func:`selector_state` and :func:`load_selector_state`
    run: its param groups, an empty ``state_dict`` and a ``load_state_dict`` that changes nothing."""

    def __init__(self, optimizer: Any) -> None:
        self.param_groups = optimizer.param_groups

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state_dict: Any) -> None:
        del state_dict


@contextlib.contextmanager
def _wrapped_optimizer_left_alone(opt: CoresetOptimizer) -> Iterator[None]:
    inner = opt.optimizer
    opt.optimizer = _StateLeftAlone(inner)
    try:
        yield
    finally:
        opt.optimizer = inner


def selector_state(opt: CoresetOptimizer) -> dict:
    """``opt.state_dict()["coreset_optim"]`` (options, counters, generator, the method's state),
    without the wrapped optimizer's ``state_dict()``: FSDP and DeepSpeed save that state their way,
    and under ZeRO-3 its param groups are empty between steps (its ``state_dict()`` fails)."""
    with _wrapped_optimizer_left_alone(opt):
        return opt.state_dict()[STATE_KEY]


def load_selector_state(opt: CoresetOptimizer, own: dict) -> None:
    """``opt.load_state_dict`` of the selector's part only (what :func:`selector_state` returned),
    leaving the wrapped optimizer's state as FSDP or DeepSpeed loaded it."""
    with _wrapped_optimizer_left_alone(opt):
        opt.load_state_dict({STATE_KEY: own})


class SourceCollator:
    """Takes the kept columns (sources, ids) out of each feature before the user's collator, and
    puts them back into the batch as per-example lists (collators drop or choke on such columns)."""

    def __init__(self, collator: Callable, columns: str | Sequence[str]) -> None:
        self.collator = collator
        self.columns = [columns] if isinstance(columns, str) else list(columns)

    def __call__(self, features: Sequence[Any]) -> Any:
        kept: dict[str, list] = {c: [] for c in self.columns}
        stripped = []
        for f in features:
            for column in self.columns:
                if not isinstance(f, Mapping) or column not in f:
                    keys = list(f) if isinstance(f, Mapping) else type(f).__name__
                    raise ValueError(
                        f"column {column!r} (source_column/id_column) is missing from a training example (it "
                        f"has {keys}); add the column to the dataset or unset the option"
                    )
                kept[column].append(f[column])
            stripped.append({k: v for k, v in f.items() if k not in kept})
        batch = self.collator(stripped)
        for column, values in kept.items():
            batch[column] = [v.item() if isinstance(v, torch.Tensor) else v for v in values]
        return batch


def _process_rank() -> int:
    """This process's rank under torch.distributed (0 without it)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _first_example(dataset: Any) -> Any:
    try:
        return dataset[0]
    except Exception:  # noqa: BLE001 - iterable datasets have no index; checked per batch instead
        return None


class CoresetTrainerMixin:
    """The coreset training step for a ``transformers.Trainer`` subclass: put it first among the bases.

    ``per_example_loss(model, inputs) -> Tensor[n]`` gives one loss per example; the default is
    the causal-LM loss (mean over each example's label tokens, ``-100`` ignored, labels shifted).
    ``target_dataset``: held-out examples (a dataset or a list of features, collated like the
    training data) that ``selection="target"`` aims at.
    The arguments must be a :class:`CoresetArguments` dataclass (``arguments_class``).

    After each selection the trainer calls ``on_selection(args, state, control, coreset=...,
    inputs=..., **kwargs)`` on every callback that defines it (see :class:`CoresetCallback`);
    callbacks without the method are not affected.
    """

    arguments_class: type = CoresetArguments

    def __init__(
        self, *args: Any, per_example_loss: PerExampleLoss | None = None, target_dataset: Any = None, **kwargs: Any
    ) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if not isinstance(training_args, CoresetArguments):
            raise TypeError(
                f"{type(self).__name__} needs args={self.arguments_class.__name__}(...), got "
                f"{type(training_args).__name__}"
            )
        if per_example_loss is not None and not callable(per_example_loss):
            raise TypeError("per_example_loss must be callable (model, inputs) -> Tensor[n]")
        self._check_coreset_arguments(training_args, per_example_loss)
        self.target_dataset = target_dataset
        super().__init__(*args, **kwargs)
        self.per_example_loss = per_example_loss
        self._coreset_stats: dict[str, float] = {}
        self._suspect_counts: dict[Any, int] = {}  # id -> times flagged in this logging window
        self._moments_checked = False
        self._fsdp_initialized = False  # see training_step
        self._selection_inputs: Mapping[str, Any] | None = None
        self._check_coreset_setup()
        self._selection_events()  # a non-callable on_selection fails here, before training

    def _check_coreset_arguments(self, args: Any, per_example_loss: PerExampleLoss | None) -> None:
        """Refuse options the coreset step cannot honour, before the base trainer is built (subclasses add)."""

    # --- checks before training --------------------------------------------------------------
    def _check_coreset_setup(self) -> None:
        args = self.args
        name = type(self).__name__
        if args.n_gpu > 1:
            raise ValueError(
                f"{name} runs one device per process, not DataParallel (n_gpu={args.n_gpu} GPUs in one "
                "process); launch one process per GPU with torchrun or accelerate launch (DDP, or FSDP2 with "
                "fsdp=True, fsdp_config={'version': 2}; see docs/distributed.md)"
            )
        if getattr(self, "is_fsdp_enabled", False):
            version = getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1)
            if version != 2:
                raise ValueError(
                    f"{name} supports FSDP2 (fully_shard) only, got FSDP version {version}: under FSDP1 each rank "
                    "holds flat slices of the parameters and of Adam's state, which the sketch normalization "
                    "cannot read (FSDP2 keeps per-parameter DTensors); set fsdp_config={'version': 2} "
                    "(transformers' default) or fsdp_version: 2 in the accelerate config"
                )
        if getattr(self, "is_deepspeed_enabled", False):
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            if "optimizer" in config:
                raise ValueError(
                    f"{name} wraps the optimizer the Trainer builds (optim=...), but the DeepSpeed config has an "
                    "'optimizer' section, so DeepSpeed builds its own and there is nothing to wrap; remove the "
                    "section (the 'scheduler' section may stay) and choose the optimizer with optim="
                )
            if str(config.get("fp16", {}).get("enabled", False)).lower() == "true":
                raise ValueError(
                    f"{name} does not support fp16 with loss scaling under DeepSpeed (the coreset's backward "
                    "is not scaled); set fp16.enabled to false (or 'auto' with fp16=False) and use bf16"
                )
        if args.fp16:
            raise ValueError(
                f"{type(self).__name__} does not support fp16 with a gradient scaler (the coreset's backward "
                "is not scaled); use bf16=True or fp32"
            )
        optim = getattr(args.optim, "value", args.optim)
        if optim in ("lomo", "adalomo"):
            raise ValueError(
                f"optim={optim!r} fuses the update into the backward pass and needs the Trainer's "
                f"own training_step; {type(self).__name__} cannot wrap it. Use an Adam-type optimizer"
            )
        target = getattr(self, "target_dataset", None)
        if callable(getattr(args.coreset_options()[1], "set_target", None)) != (target is not None):
            raise ValueError(
                f"selection='target' and {type(self).__name__}(target_dataset=...) go together: pass the "
                "held-out examples to aim at, or leave both unset"
            )
        if target is not None and len(target) == 0:
            raise ValueError("target_dataset is empty; pass at least one held-out example")
        if args.label_smoothing_factor and self.per_example_loss is None:
            raise ValueError(
                f"label_smoothing_factor={args.label_smoothing_factor} is not applied by the default "
                f"causal-LM per-example loss; pass {type(self).__name__}(per_example_loss=...) that applies it, "
                "or set label_smoothing_factor=0"
            )
        for option, column in self._kept_columns().items():
            if self.train_dataset is None:
                break
            names = getattr(self.train_dataset, "column_names", None)
            if names is None:
                first = _first_example(self.train_dataset)
                names = list(first) if isinstance(first, Mapping) else None
            if names is not None and column not in names:
                raise ValueError(
                    f"{option}={column!r} is not a column of the training dataset (columns: "
                    f"{list(names)}); add it or set {option}=None"
                )

    def _kept_columns(self) -> dict[str, str]:
        """The dataset columns the coreset step needs besides the model's inputs, by option name."""
        names = ("source_column", "id_column")
        return {n: getattr(self.args, n) for n in names if getattr(self.args, n) is not None}

    # --- the optimizer -------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the optimizer ``optim=`` names (or take the one passed in) and wrap it once."""
        self._check_coreset_setup()
        self._fsdp_initialized = False
        built = unwrap_coreset_optimizer(super().create_optimizer(model))
        if isinstance(built, CoresetOptimizer):
            self.optimizer = built
            return built
        normalize = getattr(self.args.coreset_options()[1], "normalize", None)  # None: no sketch
        if normalize is not None and not any(has_second_moment(g) for g in built.param_groups):
            raise ValueError(
                f"optim={getattr(self.args.optim, 'value', self.args.optim)!r} built {type(built).__name__}, "
                "which keeps no Adam second "
                f"moment, but normalize={normalize!r} needs one. Use an Adam-type optimizer "
                "(adamw_torch, adamw_bnb_8bit, paged_adamw_8bit, ...) or set normalize=None to select "
                "on raw gradients"
            )
        self.optimizer = CoresetOptimizer(built, self.model if model is None else model, **self.args.coreset_kwargs())
        if self.target_dataset is not None:
            self.optimizer.selection.set_target(self._target_batch())
        return self.optimizer

    def _target_batch(self) -> dict[str, Any]:
        """``target_dataset`` as one batch, collated and placed like a training batch."""
        data = self.target_dataset
        if (
            self.args.remove_unused_columns
            and hasattr(data, "column_names")
            and hasattr(self, "_remove_unused_columns")
        ):
            data = self._remove_unused_columns(data, description="target")
        features = [data[i] for i in range(len(data))]
        kept = set(self._kept_columns().values())
        if kept:
            features = [
                {k: v for k, v in f.items() if k not in kept} if isinstance(f, Mapping) else f for f in features
            ]
        return dict(self._prepare_inputs(self.data_collator(features)))

    # --- checkpoints under FSDP ----------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """Under FSDP the Trainer saves the optimizer through ``torch.distributed.checkpoint``, which
        keeps only ``state`` and ``param_groups`` of its state dict, and under DeepSpeed through the
        engine, which keeps only the per-parameter state: the selector's own state (options,
        counters, generator, the method's state) goes to ``coreset_optim.pt`` beside it."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self._engine_checkpoints() and self.args.should_save:
            torch.save(selector_state(self.coreset_optimizer), os.path.join(output_dir, CORESET_STATE_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Load what :meth:`_save_optimizer_and_scheduler` wrote, after the Trainer's own loading."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or not self._engine_checkpoints():
            return
        path = os.path.join(checkpoint, CORESET_STATE_NAME)
        if not os.path.isfile(path):
            warnings.warn(
                f"{checkpoint} has no {CORESET_STATE_NAME} (not saved by {type(self).__name__} under FSDP or "
                "DeepSpeed): the selection's counters, generator and method state start afresh",
                stacklevel=2,
            )
            return
        load_selector_state(self.coreset_optimizer, torch.load(path, weights_only=True))

    def _engine_checkpoints(self) -> bool:
        """Whether FSDP or DeepSpeed checkpoints the optimizer (both drop the selector's state)."""
        return bool(getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False))

    @property
    def coreset_optimizer(self) -> CoresetOptimizer:
        """The CoresetOptimizer inside whatever wraps it now (e.g. accelerate)."""
        opt = unwrap_coreset_optimizer(self.optimizer)
        if not isinstance(opt, CoresetOptimizer):
            raise RuntimeError("the optimizer is not a CoresetOptimizer; call create_optimizer() first")
        return opt

    # --- data ----------------------------------------------------------------------------------
    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        """The Trainer's loader, with the source and id columns kept (training only, not evaluation)."""
        columns = list(self._kept_columns().values())
        if not columns:
            return super().get_train_dataloader()
        collator = self.data_collator
        signature = None
        if self.args.remove_unused_columns and hasattr(self, "_set_signature_columns_if_needed"):
            self._set_signature_columns_if_needed()
            signature = list(self._signature_columns)
            self._signature_columns = signature + columns
        self.data_collator = SourceCollator(collator, columns)
        try:
            return super().get_train_dataloader()
        finally:
            self.data_collator = collator
            if signature is not None:
                self._signature_columns = signature

    # --- one micro-batch -----------------------------------------------------------------------
    def _per_example_losses(self, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
        with self.compute_loss_context_manager():
            if self.per_example_loss is not None:
                return self.per_example_loss(model, inputs)
            return causal_lm_loss_fn(model)(inputs)

    def training_step(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        """Select a coreset of the micro-batch and backpropagate it (instead of the whole batch)."""
        del num_items_in_batch  # counts tokens of the whole large batch: not the coreset's scale
        model.train()
        received = dict(self._prepare_inputs(inputs))  # what on_selection gets: the kept columns still in it
        inputs = dict(received)
        sources = None
        if self.args.source_column is not None:
            if self.args.source_column not in inputs:
                raise ValueError(
                    f"source_column={self.args.source_column!r} is missing from the batch; keep it in "
                    f"the dataset ({type(self).__name__} keeps it through remove_unused_columns and the collator)"
                )
            sources = inputs.pop(self.args.source_column)
        ids = None
        if self.args.id_column is not None:
            if self.args.id_column not in inputs:
                raise ValueError(f"id_column={self.args.id_column!r} is missing from the batch; keep it in the dataset")
            ids = inputs.pop(self.args.id_column)
        opt = self.coreset_optimizer
        self._rebind_sketch_layers(opt)  # FSDP2 shards the model after the optimizer is built
        if not self._fsdp_initialized:
            # FSDP2 fixes its mixed-precision dtypes at the first forward: not in the sketch pass
            self._fsdp_initialized = init_fsdp_dtypes(model) or True
        engine = model if getattr(self, "is_deepspeed_enabled", False) else None
        if engine is not None:
            self._link_deepspeed_moments(opt)
        self._check_moments_once(opt)
        steps = getattr(self, "current_gradient_accumulation_steps", None) or self.args.gradient_accumulation_steps
        if engine is None:
            loss_fn, loss_scale = (lambda batch: self._per_example_losses(model, batch)), 1.0 / steps
        else:
            self._check_deepspeed_sketch_layers(opt)
            loss_fn, loss_scale = self._deepspeed_loss(engine, steps)
        self._selection_inputs = inputs  # the micro-batch select() chooses from (see CoresetSFTTrainer)
        try:
            coreset = opt.select(
                inputs,
                loss_fn,
                sources=sources,
                loss_scale=loss_scale,
                model=model,  # the DDP/FSDP/DeepSpeed wrapper: select() pauses its gradient sync where it can
            )
        finally:
            self._selection_inputs = None
        if engine is not None and self.accelerator.sync_gradients:
            engine.step()  # as accelerate's backward does at the boundary (the Trainer's optimizer.step() is a no-op)
        self._record_selection(coreset)
        if ids is not None and self.args.suspects_file is not None:
            self._count_suspects(coreset, ids)
        self._on_selection(coreset, received)
        # The Trainer logs what this returns as "loss": the large batch's mean loss, as plain
        # training would report it (the coreset's weighted loss is logged as "coreset/loss").
        # A method that makes no pass over the batch (selection="random") computes no such loss:
        # Coreset.batch_loss is then the coreset's weighted loss, and the two logs agree.
        return coreset.batch_loss.detach().to(coreset.loss.device) / steps

    @staticmethod
    def _rebind_sketch_layers(opt: CoresetOptimizer) -> None:
        """Point the sketch layers at the parameters their modules hold now.

        The Trainer builds the optimizer before Accelerate shards the model under FSDP2
        (``fully_shard`` replaces every parameter by a sharded DTensor, in place, and Accelerate
        switches the wrapped optimizer's param groups to them): the layers found at construction
        then still hold the replaced tensors, which the optimizer no longer has. Same names, new
        parameters; nothing happens when they are current."""
        current = all(
            t.params and t.params[0] is t.module.weight and (not t.with_bias or t.params[-1] is t.module.bias)
            for t in opt.sketch_layers
        )
        if not current:
            opt.sketch_layers = resolve_sketch_modules(opt.model, opt.optimizer, [t.name for t in opt.sketch_layers])

    def _deepspeed_loss(self, engine: nn.Module, steps: int) -> tuple[Callable[[Any], torch.Tensor], float]:
        """The per-example loss and loss scale of one micro-batch under DeepSpeed.

        The coreset's backward runs through the engine's forward, whose hooks make ``loss.backward()``
        DeepSpeed's backward (ZeRO's reduction into partitions, at the accumulation boundary set here
        as accelerate sets it). The engine divides every backward by its gradient_accumulation_steps,
        which the scale undoes: one step's gradient is still the mean of its micro-batches' coreset
        estimates. The sketch pass (eval mode, only the sketched layers trainable, gradients taken
        with ``torch.autograd.grad``: nothing for ZeRO to reduce) runs on the engine's module."""
        engine.set_gradient_accumulation_boundary(self.accelerator.sync_gradients)
        inner = engine.module

        def loss_fn(batch: Any) -> torch.Tensor:
            return self._per_example_losses(engine if inner.training else inner, batch)

        return loss_fn, engine.gradient_accumulation_steps() / steps

    def _link_deepspeed_moments(self, opt: CoresetOptimizer) -> None:
        """ZeRO-1/2 link each parameter to its slice of Adam's state at the first step, not when a
        checkpoint is loaded; the sketch normalization reads that state before the resumed first step
        (``safe_get_full_optimizer_state`` fails on an unlinked one). DeepSpeed's own lazy link, once."""
        zero = getattr(self.optimizer, "optimizer", None)  # accelerate's wrapper holds ZeRO's optimizer
        link = getattr(zero, "_lazy_init_hp_params_optimizer_state", None)
        if callable(link) and len(opt.state):
            link()

    @staticmethod
    def _check_deepspeed_sketch_layers(opt: CoresetOptimizer) -> None:
        """ZeRO-3 keeps whole only parameters below ``stage3_param_persistence_threshold``; the sketch
        reads its layers' weights outside the forward, so they must be such persistent parameters."""
        for layer in opt.sketch_layers:
            for p in layer.params:
                if getattr(p, "ds_persist", True) is False:
                    raise ValueError(
                        f"DeepSpeed ZeRO-3 partitions the sketched layer {layer.name!r} ({getattr(p, 'ds_numel', '?')} "
                        "values, above stage3_param_persistence_threshold); sketch a smaller layer (sketch_modules=, "
                        "e.g. LoRA's default) or raise stage3_param_persistence_threshold in the DeepSpeed config"
                    )

    def _check_moments_once(self, opt: CoresetOptimizer) -> None:
        """After the first optimizer step, the normalization must find Adam's second moment."""
        if self._moments_checked or getattr(opt.selection, "normalize", None) is None or opt.num_steps == 0:
            return
        self._moments_checked = True
        for layer in opt.sketch_layers:
            for p in layer.params:
                if read_adam_moments(opt.optimizer, p) is None:
                    raise ValueError(
                        f"after the first step, {type(opt.optimizer).__name__} has no Adam second moment "
                        f"for {layer.name!r} in a layout coreset_optim reads (exp_avg_sq, or "
                        f"bitsandbytes state2); set normalize=None or use an Adam-type optimizer"
                    )

    # --- statistics ----------------------------------------------------------------------------
    def _record_selection(self, coreset: Coreset) -> None:
        """Add one selection's counts and timings to the statistics of the logging window."""
        stats = self._coreset_stats
        stats["coreset/selections"] = stats.get("coreset/selections", 0) + 1
        stats["coreset/selected"] = stats.get("coreset/selected", 0) + len(coreset)
        stats["coreset/invalid"] = stats.get("coreset/invalid", 0) + coreset.num_invalid
        stats["coreset/loss"] = stats.get("coreset/loss", 0.0) + coreset.loss.detach()  # read at logging
        if len(coreset.source_counts) > 1 or self.args.source_column is not None:
            for source, count in coreset.source_counts.items():
                for what, value in (("selected", count.selected), ("in_batch", count.in_batch)):
                    key = f"coreset/{what}/{source}"
                    stats[key] = stats.get(key, 0) + value
        if coreset.suspects is not None and coreset.source_codes is not None:
            # flagged per source, kept on the device until logging (no host sync per step)
            codes = coreset.source_codes.to(coreset.suspects.device, non_blocking=True)
            flagged = torch.bincount(codes, weights=coreset.suspects.float(), minlength=len(coreset.source_counts))
            for i, (source, count) in enumerate(coreset.source_counts.items()):
                for what, value in (("suspects", flagged[i]), ("judged", count.in_batch)):
                    key = f"coreset/{what}/{source}"
                    stats[key] = stats.get(key, 0) + value
        for stage, seconds in coreset.timings.items():
            key = f"coreset/time_{stage}"
            stats[key] = stats.get(key, 0.0) + seconds

    def _selection_events(self) -> list[Callable[..., Any]]:
        """The ``on_selection`` methods of the trainer's callbacks, in their order."""
        events = []
        for callback in self.callback_handler.callbacks:
            event = getattr(callback, "on_selection", None)
            if event is None:
                continue
            if not callable(event):
                raise TypeError(
                    f"callback {type(callback).__name__}.on_selection must be a method "
                    f"(args, state, control, coreset=..., inputs=..., **kwargs), got {type(event).__name__}"
                )
            events.append(event)
        return events

    def _on_selection(self, coreset: Coreset, inputs: Mapping[str, Any]) -> None:
        """Fire ``on_selection`` on every callback that has it, as ``CallbackHandler.call_event`` fires
        the Trainer's own events (the same keyword arguments; a returned ``control`` replaces it)."""
        handler = self.callback_handler
        names = ("model", "processing_class", "optimizer", "lr_scheduler", "train_dataloader", "eval_dataloader")
        kwargs = {name: getattr(handler, name, None) for name in names}
        for event in self._selection_events():
            result = event(self.args, self.state, self.control, coreset=coreset, inputs=inputs, **kwargs)
            if result is not None:
                self.control = result

    def _count_suspects(self, coreset: Coreset, ids: Sequence[Any]) -> None:
        """Count, per id of this process's examples, how often the selector flagged it as suspect."""
        if coreset.suspects is None:
            return
        rank = _process_rank()
        start = sum(coreset.rank_sizes[:rank]) if len(coreset.rank_sizes) > 1 else 0
        flags = coreset.suspects[start : start + len(ids)].tolist()
        counts = self._suspect_counts
        for example_id, flagged in zip(ids, flags):
            if flagged:
                counts[example_id] = counts.get(example_id, 0) + 1

    def _write_suspects(self, shares: Mapping[Any, float], implausible: float | None = None) -> None:
        """Append the window's suspects (most often flagged first), each source's suspect share and
        the running share of rows the reference finds implausible (None without one) to
        ``suspects_file``: one JSON line per logging window, per process (``.rank<N>`` appended to
        the name when there are several)."""
        counts, self._suspect_counts = self._suspect_counts, {}
        if not counts and not shares:
            return
        path = self.args.suspects_file
        if int(self.args.world_size) > 1:
            path = f"{path}.rank{_process_rank()}"
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
        with open(path, "a") as f:
            f.write(
                json.dumps(
                    {
                        "step": self.state.global_step,
                        "suspects": [[i, n] for i, n in ranked],
                        "suspect_share": dict(shares),
                        "implausible_share": implausible,
                    },
                    default=str,
                )
                + "\n"
            )

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Training logs (those with ``loss``: the large batches' mean loss) also get the window's
        selection statistics: counts summed; ``coreset/time_<stage>`` as mean seconds and
        ``coreset/loss`` (the coreset's weighted loss, what was backpropagated) as the mean per selection."""
        if "loss" in logs and self._coreset_stats:
            stats = self._coreset_stats
            n = stats.get("coreset/selections", 1)
            for key, value in stats.items():
                if isinstance(value, torch.Tensor):  # read once per logging window
                    value = value.item()
                logs[key] = value / n if key.startswith("coreset/time_") or key == "coreset/loss" else value
            shares = suspect_shares(logs)
            logs.update({f"coreset/suspect_share/{source}": share for source, share in shares.items()})
            implausible = getattr(self.coreset_optimizer.selection, "implausible_share", None)
            if implausible is not None:  # the anchored default's running share, what its noise gate reads
                logs["coreset/implausible_share"] = implausible
            self._coreset_stats = {}
            if self.args.suspects_file is not None:
                self._write_suspects(shares, implausible)
        super().log(logs, *args, **kwargs)


def suspect_shares(logs: dict[str, Any]) -> dict[str, float]:
    """Per source, the share of the window's examples the method flagged as suspect, over the
    batches it judged (``coreset/suspects/<source>`` / ``coreset/judged/<source>``, the latter
    taken out of ``logs``): the method's running estimate of each source's noise rate."""
    shares = {}
    for key in [k for k in logs if k.startswith("coreset/judged/")]:
        source, judged = key.removeprefix("coreset/judged/"), float(logs.pop(key))
        if judged:
            shares[source] = float(logs[f"coreset/suspects/{source}"]) / judged
    return shares


class CoresetTrainer(CoresetTrainerMixin, Trainer):
    """``transformers.Trainer`` that backpropagates a weighted coreset of every micro-batch.

    ``per_example_loss(model, inputs) -> Tensor[n]`` gives one loss per example; the default is
    the causal-LM loss (mean over each example's label tokens, ``-100`` ignored, labels shifted).
    Needs :class:`CoresetTrainingArguments`. Each selection fires ``on_selection`` on the callbacks
    that define it (:class:`CoresetCallback`).
    """

    arguments_class = CoresetTrainingArguments
