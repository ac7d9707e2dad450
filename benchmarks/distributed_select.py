"""What select() communicates and costs on 2 CPU ranks (gloo, DDP) against one process.

    python benchmarks/distributed_select.py          # launches 2 ranks, then the 1-process run

Counts the bytes each rank hands to every collective that select() makes (by wrapping the
torch.distributed functions; DDP's own gradient all-reduce is not counted) and compares them
with the formula of docs/distributed.md; times select() by stage. Writes
benchmarks/results/distributed_select/distributed_select.{json,md,png}.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import statistics
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from lib.results import md_header, results_dir, save_json  # noqa: E402
from lib.workers import worker_env  # noqa: E402

RESULTS = results_dir("distributed_select")
WORLD = 2
B_LOCAL = 64  # examples per rank
K = 32  # coreset of the global batch of WORLD * B_LOCAL
SKETCH_DIM = 256
SOURCES = 3
HIDDEN, OUT = 128, 32  # sketched head: D = OUT * HIDDEN + OUT
STEPS, WARMUP = 6, 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, OUT))


def batch(step: int, rank: int, size: int):
    g = torch.Generator().manual_seed(10_000 * step + rank)
    x = torch.randn(size, 64, generator=g)
    y = torch.randint(0, OUT, (size,), generator=g)
    src = [f"source{int(i)}" for i in torch.randint(0, SOURCES, (size,), generator=g)]
    return (x, y), src


def _nbytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(o) for o in obj)
    return 0


class Counter:
    """Bytes this rank contributes to each collective (object collectives: pickled size)."""

    NAMES = ("all_gather", "reduce", "broadcast", "all_reduce", "all_gather_object", "broadcast_object_list")

    def __init__(self) -> None:
        self.bytes = {n: 0 for n in self.NAMES}
        self.originals = {n: getattr(dist, n) for n in self.NAMES}
        self.active = False
        for name in self.NAMES:
            setattr(dist, name, self._wrap(name))

    def _wrap(self, name):
        original = self.originals[name]

        def counted(*args, **kwargs):
            if self.active:
                if name == "all_gather":
                    sent = _nbytes(args[1])
                elif name == "all_gather_object":
                    sent = len(pickle.dumps(args[1]))
                elif name == "broadcast_object_list":
                    sent = len(pickle.dumps(args[0])) if dist.get_rank() == 0 else 0
                elif name == "broadcast":
                    sent = _nbytes(args[0]) if dist.get_rank() == 0 else 0
                else:
                    sent = _nbytes(args[0])
                self.bytes[name] += sent
            return original(*args, **kwargs)

        return counted


def run(world: int, rank: int, counter: Counter | None) -> dict:
    from coreset_optim import CoresetOptimizer

    torch.set_num_threads(1)
    model = make_model()
    wrapped = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = CoresetOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-3), wrapped, coreset_size=K, sketch_dim=SKETCH_DIM
    )
    loss_fn = lambda b: F.cross_entropy(wrapped(b[0]), b[1], reduction="none")  # noqa: E731
    stages: dict[str, list[float]] = {}
    local_counts = []
    for step in range(WARMUP + STEPS):
        if world > 1:
            b, src = batch(step, rank, B_LOCAL)
        else:  # the same global batch in one process
            parts = [batch(step, r, B_LOCAL) for r in range(WORLD)]
            b = (torch.cat([p[0][0] for p in parts]), torch.cat([p[0][1] for p in parts]))
            src = [s for p in parts for s in p[1]]
        if counter is not None:
            counter.active = step == WARMUP  # count one step
        opt.zero_grad()
        c = opt.select(b, loss_fn, sources=src)
        opt.step()
        if step >= WARMUP:
            local_counts.append(len(c.local_indices))
            for name, t in c.timings.items():
                stages.setdefault(name, []).append(t)
    d_full = sum(p.numel() for t in opt.sketch_layers for p in t.params)
    return dict(
        stages_ms={n: 1000 * statistics.median(v) for n, v in stages.items()},
        bytes=None if counter is None else counter.bytes,
        sketch_length=d_full,
        k=len(c),
        local_counts=local_counts,
    )


def expected_bytes(d_full: int, k: int) -> dict:
    """docs/distributed.md's formula for what one rank sends (rank 0 for the broadcasts)."""
    d = min(SKETCH_DIM, d_full)
    return {
        "reduce (per-source sums of abs(sketch), S*D float32)": 4 * SOURCES * d_full if d_full > SKETCH_DIM else 0,
        "broadcast (coordinates, S*d int64)": 8 * SOURCES * d if d_full > SKETCH_DIM else 0,
        "all_gather (compressed rows + loss + valid, B_max*(d+2) float32)": 4 * B_LOCAL * (d + 2),
        "broadcast_object_list (indices int64 + weights float32: 12k, plus ~800 pickle overhead)": 12 * k + 800,
        "all_reduce (the coreset loss, 1 float32)": 4,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    if "RANK" in os.environ:
        from coreset_optim.distributed import shutdown

        counter = Counter()
        dist.init_process_group("gloo", timeout=timedelta(seconds=120))
        rank = dist.get_rank()
        result = run(WORLD, rank, counter)
        Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(result))
        shutdown()
        return
    out = RESULTS / "ranks"
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = worker_env(1, RANK=str(rank), WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, __file__, str(out)], env=env))
    if any(p.wait(timeout=600) != 0 for p in procs):
        raise SystemExit("a rank failed")
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for f in out.iterdir():
        f.unlink()
    out.rmdir()
    single = run(1, 0, None)
    expected = expected_bytes(ranks[0]["sketch_length"], ranks[0]["k"])
    report = save_json(
        RESULTS / "distributed_select.json",
        dict(
            machine=f"{os.cpu_count()} CPU cores, torch {torch.__version__}, gloo",
            setup=dict(
                world=WORLD,
                batch_per_rank=B_LOCAL,
                global_batch=WORLD * B_LOCAL,
                k=K,
                sketch_dim=SKETCH_DIM,
                sources=SOURCES,
                sketch_length=ranks[0]["sketch_length"],
                steps=STEPS,
            ),
            measured_bytes_per_rank=[r["bytes"] for r in ranks],
            selected_per_rank_per_step=[r["local_counts"] for r in ranks],
            expected_bytes=expected,
            stages_ms={
                "rank0": ranks[0]["stages_ms"],
                "rank1": ranks[1]["stages_ms"],
                "one_process": single["stages_ms"],
            },
        ),
        "distributed_select",
        indent=2,
    )
    write_markdown(report)
    write_plot(report)
    print((RESULTS / "distributed_select.md").read_text())


def write_markdown(r: dict) -> None:
    s = r["setup"]
    lines = [
        md_header(r["produced_by"]) + "# select() on 2 ranks (gloo, DDP) vs one process",
        "",
        f"{r['machine']}. Global batch {s['global_batch']} ({s['batch_per_rank']} per rank), k = {s['k']}, "
        f"sketch length D = {s['sketch_length']}, sketch_dim d = {s['sketch_dim']}, {s['sources']} sources; "
        f"median of {s['steps']} steps. Produced by `python benchmarks/distributed_select.py`.",
        "",
        "## Bytes each rank sends per step (select()'s collectives; DDP's gradient all-reduce not included)",
        "",
        "| collective | rank 0 | rank 1 |",
        "|---|---|---|",
    ]
    for name in r["measured_bytes_per_rank"][0]:
        lines.append(
            f"| {name} | {r['measured_bytes_per_rank'][0][name]:,} | {r['measured_bytes_per_rank'][1][name]:,} |"
        )
    lines += ["", "Formula (docs/distributed.md):", "", "| term | bytes |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" for k, v in r["expected_bytes"].items()]
    counts = r["selected_per_rank_per_step"]
    lines += [
        "",
        f"Selected examples per rank and step (of k = {s['k']}): "
        + "; ".join(f"rank {i}: {c}" for i, c in enumerate(counts))
        + f". Busiest rank's share: median {statistics.median(max(c) / s['k'] for c in zip(*counts)):.2f} "
        f"(perfect balance {1 / len(counts):.2f}).",
    ]
    lines += [
        "",
        "## Time per stage, ms (median)",
        "",
        "| stage | rank 0 | rank 1 | one process, same global batch |",
        "|---|---|---|---|",
    ]
    st = r["stages_ms"]
    for name in st["one_process"] | st["rank0"]:
        cells = [f"{st[k][name]:.1f}" if name in st[k] else "-" for k in ("rank0", "rank1", "one_process")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (RESULTS / "distributed_select.md").write_text("\n".join(lines) + "\n")


def write_plot(r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    st = r["stages_ms"]
    names = [n for n in st["one_process"] | st["rank0"] if n != "total"]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    width = 0.27
    for i, key in enumerate(("rank0", "rank1", "one_process")):
        ax.bar([j + (i - 1) * width for j in range(len(names))], [st[key].get(n, 0.0) for n in names], width, label=key)
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_ylabel("ms per step (median)")
    ax.set_title(
        f"select() by stage: 2 ranks x {r['setup']['batch_per_rank']} vs 1 process x {r['setup']['global_batch']}"
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "distributed_select.png", dpi=120)


if __name__ == "__main__":
    main()
