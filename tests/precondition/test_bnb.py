"""Reading bitsandbytes Adam state (8-bit and 32-bit) against bnb's own dequantizer and torch Adam."""

import warnings

import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnbF  # noqa: E402

from coreset_optim import CoresetOptimizer  # noqa: E402
from coreset_optim.precondition.moments import dequantize_blockwise, read_adam_moments  # noqa: E402
from core_utils import TwoLayer, make_batch, regression_loss  # noqa: E402

EIGHT_BIT = {
    "Adam8bit": lambda ps, **kw: bnb.optim.Adam8bit(ps, **kw),
    "AdamW8bit": lambda ps, **kw: bnb.optim.AdamW8bit(ps, **kw),
    "PagedAdamW8bit": lambda ps, **kw: bnb.optim.PagedAdamW8bit(ps, **kw),
    "AdamW(optim_bits=8)": lambda ps, **kw: bnb.optim.AdamW(ps, optim_bits=8, **kw),
}


@pytest.fixture(autouse=True)
def _quiet_paged():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        yield


@pytest.mark.parametrize("blocksize", [64, 256, 2048, 4096])
@pytest.mark.parametrize("numel", [1, 300, 5000])
def test_dequantize_matches_bitsandbytes(blocksize, numel):
    x = torch.rand(numel) * torch.logspace(-3, 1, numel)  # non-negative, like v
    codes, qstate = bnbF.quantize_blockwise(x, blocksize=blocksize)
    ref = bnbF.dequantize_blockwise(codes, absmax=qstate.absmax, code=qstate.code, blocksize=blocksize)
    got = dequantize_blockwise(codes, qstate.code, qstate.absmax)
    torch.testing.assert_close(got, ref, rtol=0, atol=0)


def _run_side_by_side(make_opt, steps=20, shape=(20, 30)):
    """The same gradient sequence into a bnb optimizer and torch Adam; returns both params."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(shape))
    q = torch.nn.Parameter(p.detach().clone())
    opt, ref = make_opt([p]), torch.optim.Adam([q], lr=1e-3, betas=(0.9, 0.999), eps=1e-8)
    scale = 1 + torch.arange(shape[1]).float()  # coordinates of very different magnitude
    for _ in range(steps):
        g = torch.randn(shape) * scale
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    return opt, p, ref, q


def _rel_l2(a, b):
    return ((a - b).norm() / b.norm()).item()


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


@pytest.mark.parametrize("name", list(EIGHT_BIT))
def test_8bit_v_close_to_torch_adam(name):
    opt, p, ref, q = _run_side_by_side(lambda ps: EIGHT_BIT[name](ps, lr=1e-3, min_8bit_size=0))
    assert opt.state[p]["state2"].dtype == torch.uint8  # the 8-bit path really ran
    m = read_adam_moments(opt, p)
    rs = ref.state[q]
    assert m.step == 20 and m.beta2 == 0.999 and m.eps == 1e-8
    assert _rel_l2(m.exp_avg_sq, rs["exp_avg_sq"]) < 0.05
    assert _cos(m.exp_avg_sq, rs["exp_avg_sq"]) > 0.99
    assert _rel_l2(m.exp_avg, rs["exp_avg"]) < 0.05
    # the quantity normalization divides by: 1 / (sqrt(v_hat) + eps)
    inv = lambda v: 1 / ((v / (1 - 0.999**20)).sqrt() + 1e-8)  # noqa: E731
    assert _cos(inv(m.exp_avg_sq), inv(rs["exp_avg_sq"])) > 0.99
    st = opt.state[p]
    own = bnbF.dequantize_blockwise(st["state2"], absmax=st["absmax2"], code=st["qmap2"], blocksize=256)
    torch.testing.assert_close(m.exp_avg_sq, own.reshape(p.shape), rtol=0, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: bnb.optim.Adam(ps, lr=1e-3, optim_bits=32),
        lambda ps: bnb.optim.Adam32bit(ps, lr=1e-3),
        lambda ps: bnb.optim.Adam8bit(ps, lr=1e-3),  # 600 < min_8bit_size=4096: float32 state
        lambda ps: bnb.optim.AdamW(ps, lr=1e-3, optim_bits=8, weight_decay=0.0),
    ],
    ids=["Adam(optim_bits=32)", "Adam32bit", "Adam8bit-small", "AdamW8-small"],
)
def test_32bit_state_read_exactly(make):
    opt, p, ref, q = _run_side_by_side(make)
    st = opt.state[p]
    assert st["state2"].dtype == torch.float32
    m = read_adam_moments(opt, p)
    torch.testing.assert_close(m.exp_avg_sq, st["state2"], rtol=0, atol=0)
    torch.testing.assert_close(m.exp_avg, st["state1"], rtol=0, atol=0)
    torch.testing.assert_close(m.exp_avg_sq, ref.state[q]["exp_avg_sq"], rtol=1e-4, atol=1e-6)
    assert m.step == 20


WRAPPED = EIGHT_BIT | {"Adam(optim_bits=32)": lambda ps, **kw: bnb.optim.Adam(ps, optim_bits=32, lr=kw["lr"])}


@pytest.mark.parametrize("name,normalize", [(n, "adam") for n in WRAPPED] + [("Adam8bit", "adam_update")])
def test_wrapper_runs_on_bnb(name, normalize):
    torch.manual_seed(0)
    model = TwoLayer(d_in=8, hidden=16, d_out=3)
    opt = WRAPPED[name](model.parameters(), lr=1e-2, min_8bit_size=0)
    wrapper = CoresetOptimizer(opt, model, coreset_size=4, normalize=normalize, sketch_modules=["fc1", "fc2"])
    start = [p.detach().clone() for p in model.parameters()]
    for step in range(2):
        batch = make_batch(10, d_in=8, seed=step)
        keys = {id(p): sorted(s) for p, s in opt.state.items()}
        cs = wrapper.select(batch, regression_loss(model))
        assert {id(p): sorted(s) for p, s in opt.state.items()} == keys  # never written
        assert len(cs) == 4 and bool(torch.isfinite(cs.sketches).all())
        torch.testing.assert_close(cs.weights.sum(), torch.tensor(10.0))
        wrapper.step()
        wrapper.zero_grad()
    expected = torch.float32 if "32" in name else torch.uint8
    assert opt.state[model.fc1.weight]["state2"].dtype == expected
    for p, s in zip(model.parameters(), start):
        assert bool(torch.isfinite(p).all()) and not torch.equal(p, s)


@pytest.mark.parametrize("mode", ["adam", "adam_update"])
def test_bnb_lion_stays_raw(mode):
    from coreset_optim.precondition.normalize import normalize_sketches

    opt, p, _, _ = _run_side_by_side(lambda ps: bnb.optim.Lion8bit(ps, min_8bit_size=0), steps=2)
    g = torch.randn(3, p.numel())
    torch.testing.assert_close(normalize_sketches(g, opt, [p], mode), g, rtol=0, atol=0)


def test_bnb_ademamix_reads_second_moment():
    """AdEMAMix stacks two EMAs in state1 (not Adam's m); its state2 is Adam's v."""
    from coreset_optim.precondition.normalize import normalize_sketches

    opt, p, ref, q = _run_side_by_side(lambda ps: bnb.optim.AdEMAMix8bit(ps, min_8bit_size=0), steps=5)
    m = read_adam_moments(opt, p)
    assert m.exp_avg is None
    st = opt.state[p]
    v = bnbF.dequantize_blockwise(st["state2"], absmax=st["absmax2"], code=st["qmap2"], blocksize=256)
    torch.testing.assert_close(m.exp_avg_sq, v.reshape(p.shape), rtol=0, atol=0)
    g = torch.randn(3, p.numel())
    b2, eps = opt.param_groups[0]["betas"][1], opt.param_groups[0]["eps"]
    expected = g / ((v.flatten() / (1 - b2**5)).sqrt() + eps)
    torch.testing.assert_close(normalize_sketches(g, opt, [p], "adam"), expected)
    assert bool(torch.isfinite(normalize_sketches(g, opt, [p], "adam_update")).all())


@pytest.mark.parametrize("mode", ["adam", "adam_update"])
def test_8bit_state_streamed_in_blocks_equals_whole(mode):
    """Block-by-block normalization decodes only the 8-bit blocks it needs and gives the whole path's sketches."""
    from coreset_optim.sketch.compress import compress_per_source
    from coreset_optim.precondition.normalize import normalize_sketches
    from coreset_optim.sketch.capture import exact_sketches, resolve_sketch_modules, sketch_params, BatchPass
    from coreset_optim.sketch.streaming import compressed_sketches

    torch.manual_seed(0)
    model = TwoLayer(d_in=40, hidden=30, d_out=3)
    opt = bnb.optim.Adam8bit(model.parameters(), lr=1e-3, min_8bit_size=0)
    loss_fn = regression_loss(model)
    for s in range(3):
        opt.zero_grad()
        loss_fn(make_batch(8, d_in=40, d_out=3, seed=s)).mean().backward()
        opt.step()
    opt.zero_grad()
    assert opt.state[model.fc1.weight]["state2"].dtype == torch.uint8
    targets = resolve_sketch_modules(model, opt, ["fc1", "fc2"])
    batch = make_batch(9, d_in=40, d_out=3, tokens=2, seed=7)
    codes = torch.tensor([0, 1] * 4 + [0])
    got, _, valid = compressed_sketches(
        BatchPass(model, targets, batch, loss_fn, 9, 4),
        optimizer=opt,
        normalize=mode,
        sketch="exact",
        dim=50,
        seed=0,
        source_codes=codes,
        num_sources=2,
        block_bytes=1,
    )
    raw, _ = exact_sketches(model, targets, batch, loss_fn, 9, 4)
    whole = normalize_sketches(raw, opt, sketch_params(targets), mode)
    assert valid.all()
    torch.testing.assert_close(got, compress_per_source(whole, valid, codes, 2, 50), rtol=1e-5, atol=1e-6)
