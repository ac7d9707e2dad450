"""Reading Adam's moments out of a wrapped optimizer's live state, without writing to it.

Recognized by keys and dtype, not class names:

* torch ``Adam``/``AdamW`` (and anything with the same layout): ``exp_avg``, ``exp_avg_sq``,
  ``max_exp_avg_sq`` (amsgrad), ``step`` (tensor or number).
* bitsandbytes ``Adam``/``AdamW`` in 8-bit (``state1``/``state2`` uint8 with code books
  ``qmap1``/``qmap2`` and per-block ``absmax1``/``absmax2``) and 32-bit (float ``state1``/``state2``),
  ``step`` an int. 8-bit values are dequantized blockwise, the block size inferred from the sizes.

Sharded state (see ``docs/distributed.md``):

* FSDP2 / DTensor: state tensors with ``full_tensor()`` are gathered whole (a collective: every
  rank must read the same parameters in the same order, which ``select()`` does). Tested on CPU.
* DeepSpeed ZeRO 1/2/3: parameters carrying ``_hp_mapping`` or ``ds_id`` are read through
  ``deepspeed.utils.safe_get_full_optimizer_state`` (a collective). Tested with DeepSpeed 0.19.8
  on CPU where it is installed (``tests/distributed/test_trainer_deepspeed.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class AdamMoments:
    """Adam's first and second moment of one parameter, as float32 tensors shaped like it."""

    exp_avg: torch.Tensor | None
    exp_avg_sq: torch.Tensor
    step: int
    beta1: float
    beta2: float
    eps: float
    max_exp_avg_sq: torch.Tensor | None = None  # amsgrad's running maximum, when in use

    @property
    def denominator_sq(self) -> torch.Tensor:
        """The second moment Adam divides by (the amsgrad maximum when there is one)."""
        return self.exp_avg_sq if self.max_exp_avg_sq is None else self.max_exp_avg_sq


def infer_block_size(numel: int, num_blocks: int) -> int:
    """The power-of-two block size that splits ``numel`` values into ``num_blocks`` blocks."""
    size = 1
    while size <= max(numel, 1) * 2:
        if -(-numel // size) == num_blocks:
            return size
        size *= 2
    raise ValueError(f"cannot infer a block size for {numel} values in {num_blocks} blocks")


def dequantize_range(
    codes: torch.Tensor, code_book: torch.Tensor, absmax: torch.Tensor, start: int, stop: int
) -> torch.Tensor:
    """Flat values ``start .. stop-1`` of a blockwise-quantized tensor, float32: only that range is decoded."""
    flat = codes.reshape(-1)
    block = infer_block_size(flat.numel(), absmax.numel())
    values = code_book.float().to(flat.device)[flat[start:stop].long()]
    which = torch.arange(start, stop, device=flat.device) // block
    return values * absmax.float().to(flat.device)[which]


def dequantize_blockwise(codes: torch.Tensor, code_book: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """``code_book[codes] * absmax[block]`` as float32, shaped like ``codes`` (bitsandbytes layout)."""
    return dequantize_range(codes, code_book, absmax, 0, codes.numel()).reshape(codes.shape)


RangeReader = Callable[[int, int], torch.Tensor]  # (start, stop) -> float32 flat values


def _bnb_reader(state: dict, which: int) -> RangeReader:
    tensor = state[f"state{which}"]
    if tensor.dtype == torch.uint8:
        qmap, absmax = state.get(f"qmap{which}"), state.get(f"absmax{which}")
        if qmap is None or absmax is None:
            raise ValueError(
                f"8-bit state{which} without qmap{which}/absmax{which}: blockwise quantization "
                "is required (bitsandbytes' default, block_wise=True)"
            )
        return lambda a, b: dequantize_range(tensor, qmap, absmax, a, b)
    flat = tensor.reshape(-1)
    return lambda a, b: flat[a:b].float()


def _tensor_reader(tensor: torch.Tensor) -> RangeReader:
    """Slices of a state tensor; a sharded one (DTensor) is gathered once, at the first read."""
    whole: list[torch.Tensor] = []

    def read(a: int, b: int) -> torch.Tensor:
        if not whole:
            whole.append(full_tensor(tensor).reshape(-1))
        return whole[0][a:b].float()

    return read


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (FSDP2); other tensors as they are."""
    gather = getattr(tensor, "full_tensor", None)
    return gather() if callable(gather) else tensor


def is_deepspeed_param(param: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO owns ``param``'s optimizer state (stage 1/2: ``_hp_mapping``, 3: ``ds_id``).

    Stage 1/2 sets ``_hp_mapping`` on every parameter, ``None`` where none of it lies in this
    rank's partition (``deepspeed.utils.safe_get_full_optimizer_state`` tests the same way)."""
    return hasattr(param, "_hp_mapping") or hasattr(param, "ds_id")


def full_shape(param: torch.Tensor) -> torch.Size:
    """The parameter's shape, also while DeepSpeed ZeRO-3 holds it partitioned (``ds_shape``; the
    tensor itself is then empty)."""
    return torch.Size(getattr(param, "ds_shape", param.shape))


def step_count(state: dict) -> int:
    step = state.get("step", 0)
    if isinstance(step, torch.Tensor):
        step = step.item()
    return int(step)


def find_group(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> dict:
    for group in optimizer.param_groups:
        if any(p is param for p in group["params"]):
            return group
    if is_deepspeed_param(param):
        # ZeRO replaces the groups' params by flat fp32 partitions; stage 1/2 records the index.
        index = getattr(getattr(param, "_hp_mapping", None), "param_group_index", None)
        if index is not None:
            return optimizer.param_groups[index]
        keys = {(tuple(g.get("betas", ())), g.get("eps"), g.get("amsgrad")) for g in optimizer.param_groups}
        if len(keys) == 1:
            return optimizer.param_groups[0]
        raise ValueError(
            "cannot tell which DeepSpeed param group a ZeRO-3 parameter belongs to and the groups' "
            "betas/eps differ; give every group the same betas and eps"
        )
    raise ValueError("parameter is not in the optimizer's param_groups")


def has_second_moment(group: dict) -> bool:
    """Whether the group's hyper-parameters look like Adam's (``betas`` and ``eps``)."""
    betas = group.get("betas")
    return isinstance(betas, (tuple, list)) and len(betas) >= 2 and "eps" in group


@dataclass
class MomentRanges:
    """Adam's moments of one parameter, read one flat range of coordinates at a time.

    Lets a layer be normalized block by block without a float32 copy of its whole state
    (bitsandbytes 8-bit: only the quantization blocks a range touches are decoded).
    """

    exp_avg: RangeReader | None
    exp_avg_sq: RangeReader
    step: int
    beta1: float
    beta2: float
    eps: float
    max_exp_avg_sq: RangeReader | None = None

    def read_denominator(self, start: int, stop: int) -> torch.Tensor:
        """The second moment Adam divides by (the amsgrad maximum when there is one), for a range."""
        reader = self.exp_avg_sq if self.max_exp_avg_sq is None else self.max_exp_avg_sq
        return reader(start, stop)

    def read(self, start: int, stop: int) -> AdamMoments:
        """The moments of flat coordinates ``start .. stop-1`` (1-D float32 tensors)."""
        return AdamMoments(
            exp_avg=None if self.exp_avg is None else self.exp_avg(start, stop),
            exp_avg_sq=self.exp_avg_sq(start, stop),
            step=self.step,
            beta1=self.beta1,
            beta2=self.beta2,
            eps=self.eps,
            max_exp_avg_sq=None if self.max_exp_avg_sq is None else self.max_exp_avg_sq(start, stop),
        )


def adam_moment_ranges(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, group: dict | None = None
) -> MomentRanges | None:
    """Range readers of ``param``'s Adam moments; ``None`` when there are none (yet).

    The state is only read: no key is added, so the optimizer's lazy initialization still works.
    """
    group = find_group(optimizer, param) if group is None else group  # callers that know it skip the search
    if not has_second_moment(group):
        return None
    if is_deepspeed_param(param):
        whole = _read_deepspeed_moments(optimizer, param, group)
        if whole is None:
            return None
        flat = {
            k: None if v is None else _tensor_reader(v)
            for k, v in (("m", whole.exp_avg), ("v", whole.exp_avg_sq), ("max", whole.max_exp_avg_sq))
        }
        return MomentRanges(flat["m"], flat["v"], whole.step, whole.beta1, whole.beta2, whole.eps, flat["max"])
    state = optimizer.state.get(param)
    if not state:
        return None
    beta1, beta2 = float(group["betas"][0]), float(group["betas"][1])
    eps = float(group["eps"])
    if "exp_avg_sq" in state:
        amsgrad = bool(group.get("amsgrad", False)) and "max_exp_avg_sq" in state
        m = state.get("exp_avg")
        return MomentRanges(
            exp_avg=None if m is None else _tensor_reader(m),
            exp_avg_sq=_tensor_reader(state["exp_avg_sq"]),
            step=step_count(state),
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            max_exp_avg_sq=_tensor_reader(state["max_exp_avg_sq"]) if amsgrad else None,
        )
    if "state2" in state:
        # state1 is Adam's m only when shaped like the parameter (AdEMAMix stacks two EMAs there).
        s1 = state.get("state1")
        m = _bnb_reader(state, 1) if s1 is not None and s1.numel() == param.numel() else None
        return MomentRanges(
            exp_avg=m,
            exp_avg_sq=_bnb_reader(state, 2),
            step=step_count(state),
            beta1=beta1,
            beta2=beta2,
            eps=eps,
        )
    return None


def read_adam_moments(
    optimizer: torch.optim.Optimizer, param: torch.Tensor, group: dict | None = None
) -> AdamMoments | None:
    """Adam's moments of ``param`` from ``optimizer.state``, whole and shaped like it; ``None`` when none (yet)."""
    ranges = adam_moment_ranges(optimizer, param, group)
    if ranges is None:
        return None
    shape = full_shape(param)
    whole = ranges.read(0, shape.numel())
    reshape = lambda t: None if t is None else t.reshape(shape)  # noqa: E731
    return AdamMoments(
        exp_avg=reshape(whole.exp_avg),
        exp_avg_sq=reshape(whole.exp_avg_sq),
        step=whole.step,
        beta1=whole.beta1,
        beta2=whole.beta2,
        eps=whole.eps,
        max_exp_avg_sq=reshape(whole.max_exp_avg_sq),
    )


def _read_deepspeed_moments(optimizer: torch.optim.Optimizer, param: torch.Tensor, group: dict) -> AdamMoments | None:
    """Adam's moments of a ZeRO-partitioned parameter, assembled whole (a collective on every rank).

    The step count is not part of ZeRO's per-parameter fragments; it is read from the state of the
    group's flat partition (every Adam step advances all of them together; ZeRO-3 empties the
    groups between steps, so any flat partition's state).
    """
    from deepspeed.utils import safe_get_full_optimizer_state

    flat = [optimizer.state.get(p) for p in group["params"]]
    steps = [step_count(s) for s in flat if s and "step" in s]
    if not steps and hasattr(param, "ds_id"):
        # ZeRO-3 puts each flat sub-group into the group only while stepping it: any state's count
        steps = [step_count(s) for s in optimizer.state.values() if s and "step" in s]
    if not steps:  # before the first step (DeepSpeed raises KeyError for a state not created yet)
        return None
    v = safe_get_full_optimizer_state(param, "exp_avg_sq")
    if v is None:
        return None
    m = safe_get_full_optimizer_state(param, "exp_avg")
    peak = safe_get_full_optimizer_state(param, "max_exp_avg_sq") if group.get("amsgrad") else None
    return AdamMoments(
        exp_avg=None if m is None else m.float().reshape(full_shape(param)),
        exp_avg_sq=v.float().reshape(full_shape(param)),
        step=steps[0],
        beta1=float(group["betas"][0]),
        beta2=float(group["betas"][1]),
        eps=float(group["eps"]),
        max_exp_avg_sq=None if peak is None else peak.float().reshape(full_shape(param)),
    )
