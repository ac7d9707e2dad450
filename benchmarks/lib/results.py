"""Where results go and what they say about themselves: ``benchmarks/results/<script>/``, the
provenance every result file carries (script, commit, date, machine), and descriptions of the
machine a run used."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parents[1]
RESULTS = BENCHMARKS / "results"


def results_dir(script: str) -> Path:
    """``benchmarks/results/<script>/``: every script's results go to a folder of their own."""
    return RESULTS / script


def git(*args: str) -> str:
    """A git command's output in this checkout ("" when git fails or is missing)."""
    try:
        out = subprocess.run(["git", *args], cwd=BENCHMARKS, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"model name\s*:\s*(.*)", f.read()).group(1).strip()
    except (OSError, AttributeError):
        return platform.processor() or platform.machine()


def machine_summary() -> str:
    """One line: CPU model, cores, torch version, and the GPU when there is one."""
    line = f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}"
    return line + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU")


def machine() -> dict:
    """The training benchmarks' machine record: torch, its threads, CPU, cores, when."""
    return {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def machine_info(device: str, threads: int) -> dict:
    """The step benchmarks' machine record: CPU model, cores, torch threads, platform, the load
    average at the start (a script adds ``load_average_end``), the GPU on CUDA."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": threads,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": device,
        "load_average_start": os.getloadavg(),
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def provenance(script: str) -> dict:
    """Who wrote a result file: ``{"script", "commit", "date", "machine"}``. ``script`` is the
    benchmark's stem (``"depth"``); the commit is the checkout's HEAD (``+dirty`` when tracked
    files outside benchmarks/results differ from it), the date UTC."""
    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    if commit != "unknown" and git(
        "status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)benchmarks/results"
    ):
        commit += "+dirty"
    return {
        "script": f"benchmarks/{script}.py",
        "commit": commit,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "machine": machine_summary(),
    }


def stamped(data: dict, script: str) -> dict:
    """``data`` with a top-level ``"produced_by"`` (:func:`provenance`) first; an existing one is
    kept (a replot of saved results does not re-date them)."""
    return {
        "produced_by": data.get("produced_by") or provenance(script),
        **{k: v for k, v in data.items() if k != "produced_by"},
    }


def md_header(produced_by: dict) -> str:
    """The first line of a result's markdown file: which script, commit, date and machine wrote it."""
    p = produced_by
    return f"<!-- written by {p['script']} at commit {p['commit']}, {p['date']}, {p['machine']} -->\n"


def table_head(*columns: str) -> list[str]:
    """A markdown table's header line and rule line."""
    return ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def save_json(path: Path, data: dict, script: str, indent: int = 1, **dumps) -> dict:
    """``data`` with its ``"produced_by"`` (:func:`stamped`) as ``path`` (folders made); returns
    what was written."""
    data = stamped(data, script)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=indent, **dumps))
    return data
