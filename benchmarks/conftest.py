"""Shared pieces of the microbenchmarks: side-by-side timing and a results file.

Every comparison is timed *interleaved* (A, B, C, A, B, C, ...) in one process and reported as
medians and ratios, because the machine is shared and its speed drifts. pytest-benchmark times
our own call as well; the interleaved figures go to ``benchmarks/results/micro/micro.{json,md}``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from lib.timing import THREADS  # noqa: E402  (sets torch's thread count)

_ROWS: list[dict] = []


@pytest.fixture
def record():
    """``record(group, case, **figures)``: one row of the micro results file."""

    def add(group: str, case: str, **figures):
        _ROWS.append({"group": group, "case": case, **figures})

    return add


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def pytest_sessionfinish(session, exitstatus):
    if not _ROWS or not session.config.getoption("benchmark_enable", default=False):
        return
    from lib.results import md_header, provenance, results_dir

    out = results_dir("micro")
    out.mkdir(parents=True, exist_ok=True)
    produced_by = provenance("conftest")
    machine = {
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "torch_threads": THREADS,
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }
    # Merge with earlier results, so running one benchmark file updates only its own rows.
    rows = list(_ROWS)
    try:
        old = json.loads((out / "micro.json").read_text())["rows"]
    except (OSError, ValueError, KeyError):
        old = []
    fresh = {(r["group"], r["case"]) for r in rows}
    rows = [r for r in old if (r["group"], r["case"]) not in fresh] + rows
    (out / "micro.json").write_text(
        json.dumps({"produced_by": produced_by, "machine": machine, "rows": rows}, indent=1)
    )
    lines = [
        md_header(produced_by) + "# Microbenchmarks (interleaved medians; shared, loaded machine: read the ratios)",
        "",
        f"Machine: {machine['platform']}, {machine['cores']} cores, {machine['torch_threads']} torch "
        f"thread(s), torch {machine['torch']}, load average at the end {machine['load_average'][0]:.1f}.",
        "",
    ]
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row["group"], []).append(row)
    for group, rows in groups.items():
        keys = [k for k in rows[0] if k != "group"]
        for r in rows[1:]:
            keys += [k for k in r if k not in keys and k != "group"]
        lines += [f"## {group}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
        lines.append("")
    (out / "micro.md").write_text("\n".join(lines))
