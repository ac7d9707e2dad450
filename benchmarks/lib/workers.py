"""Work in other processes: a configuration measured in a fresh process (the script runs itself
as a worker, ``--worker CONFIG`` and its options, and prints one JSON line, which the driver reads
back), and independent runs in parallel, collected as they finish."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: on the worker's PYTHONPATH


class WorkerFailed(RuntimeError):
    """A worker process exited with an error (the message ends with its stderr)."""


def worker_env(threads: int, **extra: str) -> dict[str, str]:
    """This process's environment with the repository first on ``PYTHONPATH``, ``threads``
    OpenMP threads and quiet transformers, plus ``extra``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.update(extra)
    return env


def flags(**options) -> list[str]:
    """Command-line flags: ``--name-with-dashes value``; True is a bare flag, None and False none."""
    out: list[str] = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        out.append(f"--{key.replace('_', '-')}")
        if value is not True:
            out.append(str(value))
    return out


def spawn(script: str | Path, config: str, threads: int, **options) -> dict:
    """Run ``script --worker config`` with ``options`` as flags in a fresh process; its last line
    of output, parsed as JSON. :class:`WorkerFailed` when it fails."""
    cmd = [sys.executable, str(script), "--worker", config, *flags(threads=threads, **options)]
    proc = subprocess.run(cmd, env=worker_env(threads), capture_output=True, text=True)
    if proc.returncode != 0:
        shown = " ".join(f"{k}={v}" for k, v in options.items() if v is not None)
        raise WorkerFailed(f"worker {config} {shown} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parallel(fn, jobs: list, processes: int):
    """``fn(job)`` for every job, as they finish: in ``processes`` spawned processes, or in this
    one (in order) when ``processes`` is 1."""
    with mp.get_context("spawn").Pool(processes) if processes > 1 else nullcontext() as pool:
        yield from pool.imap_unordered(fn, jobs) if pool else map(fn, jobs)


def collect(fn, jobs: list, processes: int, runs: list[dict], partial: Path, args, describe) -> list[dict]:
    """Each result of :func:`parallel` appended to ``runs`` as it comes, with a line
    ``[seconds] describe(result)`` on stderr, and the runs so far saved to ``partial`` (beside
    ``args``): a run cut short keeps what it finished (``--resume``)."""
    start = time.time()
    for result in parallel(fn, jobs, processes):
        runs.append(result)
        print(f"[{time.time() - start:5.0f}s] {describe(result)}", file=sys.stderr, flush=True)
        partial.write_text(json.dumps({"args": vars(args), "runs": runs}))
    return runs
