"""CoresetTrainer under `torchrun --nproc_per_node 2` (CPU, gloo): trains, logs global counts."""

from __future__ import annotations

import re

import pytest
import torch

import distributed_helpers as h

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_coreset_trainer_under_torchrun(tmp_path):
    out = h.torchrun(h.ROOT / "examples" / "trainer_ddp.py", "--output-dir", str(tmp_path), "--steps", "4", timeout=300)
    assert "parameters identical on all 2 ranks: True" in out.stdout
    lines = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 2, out.stdout  # logging_steps=2, printed by rank 0 only
    for line in lines:
        pairs = re.findall(r"(\w+) (\d+)/(\d+)", line.split(":", 1)[1])
        # two selections per logging window, each from the global batch of 2 x 16 = 32, choosing 8
        assert sum(int(total) for _, _, total in pairs) == 2 * 32
        assert sum(int(sel) for _, sel, _ in pairs) == 2 * 8


HOOK_SCRIPT = """
import sys
from pathlib import Path

import torch
from _integrations_models import make_args, make_dataset, selection_recorder, tiny_llama

from coreset_optim.distributed import shutdown
from coreset_optim.integrations.transformers import CoresetTrainer

out = Path(sys.argv[1])
torch.set_num_threads(1)
args = make_args(
    out, per_device_train_batch_size=8, coreset_size=5, gradient_accumulation_steps=2, max_steps=2,
    logging_steps=1, source_column="source", ddp_backend="gloo",
)
recorder = selection_recorder()
CoresetTrainer(model=tiny_llama(), args=args, train_dataset=make_dataset(n=64), callbacks=[recorder]).train()
coresets = [
    dict(
        indices=c.indices.tolist(),
        local_indices=c.local_indices.tolist(),
        rank_sizes=list(c.rank_sizes),
        selected={s: n.selected for s, n in c.source_counts.items()},
    )
    for c in recorder.coresets
]
sources = [batch["source"] for batch in recorder.seen]
rank = torch.distributed.get_rank()
torch.save(dict(steps=recorder.steps, coresets=coresets, sources=sources), out / f"rank{rank}.pt")
shutdown()
"""


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs gloo")
def test_on_selection_under_torchrun_gets_each_ranks_share(tmp_path):
    """Every rank's callbacks get on_selection once per micro-batch; coreset.indices (into the
    global batch) agree across ranks, and coreset.local_indices index the rank's own inputs: the
    sources of the rows they pick, over both ranks, are the coreset's per-source counts."""
    from collections import Counter

    script = tmp_path / "hook_ddp.py"
    script.write_text(HOOK_SCRIPT)
    h.torchrun(script, str(tmp_path), timeout=300)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for seen in ranks:
        assert seen["steps"] == [0, 0, 1, 1]  # 2 optimizer steps x 2 micro-batches, on each rank
    for s in range(4):
        first, second = (seen["coresets"][s] for seen in ranks)
        assert first["indices"] == second["indices"] and len(first["indices"]) == 5
        assert first["rank_sizes"] == second["rank_sizes"] == [8, 8]
        picked = Counter()
        for r, seen in enumerate(ranks):
            local = seen["coresets"][s]["local_indices"]
            assert local == [i - 8 * r for i in first["indices"] if 8 * r <= i < 8 * (r + 1)]
            picked.update(seen["sources"][s][i] for i in local)
        assert dict(picked) == {k: n for k, n in first["selected"].items() if n}
