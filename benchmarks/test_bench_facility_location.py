"""Greedy facility location: ours against submodlib-py's LazyGreedy and apricot (when installed).

k = N/4, similarity max(D) - D of the L1 distances between random sketches (CoLM's choice).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from coreset_optim.methods.facility_location import (
    facility_location_value,
    greedy_facility_location,
    greedy_facility_location_dense,
)
from coreset_optim.methods.similarity import pairwise_similarity
from lib.timing import interleave

REPS = {128: 25, 512: 9, 2048: 3}


def _submodlib(sim_np: np.ndarray, k: int):
    try:
        from submodlib import FacilityLocationFunction
    except ImportError:
        return None

    def run():
        f = FacilityLocationFunction(n=sim_np.shape[0], mode="dense", sijs=sim_np, separate_rep=False)
        picked = f.maximize(
            budget=k, optimizer="LazyGreedy", stopIfZeroGain=False, stopIfNegativeGain=False, show_progress=False
        )
        return torch.tensor([int(i) for i, _ in picked])

    return run


def _apricot(sim_np: np.ndarray, k: int):
    try:
        from apricot import FacilityLocationSelection
    except ImportError:
        return None

    def run():
        sel = FacilityLocationSelection(k, metric="precomputed", optimizer="lazy", verbose=False)
        return torch.as_tensor(np.asarray(sel.fit(sim_np).ranking[:k], dtype=np.int64))

    return run


@pytest.mark.parametrize("d", [256, 2560])
@pytest.mark.parametrize("n", [128, 512, 2048])
def test_facility_location(benchmark, record, n, d):
    g = torch.Generator().manual_seed(n + d)
    x = torch.randn(n, d, generator=g) * torch.rand(n, 1, generator=g)  # varied gradient norms
    sim = pairwise_similarity(x, "l1")
    sim_np = sim.numpy()
    k = n // 4
    runs = {"ours": lambda: greedy_facility_location(sim, k)}
    if n <= 512:
        runs["ours_dense"] = lambda: greedy_facility_location_dense(sim, k)
    fn = _submodlib(sim_np, k)
    if fn is not None:
        runs["lazygreedy"] = fn
    medians = interleave(runs, REPS[n])
    fn = _apricot(sim_np, k)
    if fn is not None:  # seconds per call (numba): timed on its own, twice, next to ours
        runs["apricot"] = fn
        medians.update(interleave({"apricot": fn, "ours_again": runs["ours"]}, reps=2))
    sim64 = sim.double()
    ours_value = facility_location_value(sim64, runs["ours"]()).item()
    row = {"N": n, "d": d, "k": k, "ours_ms": medians["ours"] * 1e3, "objective_ours": ours_value}
    for name in runs:
        if name == "ours":
            continue
        value = facility_location_value(sim64, runs[name]()).item()
        row[f"{name}_ms"] = medians[name] * 1e3
        row[f"ours/{name}"] = medians["ours"] / medians[name]
        row[f"objective_rel_{name}"] = (value - ours_value) / ours_value
    record("facility location (k = N/4)", f"N={n} d={d}", **row)
    benchmark.extra_info.update(row)
    benchmark.pedantic(runs["ours"], rounds=max(3, REPS[n] // 2), iterations=1, warmup_rounds=1)
