"""select() on a model sharded with a bf16 MixedPrecisionPolicy (FSDP2): FSDP2 fixes its dtypes at
the first forward, which was the sketch pass with every parameter but the sketched ones frozen, so
the coreset's bf16 gradients reached the fp32 shards (a RuntimeError). select() now runs FSDP2's
initialization first; the gradient equals the fp32 reference of the same coreset within bf16's
precision."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

fsdp = pytest.importorskip("torch.distributed.fsdp")
pytestmark = pytest.mark.skipif(
    not hasattr(fsdp, "MixedPrecisionPolicy") or not torch.distributed.is_gloo_available(),
    reason="needs FSDP2's MixedPrecisionPolicy and gloo",
)
TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))

from fsdp_mixed_precision import model_and_batch  # noqa: E402


def test_bf16_policy_gradient_is_the_fp32_reference_of_the_coreset(tmp_path):
    out = tmp_path / "result.pt"
    run = subprocess.run(
        [sys.executable, str(TESTS / "fsdp_mixed_precision.py"), str(tmp_path / "store"), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)])},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(out, weights_only=False)
    model, x, y = model_and_batch()
    model.load_state_dict({n: got["before"][n] for n, _ in model.named_parameters()})
    losses = (model(x[got["indices"]]) - y[got["indices"]]).pow(2).mean(1)
    (got["weights"] @ losses / x.shape[0]).backward()
    for n, p in model.named_parameters():
        assert got["grads"][n].dtype == torch.float32
        torch.testing.assert_close(got["grads"][n], p.grad, rtol=2e-2, atol=2e-3, msg=lambda m, n=n: f"{n}: {m}")
