import itertools

import numpy as np
import pytest
import torch

from coreset_optim.methods.gradient_matching import greedy_matching, nnls_gram


def _brute_force_nnls(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """min ||a w - t|| over w >= 0 by trying every support (tiny problems only)."""
    n = a.shape[1]
    best, best_w = float("inf"), torch.zeros(n, dtype=a.dtype)
    for r in range(n + 1):
        for support in itertools.combinations(range(n), r):
            w = torch.zeros(n, dtype=a.dtype)
            if support:
                cols = list(support)
                sol = torch.linalg.lstsq(a[:, cols], t[:, None]).solution.flatten()
                if (sol < 0).any():
                    continue
                w[cols] = sol
            err = (a @ w - t).norm().item()
            if err < best - 1e-12:
                best, best_w = err, w
    return best_w


@pytest.mark.parametrize("seed", range(8))
def test_nnls_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(8, 5, generator=g, dtype=torch.float64)
    t = torch.randn(8, generator=g, dtype=torch.float64)
    mask = np.ones(5, dtype=bool)
    w = torch.from_numpy(nnls_gram((a.T @ a).numpy(), (a.T @ t).numpy(), mask))
    ref = _brute_force_nnls(a, t)
    assert (w >= 0).all()
    torch.testing.assert_close((a @ w - t).norm(), (a @ ref - t).norm(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(w, ref, rtol=1e-6, atol=1e-9)


def test_nnls_respects_mask():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 4, generator=g, dtype=torch.float64)
    t = torch.randn(6, generator=g, dtype=torch.float64)
    mask = np.array([True, False, True, False])
    w = torch.from_numpy(nnls_gram((a.T @ a).numpy(), (a.T @ t).numpy(), mask))
    assert (w[~mask] == 0).all()
    ref = _brute_force_nnls(a[:, mask], t)
    torch.testing.assert_close(w[mask], ref, rtol=1e-6, atol=1e-9)


def test_weights_nonnegative_sum_to_n_distinct_indices():
    x = torch.randn(30, 12, generator=torch.Generator().manual_seed(1))
    idx, w = greedy_matching(x, 7)
    assert idx.numel() == 7 and idx.unique().numel() == 7
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(), torch.tensor(30.0))


def test_finds_the_exact_representation():
    # Rows are copies of three prototypes: three atoms weighted by their copy counts match exactly.
    protos = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    copies = torch.tensor([0] * 9 + [1] * 5 + [2] * 2)
    x = protos[copies]
    idx, w = greedy_matching(x, 3)
    err = (w @ x[idx] - x.sum(0)).norm() / x.sum(0).norm()
    assert err < 1e-4
    assert sorted(copies[idx].tolist()) == [0, 1, 2]


def test_matches_better_than_random_subsets():
    g = torch.Generator().manual_seed(3)
    centers = torch.randn(4, 16, generator=g) * 3
    x = centers[torch.randint(0, 4, (64,), generator=g)] + torch.randn(64, 16, generator=g)
    target = x.sum(0)
    idx, w = greedy_matching(x, 16)
    ours = ((w @ x[idx]) - target).norm()
    rand = []
    for _ in range(50):
        r = torch.randperm(64, generator=g)[:16]
        rand.append(((x[r].sum(0) * 4) - target).norm())
    assert ours < 0.5 * torch.stack(rand).median()


def test_k_equals_n_is_the_full_sum():
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(4))
    idx, w = greedy_matching(x, 10)
    torch.testing.assert_close(w @ x[idx], x.sum(0), rtol=1e-4, atol=1e-4)


def test_unconstrained_weights_are_the_nnls_fit_of_the_sum():
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    idx, w = greedy_matching(x, 4, count_weight=0.0, rescale=False)
    ref = _brute_force_nnls(x[idx].T, x.sum(0))
    torch.testing.assert_close(w.double(), ref, rtol=1e-5, atol=1e-6)


def test_warm_started_greedy_equals_cold_refits():
    """The greedy loop warm-starts each NNLS refit; a cold refit at every step gives the same."""
    import numpy as np

    from coreset_optim.methods import gradient_matching as gm

    gen = torch.Generator().manual_seed(5)
    for trial in range(4):
        x = torch.randn(40, 12, generator=gen) + 0.2 * trial
        n, k = x.shape[0], 15
        chosen, weights = gm.greedy_matching(x, k)
        # the same loop, written out with cold refits
        xd = x.double()
        lam = xd.norm(dim=1).mean()
        host = (xd @ xd.T + lam * lam).numpy()
        norms = np.sqrt(np.diag(host))
        gram, b = host / np.outer(norms, norms), host.sum(1) / norms
        taken, w, order = np.zeros(n, dtype=bool), np.zeros(n), []
        for _ in range(k):
            corr = b - gram @ w
            corr[taken] = -np.inf
            j = int(np.argmax(corr))
            order.append(j)
            taken[j] = True
            w = gm.nnls_gram(gram, b, taken)
        ref = w[order] / norms[order]
        assert chosen.tolist() == order
        torch.testing.assert_close(weights, torch.tensor(ref * (n / ref.sum()), dtype=torch.float32))
