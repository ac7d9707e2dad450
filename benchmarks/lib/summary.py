"""Reading training curves and runs over seeds: the point at a step or a wall-clock time, means
with their spread, differences paired by seed."""

from __future__ import annotations

import statistics
from collections.abc import Callable


def at_step(curve: list[dict], step: int) -> dict:
    return next(c for c in curve if c["step"] == step)


def at_time(curve: list[dict], t: float, value: Callable[[dict], float]) -> float | None:
    """Linear interpolation of ``value(point)`` at wall-clock ``t`` (the points' ``"time"``);
    None beyond the run."""
    if t > curve[-1]["time"] + 1e-9:
        return None
    for a, b in zip(curve, curve[1:]):
        if a["time"] <= t <= b["time"]:
            f = 0.0 if b["time"] == a["time"] else (t - a["time"]) / (b["time"] - a["time"])
            return value(a) + f * (value(b) - value(a))
    return value(curve[0])


def value_at_step(run: dict, step: float, key: str) -> float | None:
    """``run["curve"]``'s ``key`` at ``step``, linear between evaluations (its first value before
    its first point); None beyond its last point."""
    curve = run["curve"]
    if step > curve[-1]["step"] + 1e-9:
        return None
    for a, b in zip(curve, curve[1:]):
        if a["step"] <= step <= b["step"]:
            w = 0 if b["step"] == a["step"] else (step - a["step"]) / (b["step"] - a["step"])
            return a[key] + w * (b[key] - a[key])
    return curve[0][key] if step <= curve[0]["step"] else None


def mean_sd_text(values: list[float]) -> str:
    """``mean ± sd`` over seeds, ``x (1 seed)`` for one, ``n/a`` for none."""
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f} (1 seed)"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def set_times(runs: list[dict], costs: dict[str, float]) -> None:
    """Each run's seconds per step (``costs`` of its method) and its curve's time axis, step x that."""
    for r in runs:
        r["seconds_per_step"] = costs[r["method"]]
        for c in r["curve"]:
            c["time"] = c["step"] * costs[r["method"]]


def mean_curve(runs: list[dict], method: str, value: Callable[[dict], float]):
    """``(steps, times, values)`` of ``method``'s runs, averaged point by point over seeds."""
    rs = [r for r in runs if r["method"] == method]
    n = min(len(r["curve"]) for r in rs)
    pts = list(zip(*[r["curve"][:n] for r in rs]))
    return (
        [p[0]["step"] for p in pts],
        [statistics.mean(c["time"] for c in p) for p in pts],
        [statistics.mean(value(c) for c in p) for p in pts],
    )


def mean_sd(xs: list[float]) -> dict:
    return {"mean": statistics.mean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else 0.0, "per_seed": xs}


def paired(ms: dict, a: str, b: str, key: str) -> dict | None:
    """Per-seed ``a - b`` of ``key`` (same seeds, same batches), mean and sd; None unless both
    methods ran on the same seeds."""
    if a not in ms or b not in ms or ms[a]["seeds"] != ms[b]["seeds"]:
        return None
    return mean_sd([x - y for x, y in zip(ms[a][key]["per_seed"], ms[b][key]["per_seed"])])


def fmt(s: dict, digits: int = 3) -> str:
    """``mean ± sd``."""
    return f"{s['mean']:.{digits}f} ± {s['sd']:.{digits}f}"
