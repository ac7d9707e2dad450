"""Block-by-block compressed sketches == today's whole-gradient math == a batch-size-1 loop."""

import pytest
import torch
from torch import nn

import coreset_optim.sketch.streaming as streaming
from coreset_optim.sketch.compress import compress_per_source, StreamingTopCoordinates
from coreset_optim.precondition.moments import dequantize_blockwise, dequantize_range
from coreset_optim.precondition.normalize import normalize_sketches
from coreset_optim.sketch.projection import countsketch, countsketch_add_, countsketch_hash
from coreset_optim.sketch.capture import exact_sketches, resolve_sketch_modules, sketch_params, BatchPass
from coreset_optim.sketch.streaming import compressed_sketches
from core_utils import Snapshot, TwoLayer, make_batch, per_example_grads_loop, regression_loss, take_steps


class Tied(nn.Module):
    """A layer used twice in one forward (tied weights), between two other layers."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 6)
        self.shared = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3, bias=False)

    def forward(self, x):
        return self.out(torch.tanh(self.shared(torch.tanh(self.shared(self.inp(x))))))


def _setup(model_cls=TwoLayer, amsgrad=False, steps=3, opt_cls=torch.optim.AdamW):
    torch.manual_seed(0)
    model = model_cls()
    opt = opt_cls(model.parameters(), lr=1e-2, amsgrad=amsgrad)
    if steps:
        loss_fn = regression_loss(model)
        for s in range(steps):
            batch = make_batch(8, 5, 3, tokens=2, seed=10 + s)
            opt.zero_grad()
            loss_fn(batch).mean().backward()
            opt.step()
        opt.zero_grad()
    return model, opt


def _today(model, opt, targets, batch, loss_fn, n, chunk, mode, sketch, dim, seed, codes, num_sources):
    """Today's math, whole: every per-example gradient, normalized, then compressed."""
    raw, losses = exact_sketches(model, targets, batch, loss_fn, n, chunk)
    normalized = normalize_sketches(raw, opt, sketch_params(targets), mode)
    valid = torch.isfinite(losses) & torch.isfinite(normalized).all(1)
    if sketch == "projection":
        out = countsketch(normalized, dim, seed)
        return torch.where(valid[:, None], out, torch.full_like(out, float("nan"))), losses, valid
    return compress_per_source(normalized, valid, codes, num_sources, dim), losses, valid


def _stream(model, opt, targets, batch, loss_fn, n, chunk, mode, sketch, dim, seed, codes, num_sources, block_bytes):
    return compressed_sketches(
        BatchPass(model, targets, batch, loss_fn, n, chunk),
        optimizer=opt,
        normalize=mode,
        sketch=sketch,
        dim=dim,
        seed=seed,
        source_codes=codes,
        num_sources=num_sources,
        block_bytes=block_bytes,
    )


CASES = [
    # model, sketch modules, tokens
    (TwoLayer, "fc2", None),
    (TwoLayer, ["fc1", "fc2"], 3),
    (Tied, ["shared", "out"], 2),
]


@pytest.mark.parametrize("model_cls,spec,tokens", CASES)
@pytest.mark.parametrize("mode", ["adam", "adam_update", None])
@pytest.mark.parametrize("sketch,dim", [("exact", 7), ("exact", 500), ("projection", 8)])
@pytest.mark.parametrize("block_bytes,chunk", [(1, 3), (1, None), (10**9, 4)])
def test_matches_whole_gradient_math(model_cls, spec, tokens, mode, sketch, dim, block_bytes, chunk):
    model, opt = _setup(model_cls, amsgrad=mode == "adam_update")
    targets = resolve_sketch_modules(model, opt, spec)
    n = 10
    batch = make_batch(n, 5, 3, tokens=tokens, seed=1)
    loss_fn = regression_loss(model)
    codes = torch.tensor([0, 1, 0, 2, 1, 0, 0, 1, 2, 0])
    args = (model, opt, targets, batch, loss_fn, n, chunk, mode, sketch, dim, 3, codes, 3)
    snap = Snapshot(model, opt)
    got, losses, valid = _stream(*args, block_bytes)
    snap.assert_unchanged()
    ref, ref_losses, ref_valid = _today(*args)
    assert valid.all() and torch.equal(valid, ref_valid)
    torch.testing.assert_close(losses, ref_losses)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_one_row_per_block_holds_no_whole_layer(monkeypatch):
    """With a tiny budget every block is one output row: no tensor of a whole layer's gradients."""
    model, opt = _setup()
    targets = resolve_sketch_modules(model, opt, ["fc1", "fc2"])
    widths = []
    real = streaming.linear_grad_block

    def spy(calls, rows, with_bias, out=None):
        weight, bias = real(calls, rows, with_bias, out=out)
        widths.append(weight.shape[1])
        return weight, bias

    monkeypatch.setattr(streaming, "linear_grad_block", spy)
    batch = make_batch(6, tokens=2)
    codes = torch.zeros(6, dtype=torch.long)
    _stream(model, opt, targets, batch, regression_loss(model), 6, None, "adam", "exact", 4, 0, codes, 1, 1)
    assert widths == [5] * 4 + [4] * 3  # fc1: 4 rows of 5 inputs, fc2: 3 rows of 4
    assert streaming.rows_per_block(6, 5, 10**9) > 4  # a big budget: one block per layer


@pytest.mark.parametrize("sketch,dim", [("exact", 6), ("projection", 16)])
def test_matches_batch_size_one_loop(sketch, dim):
    """Against per-example backward passes, Adam-normalized by hand, compressed by brute force."""
    model, opt = _setup(steps=2)
    n = 7
    batch = make_batch(n, tokens=2, seed=4)
    loss_fn = regression_loss(model)
    params = list(model.parameters())
    targets = resolve_sketch_modules(model, opt, ["fc1", "fc2"])
    codes = torch.tensor([0, 0, 1, 1, 0, 1, 0])
    got, _, _ = _stream(model, opt, targets, batch, loss_fn, n, 2, "adam", sketch, dim, 5, codes, 2, 1)
    model.eval()
    g = per_example_grads_loop(model, sketch_params(targets), batch, loss_fn, n)
    cols = []
    for p in sketch_params(targets):
        state, group = opt.state[p], opt.param_groups[0]
        v_hat = state["exp_avg_sq"].flatten() / (1 - group["betas"][1] ** float(state["step"]))
        cols.append(v_hat.sqrt() + group["eps"])
    normalized = g / torch.cat(cols)
    assert params == sketch_params(targets)
    if sketch == "projection":
        buckets, signs = countsketch_hash(normalized.shape[1], dim, 5)
        matrix = torch.zeros(normalized.shape[1], dim)
        matrix[torch.arange(normalized.shape[1]), buckets] = signs
        torch.testing.assert_close(got, normalized @ matrix, rtol=1e-4, atol=1e-5)
        return
    ref = torch.empty(n, dim)
    for s in (0, 1):
        rows = (codes == s).nonzero().flatten()
        score = normalized[rows].abs().sum(0)
        keep = sorted(sorted(range(score.numel()), key=lambda c: -float(score[c]))[:dim])
        ref[rows] = normalized[rows][:, keep]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_invalid_rows_found_part_way_are_redone(monkeypatch):
    """A finite loss with a non-finite normalized gradient (eps denormal, a zero second moment) marks the
    row invalid, and the columns are chosen without it, as the whole-gradient path does."""
    torch.manual_seed(0)
    model = TwoLayer()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, eps=1e-45)
    loss_fn = regression_loss(model)
    for s in range(2):  # input feature 4 is always 0: fc1.weight[:, 4] gets a zero second moment
        b = make_batch(8, seed=20 + s)
        b["x"][:, 4] = 0
        opt.zero_grad()
        loss_fn(b).mean().backward()
        opt.step()
    opt.zero_grad()
    batch = make_batch(9, seed=3)
    batch["x"][:, 4] = 0
    batch["x"][5, 4] = 1.0  # only example 5 has a gradient there: x / (0 + 1e-45) overflows
    batch["y"][7, 0] = float("nan")  # a non-finite loss too
    targets = resolve_sketch_modules(model, opt, ["fc1", "fc2"])
    codes = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0])
    args = (model, opt, targets, batch, loss_fn, 9, 4, "adam", "exact", 5, 0, codes, 2)
    passes = []
    real = streaming.StreamingTopCoordinates
    monkeypatch.setattr(streaming, "StreamingTopCoordinates", lambda *a, **k: passes.append(1) or real(*a, **k))
    got, losses, valid = _stream(*args, 1)
    assert len(passes) == 2  # the first pass found row 5, the second chose columns without it
    ref, _, ref_valid = _today(*args)
    assert valid.tolist() == [True] * 5 + [False, True, False, True]
    assert torch.equal(valid, ref_valid)
    torch.testing.assert_close(got, ref, equal_nan=True)
    assert torch.isnan(got[[5, 7]]).all()
    args = (model, opt, targets, batch, loss_fn, 9, 4, "adam", "projection", 8, 0, codes, 2)
    got, _, valid = _stream(*args, 1)
    ref, _, ref_valid = _today(*args)
    assert torch.equal(valid, ref_valid) and valid.sum() == 7
    torch.testing.assert_close(got, ref, equal_nan=True)


def test_streaming_top_coordinates_merge_equals_whole():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 40, generator=g) * torch.rand(40, generator=g) * 3
    codes = torch.tensor([0, 1, 2] * 4)
    valid = torch.ones(12, dtype=torch.bool)
    valid[[4, 7]] = False  # source 1 keeps 2 of its 4 rows
    for dim in (1, 5, 40, 100):
        for width in (1, 3, 7, 40):
            top = StreamingTopCoordinates(valid, codes, 3, dim)
            for start in range(0, 40, width):
                top.add(x[:, start : start + width], start)
            want = compress_per_source(x, valid, codes, 3, dim)
            torch.testing.assert_close(top.result(12), want, equal_nan=True)


def test_countsketch_blocks_add_up_to_whole():
    x = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0))
    whole = countsketch(x, 32, seed=4)
    out = torch.zeros(3, 32)
    for start in range(0, 1000, 77):
        countsketch_add_(out, x[:, start : start + 77], seed=4, start=start)
    torch.testing.assert_close(out, whole)
    b_all, s_all = countsketch_hash(1000, 32, 4)
    b_mid, s_mid = countsketch_hash(100, 32, 4, start=450)
    assert torch.equal(b_mid, b_all[450:550]) and torch.equal(s_mid, s_all[450:550])
    assert set(s_all.tolist()) == {-1.0, 1.0} and 0 <= b_all.min() and b_all.max() < 32
    # roughly uniform buckets and balanced signs
    counts = torch.bincount(b_all, minlength=32).float()
    assert counts.min() > 10 and counts.max() < 60
    assert abs(float(s_all.mean())) < 0.1
    # indices beyond the hash's prime are folded in, not wrapped onto the small ones
    big, _ = countsketch_hash(4, 1 << 20, 4, start=2**31 - 1)
    small, _ = countsketch_hash(4, 1 << 20, 4, start=0)
    assert not torch.equal(big, small)


def test_dequantize_range_equals_slice_of_whole():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 256, (1000,), generator=g, dtype=torch.uint8).view(10, 100)
    code_book = torch.linspace(-1, 1, 256)
    absmax = torch.rand(4, generator=g) + 0.5  # blocks of 256
    whole = dequantize_blockwise(codes, code_book, absmax).flatten()
    for a, b in [(0, 1000), (0, 1), (255, 257), (300, 999), (512, 768)]:
        torch.testing.assert_close(dequantize_range(codes, code_book, absmax, a, b), whole[a:b])


@pytest.mark.parametrize("selection", ["gradient_matching", "consensus_loss"])
def test_select_uses_bounded_path_same_coreset_as_whole(selection):
    """select() with a one-row block budget picks the same coreset as with one block per layer
    (top coordinates pinned: "auto" would switch to the CountSketch at the small budget)."""
    from core_utils import build

    chosen = []
    for block in (1, 10**9):
        model, opt, wrapper = build(
            coreset_size=3, sketch_block_bytes=block, sketch_modules=["fc1", "fc2"], sketch="exact", selection=selection
        )
        take_steps(opt, model, 2)
        opt.zero_grad()
        cs = wrapper.select(make_batch(9, tokens=2), regression_loss(model))
        chosen.append((cs.indices, cs.weights, cs.sketches))
    assert chosen[0][2].shape[1] > 0  # a sketch was compared
    assert torch.equal(chosen[0][0], chosen[1][0])
    torch.testing.assert_close(chosen[0][1], chosen[1][1])
    torch.testing.assert_close(chosen[0][2], chosen[1][2])


@pytest.mark.parametrize("block_bytes, expected", [(2**20, "exact"), (64, "projection")])
def test_auto_holds_top_coordinates_only_while_the_batch_fits(block_bytes, expected):
    """sketch='auto' equals top coordinates while the whole batch's layer calls fit in
    HOLD_BLOCKS blocks, and the streamed CountSketch beyond; both against the whole-gradient math."""
    model, opt = _setup()
    targets = resolve_sketch_modules(model, opt, ["fc1", "fc2"])
    loss_fn = regression_loss(model)
    batch = make_batch(9, 5, 3, tokens=2, seed=3)
    codes = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1, 0])
    # 9 examples x 2 tokens x (5 + 4 + 4 + 3) floats = 1,152 bytes of held calls
    held = 9 * 2 * (5 + 4 + 4 + 3) * 4
    assert (held <= streaming.HOLD_BLOCKS * block_bytes) == (expected == "exact")
    args = (model, opt, targets, batch, loss_fn, 9, 4, "adam", "auto", 6, 0, codes, 2)
    got, losses, valid = _stream(*args, block_bytes)
    ref, ref_losses, ref_valid = _today(*args[:8], expected, *args[9:])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(losses, ref_losses)
    assert torch.equal(valid, ref_valid)
