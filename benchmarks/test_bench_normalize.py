"""Normalization cost per million parameters: torch Adam's state against bitsandbytes 8-bit.

Reading the second moment (a float32 copy for torch, blockwise dequantization for bnb: ours and
bnb's own) and normalizing 32 per-example sketches of a 512 x 512 parameter (262,144 values).
"""

from __future__ import annotations

import pytest
import torch

from coreset_optim.precondition.moments import read_adam_moments
from coreset_optim.precondition.normalize import normalize_sketches
from lib.timing import interleave

ROWS, SHAPE = 32, (512, 512)


def _stepped(kind: str):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(SHAPE))
    if kind == "torch":
        opt = torch.optim.AdamW([p], lr=1e-3)
    else:
        bnb = pytest.importorskip("bitsandbytes")
        opt = bnb.optim.AdamW8bit([p], lr=1e-3, min_8bit_size=0)
    for _ in range(2):
        p.grad = torch.randn(SHAPE)
        opt.step()
    return p, opt


def test_normalize_per_million_params(benchmark, record):
    p_t, opt_t = _stepped("torch")
    p_b, opt_b = _stepped("bnb")
    state = opt_b.state[p_b]
    assert state["state2"].dtype == torch.uint8
    import bitsandbytes.functional as F

    block = state["state2"].numel() // state["absmax2"].numel()
    sketches = torch.randn(ROWS, p_t.numel())
    runs = {
        "read_torch": lambda: read_adam_moments(opt_t, p_t),
        "read_bnb8": lambda: read_adam_moments(opt_b, p_b),
        "bnb_dequantize_blockwise_v": lambda: F.dequantize_blockwise(
            state["state2"], absmax=state["absmax2"], code=state["qmap2"], blocksize=block
        ),
        "normalize_torch": lambda: normalize_sketches(sketches, opt_t, [p_t], "adam"),
        "normalize_bnb8": lambda: normalize_sketches(sketches, opt_b, [p_b], "adam"),
        "normalize_update_torch": lambda: normalize_sketches(sketches, opt_t, [p_t], "adam_update"),
        "normalize_update_bnb8": lambda: normalize_sketches(sketches, opt_b, [p_b], "adam_update"),
    }
    m = interleave(runs, reps=15)
    per_million = 1e6 / p_t.numel()
    row = {f"{name}_ms_per_Mparam": v * 1e3 * per_million for name, v in m.items()}
    row["read: bnb8/torch"] = m["read_bnb8"] / m["read_torch"]
    row["read: ours/bnb's dequantize (both moments vs v only)"] = m["read_bnb8"] / m["bnb_dequantize_blockwise_v"]
    row["normalize: bnb8/torch"] = m["normalize_bnb8"] / m["normalize_torch"]
    record("normalization per million parameters (32 sketch rows)", "512x512", **row)
    benchmark.extra_info.update(row)
    benchmark.pedantic(runs["normalize_bnb8"], rounds=10, iterations=1)
