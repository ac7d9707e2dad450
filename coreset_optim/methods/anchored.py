"""Highest loss among the examples that agree with their source's small-loss half
(``selection="anchored_consensus"``).

``consensus_loss`` lets every example of a source vote on the source's direction. Once wrong
answers are many (40 % of a source) or coherent (another task's answers), they win the vote, the
clean examples look like the dissenters, and the highest-loss "agreeing" examples are the wrong
ones: the run collapses. Two signals that a majority of wrong answers cannot capture:

* **the small-loss half votes** (co-teaching's small-loss criterion): a wrong answer keeps a high
  loss, so the half of the source with the lowest losses is mostly clean even at 40 % noise, and
  its sum of unit sketches is the anchor (:func:`anchor_agreement`);
* **a loss gap**: wrong answers form a separate high-loss component (:func:`high_loss_component`,
  a 1-D two-means split kept only when its groups lie ``min_separation`` pooled standard
  deviations apart).

The choice avoids (:func:`anchored_suspects`) the rows of the high component that agree with the
anchor less than a typical small-loss row does, and the upper half's rows that pull against it (a
negative cosine). A hard clean example has a high loss but pulls with the anchor, so it stays
eligible: the coreset is still the hardest eligible examples (then the avoided ones, lowest loss
first), weighted n / k. Measured against random and stratified random subsets at every noise model
and rate of the fine-tuning benchmark, clean data included: ``docs/selection_quality.md``.

Both signals live inside the batch, and once wrong answers are half of a source and coherent
(another task's answers) the small-loss half is no longer clean enough: the hardest "agreeing" rows
are then the wrong ones and the run falls below random subsets. With a reference from outside the
batch (``reference="auto"``: the base model, for a peft LoRA model, :mod:`.reference`) the choice
also avoids the rows whose base-model loss lies in their source's high component, once the running
share of such rows that also pull against the small-loss half (both signals call them wrong:
``implausible_share``, updated at each reference pass by :meth:`AnchoredConsensus.observe`) reaches
``noise_gate``. On clean data that component holds the new material the fine-tuning is for, so
the gate stays shut there, and the reference pass runs on one selection in ``reference_every``
only (``benchmarks/noise_bound.py`` and ``benchmarks/reference_base.py`` chose the gate on seeds
they do not report).

The choice needs recall (a corrupted row it misses is among the hardest left, so it tends to be
chosen); a user reading ``coreset.suspects`` needs precision. So the report is narrower by default
(:func:`confident_suspects`, ``suspect_report="confident"``): rows pulling against the anchor
whose log-loss lies far above the small-loss half's. Replayed along the default's runs it flags
about a tenth of the rows of clean data where the avoided set holds a fifth
(``benchmarks/suspect_tradeoff.py``, thresholds chosen on seeds never used for its report). While
the noise gate is open, both reports also hold the rows the reference finds implausible.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn import functional as F

from ..checks import check_number, is_int
from ..extensions import reference_pass_context
from ..records import ChooseContext, Sketches
from ..sketch.compress import compress_per_source, rows_per_source
from ..timing import timed
from .base import SelectionContext, SketchedMethod
from .reference import reference_losses, running_share
from .suspects import hardest_first

MIN_EXAMPLES = 4  # a small-loss half of two, an upper half of two
REFERENCES = ("auto", "base", None)
# what the noise gate reads, and where it opens by default. "contested": the share of rows that both
# the reference and the batch call wrong (implausible to the base AND pulling against the small-loss
# half); "implausible": the share of implausible rows. benchmarks/noise_bound.py --phase choose
# picked "implausible" at 0.40 (round three), then "contested" at 0.18 (round four, with a weaker base
# too: benchmarks/reference_base.py), by the largest worst case against random and stratified k.
NOISE_GATES = {"contested": 0.18, "implausible": 0.40}
GATE_DECAY = 0.9
# while the gate is shut the reference pass (a no-grad forward of the batch, 1.5x a step without it on
# the depth benchmark's 8-layer LoRA model) runs on one selection in this many; chosen after the
# confirmation on the choosing seeds (the same accuracy; results/noise_bound/noise_bound.md)
REFERENCE_EVERY = 8
MAX_HIGH_SHARE = 0.6  # the high component holds at most this share of a source's rows
# the confident report: cosine with the anchor below, log-loss z above (benchmarks/suspect_tradeoff.py
# --phase choose picked them among nine pairs; results/suspect_tradeoff/choose.md)
REPORT_COSINE, REPORT_Z = 0.0, 1.5
SUSPECT_REPORTS = ("confident", "avoided")


def anchor_agreement(x: torch.Tensor, voters: torch.Tensor) -> torch.Tensor:
    """``Tensor[n]`` (float64): cosine of each row of ``x[n, d]`` with the sum of the voters' unit
    vectors, leaving out the row's own vote (0 for a zero row or a zero sum)."""
    unit = F.normalize(x.double(), dim=1)
    votes = unit * voters.to(unit.dtype)[:, None]
    return F.cosine_similarity(x.double(), votes.sum(0, keepdim=True) - votes, dim=1, eps=1e-30)


def high_loss_component(losses: torch.Tensor, min_separation: float = 2.0) -> torch.Tensor:
    """``BoolTensor[n]``: the upper group of the best two-means split of ``losses`` (largest
    separation ``(mean_high - mean_low) / pooled sd`` among the splits leaving at most
    ``MAX_HIGH_SHARE`` of the rows above), when that separation reaches ``min_separation``; all
    False otherwise or for fewer than ``MIN_EXAMPLES`` losses."""
    n = losses.numel()
    if n < MIN_EXAMPLES:
        return torch.zeros(n, dtype=torch.bool, device=losses.device)
    s, order = torch.sort(losses.double())
    low_sizes = torch.arange(max(1, int(n * (1 - MAX_HIGH_SHARE))), n, device=losses.device)
    prefix = torch.cat([s.new_zeros(1), torch.cumsum(s, 0)])
    prefix_sq = torch.cat([s.new_zeros(1), torch.cumsum(s * s, 0)])
    lo_sum, lo_sq = prefix[low_sizes], prefix_sq[low_sizes]
    hi_sum, hi_sq = prefix[-1] - lo_sum, prefix_sq[-1] - lo_sq
    lo_n, hi_n = low_sizes.double(), n - low_sizes.double()
    within = (lo_sq - lo_sum**2 / lo_n) + (hi_sq - hi_sum**2 / hi_n)  # summed squared deviations
    sd = (within.clamp_min(0) / n).sqrt() + 1e-6
    separation = (hi_sum / hi_n - lo_sum / lo_n) / sd
    best = separation.argmax()  # tensors throughout: no host sync per source
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=losses.device)
    return (rank >= low_sizes[best]) & (separation[best] >= min_separation)


def lower_median(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values[mask].median()`` (the lower of the two middle values for an even count), as a 0-d
    tensor computed without a host sync (no boolean indexing); ``mask`` must select some value."""
    ordered = torch.sort(torch.where(mask, values, torch.inf)).values
    middle = (mask.sum() - 1) // 2
    return ordered.gather(0, middle.reshape(1)).squeeze(0)


def small_half_agreement(x: torch.Tensor, losses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(small, cosine)``: the source's small-loss half (``losses <= median``) and each row's cosine
    with that half's anchor (:func:`anchor_agreement`), on ``losses``' device."""
    small = losses <= losses.median()
    return small, anchor_agreement(x, small.to(x.device)).to(losses.device)


def anchored_suspects(x: torch.Tensor, losses: torch.Tensor, min_separation: float = 2.0) -> torch.Tensor:
    """``BoolTensor[n]``: one source's rows ``x[n, d]`` (normalized sketches, ``losses[n]``) that
    look mislabeled: in the high-loss component and less aligned with the small-loss half's anchor
    than that half's median row, or in the upper half by loss and pulling against the anchor."""
    n = losses.numel()
    if n < MIN_EXAMPLES:
        return torch.zeros(n, dtype=torch.bool, device=losses.device)
    small, cosine = small_half_agreement(x, losses)
    typical = lower_median(cosine, small)
    high = high_loss_component(losses, min_separation)
    return (high & (cosine < typical)) | (~small & (cosine < 0))


def confident_suspects(
    x: torch.Tensor, losses: torch.Tensor, cosine_below: float = REPORT_COSINE, z_above: float = REPORT_Z
) -> torch.Tensor:
    """``BoolTensor[n]``: one source's rows ``x[n, d]`` (``losses[n]``) that pull against the
    small-loss half's anchor (cosine below ``cosine_below``) and whose log-loss lies more than
    ``z_above`` of the source's log-loss standard deviations above the small-loss half's mean: the
    suspects worth a user's look (none below ``MIN_EXAMPLES`` rows). No host sync."""
    n = losses.numel()
    if n < MIN_EXAMPLES:
        return torch.zeros(n, dtype=torch.bool, device=losses.device)
    small, cosine = small_half_agreement(x, losses)
    log_loss = losses.double().clamp_min(1e-12).log()
    small_mean = (log_loss * small).sum() / small.sum()  # no boolean indexing: no host sync
    z = (log_loss - small_mean) / (log_loss.std() + 1e-9)
    return (cosine < cosine_below) & (z > z_above)


def implausible_rows(reference: torch.Tensor, rows: list[torch.Tensor], min_separation: float = 2.0) -> torch.Tensor:
    """``BoolTensor[B]``: the rows each source would not be expected to hold, by the reference: for
    each source's ``rows`` (:func:`rows_per_source`), those in the high component of their
    ``reference`` losses (:func:`high_loss_component`; none for fewer than ``MIN_EXAMPLES`` rows).
    No host sync."""
    out = torch.zeros(reference.shape[0], dtype=torch.bool, device=reference.device)
    for source_rows in rows:
        source_rows = source_rows.to(reference.device)
        out[source_rows] = high_loss_component(reference.index_select(0, source_rows), min_separation)
    return out


def contested_rows(
    sketches: Sketches, codes: torch.Tensor, num_sources: int, rows: list[torch.Tensor], dim: int, min_separation: float
) -> torch.Tensor:
    """``BoolTensor[B]``: the rows both signals call wrong: implausible to the reference
    (:func:`implausible_rows`) and pulling against their source's small-loss half (a negative
    cosine with its anchor, on the rows compressed as the choice sees them). No host sync."""
    reference = sketches.reference_losses
    x = compress_per_source(sketches.rows, sketches.valid, codes, num_sources, dim, rows)
    losses = sketches.losses.to(reference.device)
    against = torch.zeros(reference.shape[0], dtype=torch.bool, device=reference.device)
    for source_rows in rows:
        source_rows = source_rows.to(reference.device)
        if source_rows.numel() >= MIN_EXAMPLES:
            source_x = x.index_select(0, source_rows.to(x.device)).double()
            _, cosine = small_half_agreement(source_x, losses.index_select(0, source_rows))
            against[source_rows] = cosine.to(against.device) < 0
    return implausible_rows(reference, rows, min_separation) & against


@dataclass(kw_only=True)
class AnchoredConsensus(SketchedMethod):
    """``selection="anchored_consensus"``, the default: per source, the highest losses among the
    examples that agree with the source's small-loss half.
    ``min_separation``: how far apart (in pooled standard deviations) the high-loss component must
    lie from the rest to count as one. ``suspect_report``: what ``coreset.suspects`` holds,
    ``"confident"`` (:func:`confident_suspects`: fewer flags, more of them right) or ``"avoided"``
    (every example the choice avoided, :func:`anchored_suspects`).
    ``reference``: ``"auto"`` (the base model when an integration can switch the model's adapters
    off, peft LoRA; none otherwise), ``"base"`` (the same, and ValueError for a model without
    one) or None (no reference: the in-batch rule alone, no extra forward). ``gate_statistic``:
    what the noise gate reads, ``"contested"`` (the share of rows the reference finds implausible
    that also pull against their source's small-loss half: :func:`contested_rows`) or
    ``"implausible"`` (the share of implausible rows). ``noise_gate``: the running share at which
    the choice avoids the implausible rows too (None: 0.18 for "contested", 0.40 for "implausible";
    0: always; above 0.6, the most a high component holds: never). ``gate_decay``: that running
    share's exponential decay per reference pass. ``reference_every``: while the gate is shut, the
    reference pass runs on one selection in this many (the running share is all it feeds then);
    while it is open, on every one. ``implausible_share`` (read only): the running share (None
    before the first reference), saved in checkpoints."""

    name: ClassVar[str] = "anchored_consensus"
    min_separation: float = 2.0
    suspect_report: str = "confident"
    reference: str | None = "auto"
    gate_statistic: str = "contested"
    noise_gate: float | None = None
    gate_decay: float = GATE_DECAY
    reference_every: int = REFERENCE_EVERY

    def __post_init__(self) -> None:
        super().__post_init__()
        ok = isinstance(self.min_separation, (int, float)) and math.isfinite(self.min_separation)
        self.min_separation = check_number(
            "min_separation", self.min_separation, ok and self.min_separation > 0, "a positive finite float (e.g. 2.0)"
        )
        if self.suspect_report not in SUSPECT_REPORTS:
            raise ValueError(
                f"suspect_report must be one of {SUSPECT_REPORTS} ('confident': the flags worth a look; "
                f"'avoided': every example the choice avoided), got {self.suspect_report!r}"
            )
        if self.reference not in REFERENCES:
            raise ValueError(
                f"reference must be one of {REFERENCES} ('auto': the base model for a peft LoRA model, "
                f"none otherwise; 'base': require it; None: no reference), got {self.reference!r}"
            )
        if not is_int(self.reference_every) or self.reference_every < 1:
            raise ValueError(
                f"reference_every must be a positive int (selections between reference passes while the "
                f"gate is shut; 1: every one), got {self.reference_every!r}"
            )
        if self.gate_statistic not in NOISE_GATES:
            raise ValueError(
                f"gate_statistic must be one of {tuple(NOISE_GATES)} ('contested': rows the reference finds "
                f"implausible that also pull against their source's small-loss half; 'implausible': every "
                f"implausible row), got {self.gate_statistic!r}"
            )
        if self.noise_gate is None:
            self.noise_gate = NOISE_GATES[self.gate_statistic]
        for name, default in (("noise_gate", NOISE_GATES[self.gate_statistic]), ("gate_decay", GATE_DECAY)):
            value = getattr(self, name)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
            setattr(self, name, check_number(name, value, ok, f"a float in [0, 1] (default {default})"))
        self.implausible_share: float | None = None

    def sketches(self, context: SelectionContext) -> Sketches:
        """The sketches, with each example's loss under the reference when there is one and it is
        due (the reference pass runs after the sketch pass: a loss function that records the first
        pass's logits, as TRL's metrics do, sees the trained model's)."""
        switch_off = None if self.reference is None else reference_pass_context(context.batch_pass.model)
        if self.reference == "base" and switch_off is None:
            raise ValueError(
                "reference='base' needs a model whose adapters an integration can switch off (a peft "
                "LoRA model, adapters not merged); use reference='auto' or None for this model"
            )
        rows = super().sketches(context)
        if switch_off is None or not (self.gate_open or context.num_selections % self.reference_every == 0):
            return rows
        with timed(context.timings, "reference"):  # part of the "sketch" stage's time
            reference = reference_losses(context.batch_pass, switch_off)
        # a base loss that overflowed is as implausible as it gets (and must not poison the split)
        reference = torch.nan_to_num(reference, nan=1e6, posinf=1e6, neginf=0.0)
        return dataclasses.replace(rows, reference_losses=reference)

    def observe(self, sketches: Sketches, codes: torch.Tensor, num_sources: int) -> None:
        """Update ``implausible_share`` with this batch's share, among the valid rows of sources
        with at least ``MIN_EXAMPLES`` of them, of the rows the reference finds implausible
        (:func:`implausible_rows`), counting only those whose cosine with their source's small-loss
        half's anchor is negative under ``gate_statistic="contested"`` (two host reads)."""
        reference = sketches.reference_losses
        if reference is None:
            return
        counts, rows = rows_per_source(sketches.valid.to(reference.device), codes.to(reference.device), num_sources)
        judged = sum(c for c in counts if c >= MIN_EXAMPLES)
        if judged == 0:
            return
        if self.gate_statistic == "implausible":
            flagged = implausible_rows(reference, rows, self.min_separation).sum()
        else:
            flagged = contested_rows(sketches, codes, num_sources, rows, self.sketch_dim, self.min_separation).sum()
        share = float(flagged) / judged
        self.implausible_share = running_share(self.implausible_share, share, self.gate_decay)

    @property
    def gate_open(self) -> bool:
        """Whether the choice avoids the rows the reference finds implausible this step."""
        return self.implausible_share is not None and self.implausible_share >= self.noise_gate

    def choose(self, x: torch.Tensor, k: int, context: ChooseContext) -> tuple[torch.Tensor, None]:
        losses = context.group_losses().to(x.device)
        avoided = anchored_suspects(x, losses, self.min_separation)
        reference = context.group_reference_losses()
        if reference is not None and self.gate_open:
            avoided = avoided | high_loss_component(reference.to(x.device), self.min_separation)
        return hardest_first(losses, k, avoided), None

    def suspects(self, compressed, losses, valid, codes, num_sources, reference_losses=None) -> torch.Tensor:
        """The report (``suspect_report``), per source; while the gate is open, also the rows the
        reference finds implausible (what the choice avoided besides the in-batch rule)."""
        device = compressed.device
        out = torch.zeros(compressed.shape[0], dtype=torch.bool, device=device)
        _, rows = rows_per_source(valid.to(device), codes.to(device), num_sources)
        for source_rows in rows:
            picked = losses.to(device).index_select(0, source_rows)
            x = compressed.index_select(0, source_rows)
            if self.suspect_report == "confident":
                out[source_rows] = confident_suspects(x, picked)
            else:
                out[source_rows] = anchored_suspects(x, picked, self.min_separation)
        if reference_losses is not None and self.gate_open:
            out |= implausible_rows(reference_losses.to(device), rows, self.min_separation)
        return out

    # --- checkpoints ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"implausible_share": self.implausible_share}

    def load_state_dict(self, state: dict) -> None:
        unknown = sorted(set(state) - {"implausible_share"})
        if unknown:
            raise ValueError(f"AnchoredConsensus keeps only 'implausible_share'; got {unknown}")
        share = state.get("implausible_share")
        if share is not None and not isinstance(share, float):
            raise TypeError(f"implausible_share must be a float or None, got {type(share).__name__}")
        self.implausible_share = share
