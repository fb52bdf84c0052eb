"""Low-rank factorization core: exact identities in float64, output-space whitening, rank rules
and the allocation of ranks across layers under a parameter budget."""

import itertools
import math
from fractions import Fraction

import pytest
import torch

from memsave.ops import lowrank
from memsave.ops.lowrank import (
    allocate_ranks,
    factor_error,
    max_useful_rank,
    rank_for_energy,
    rank_for_ratio,
    spectrum,
    svd_factors,
    whitened_svd_factors,
)


def _randn(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _inputs_with_loud_channels(rows=512, k=32, loud=(3, 17, 29), gain=30.0, seed=1):
    """(rows, K) inputs where a few channels are `gain` times larger than the rest (as in LLMs)."""
    x = _randn(rows, k, seed=seed)
    x[:, list(loud)] *= gain
    return x


def _cost(n, k, r):
    """What the caller stores for rank r: dense when factorizing would not save anything."""
    return n * k if r == 0 or r * (n + k) >= n * k else r * (n + k)


def _discarded(sv, r):
    p = sv.double().pow(2)
    return (p[r:].sum() / p.sum()).item()


def _objective(layers, ranks):
    """Σ relative discarded energy, dense layers contributing 0."""
    return sum(0.0 if _cost(n, k, ranks[name]) == n * k else _discarded(sv, ranks[name]) for name, (n, k, sv) in layers.items())


# ---------------------------------------------------------------------------------------------
# Ranks and budgets
# ---------------------------------------------------------------------------------------------


def test_max_useful_rank_boundaries():
    # Hand-checked: r·(N+K) < N·K, and r + 1 no longer is.
    shapes = [(1, 1), (1, 100), (2, 2), (3, 3), (4, 4), (5, 5), (64, 64)]
    assert [max_useful_rank(n, k) for n, k in shapes] == [0, 0, 0, 1, 1, 2, 31]
    assert max_useful_rank(4096, 11008) == 2985
    for n, k in itertools.product([1, 2, 3, 7, 16, 33, 100], repeat=2):
        r = max_useful_rank(n, k)
        assert r * (n + k) < n * k <= (r + 1) * (n + k)
        assert r < min(n, k) or r == 0
    with pytest.raises(ValueError, match="N=0, K=5"):
        max_useful_rank(0, 5)


def test_rank_for_ratio_boundaries():
    # 3·40 = 0.3·400 exactly: a boundary that binary 0.3 (slightly below 3/10) would miss.
    assert rank_for_ratio(20, 20, 0.3) == 3
    assert rank_for_ratio(20, 20, 0.29) == 2
    assert rank_for_ratio(100, 100, 0.5) == 25
    assert rank_for_ratio(10, 10, 0.05) == 0  # even rank 1 (20 params) exceeds 5
    assert rank_for_ratio(10, 10, 0.2) == 1
    for n, k, ratio in itertools.product([1, 3, 16, 37], [2, 16, 50], [0.01, 0.1, 0.25, 0.5, 0.9, 0.999]):
        r = rank_for_ratio(n, k, ratio)
        budget = Fraction(str(ratio)) * n * k
        assert r * (n + k) <= budget < (r + 1) * (n + k)
        assert r <= max_useful_rank(n, k)  # ratio < 1 never asks for more than dense
    for bad in [0, 1, -0.1, 1.5, math.nan]:
        with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\).*got " + str(bad)):
            rank_for_ratio(8, 8, bad)


def test_rank_for_energy():
    sv = torch.tensor([3.0, 2.0, 1.0, 0.0])  # σ² 9, 4, 1, 0: total 14
    assert rank_for_energy(sv, 0.5) == 1
    assert rank_for_energy(sv, 9 / 14) == 1
    assert rank_for_energy(sv, 9 / 14 + 1e-9) == 2
    assert rank_for_energy(sv, 13 / 14) == 2
    assert rank_for_energy(sv, 0.99) == 3
    assert rank_for_energy(sv, 1.0) == 3  # the zero singular value is not needed
    assert rank_for_energy(torch.tensor([1.0, 3.0, 0.0, 2.0]), 0.9) == 2  # order does not matter
    assert rank_for_energy(torch.zeros(5), 0.9) == 0
    sv = torch.linalg.svdvals(_randn(40, 30))
    for energy in [0.1, 0.5, 0.9, 0.999]:
        r = rank_for_energy(sv, energy)
        assert 1 - _discarded(sv, r) >= energy > 1 - _discarded(sv, r - 1)
    for bad in [0, -1, 1.01]:
        with pytest.raises(ValueError, match=r"energy must be in \(0, 1\]"):
            rank_for_energy(sv, bad)
    with pytest.raises(ValueError, match="1-D"):
        rank_for_energy(torch.ones(2, 2), 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        rank_for_energy(torch.tensor([1.0, -1.0]), 0.5)


# ---------------------------------------------------------------------------------------------
# Factors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,k", [(7, 11), (11, 7), (1, 5), (16, 16)])
def test_svd_factors_are_the_best_rank_r_approximation(n, k):
    w = _randn(n, k, seed=n * k)
    sv = torch.linalg.svdvals(w)
    for r in range(1, min(n, k) + 1):
        u, v = svd_factors(w, r)
        assert u.shape == (n, r) and v.shape == (r, k) and u.dtype == v.dtype == torch.float64
        # Eckart–Young: squared error = the discarded σ².
        assert torch.isclose((w - u @ v).pow(2).sum(), sv[r:].pow(2).sum(), rtol=1e-10, atol=1e-12)
        # √Σ split: both factors carry Σ σ² of the kept values.
        assert torch.isclose(u.pow(2).sum(), v.pow(2).sum(), rtol=1e-10)
    u, v = svd_factors(w, min(n, k))
    assert torch.allclose(u @ v, w, rtol=0, atol=1e-12)  # exact at full rank


def test_svd_factors_dtype_and_errors():
    w = _randn(6, 9, dtype=torch.float32)
    u, v = svd_factors(w.bfloat16(), 3)
    assert u.dtype == v.dtype == torch.float32
    u, v = svd_factors(w, 6)
    assert u.dtype == torch.float32 and torch.allclose(u @ v, w, atol=1e-5)
    for bad in [0, -1, 7]:
        with pytest.raises(ValueError, match=f"N=6, K=9, got rank={bad}"):
            svd_factors(w, bad)
        with pytest.raises(ValueError, match=f"N=6, K=9, got rank={bad}"):
            whitened_svd_factors(w, torch.eye(9), bad)
    with pytest.raises(ValueError, match="2-D"):
        svd_factors(torch.ones(3), 1)


def test_whitening_lowers_the_output_error_when_some_channels_are_loud():
    x = _inputs_with_loud_channels()  # (512, 32)
    w = _randn(16, 32, seed=2)
    gram = x.t() @ x / x.shape[0]  # (32, 32)
    for r in [1, 2, 3, 4, 8]:
        plain = svd_factors(w, r)
        whitened = whitened_svd_factors(w, gram, r)
        # Each is best in its own metric: output error for whitened, weight error for plain. Once
        # the rank covers the 3 loud channels, whitening leaves a small fraction of plain's error.
        assert factor_error(w, *whitened, gram) < (0.25 if r >= 3 else 0.9) * factor_error(w, *plain, gram)
        assert factor_error(w, *plain) < factor_error(w, *whitened)
        # factor_error with a gram is the relative output error on the calibration rows.
        out_error = (x @ (w - whitened[0] @ whitened[1]).t()).norm() / (x @ w.t()).norm()
        assert math.isclose(factor_error(w, *whitened, gram), out_error.item(), rel_tol=1e-9)


def test_whitened_output_error_is_the_discarded_whitened_energy():
    """Eckart–Young in output space (Note [Whitening]): with no damping, the squared relative
    output error is exactly the discarded share of the whitened spectrum."""
    x = _inputs_with_loud_channels(k=24, loud=(0, 5))
    w = _randn(10, 24, seed=3)
    gram = x.t() @ x / x.shape[0]
    sv = spectrum(w, gram, damp=0)
    assert sv.dtype == torch.float64 and sv.shape == (10,) and (sv[:-1] >= sv[1:]).all()
    for r in range(1, 11):
        u, v = whitened_svd_factors(w, gram, r, damp=0)
        assert math.isclose(factor_error(w, u, v, gram) ** 2, _discarded(sv, r), rel_tol=1e-9, abs_tol=1e-15)


@pytest.mark.parametrize("damp", [0.0, 1e-2, 0.5])
def test_whitening_with_an_isotropic_gram_is_plain_svd(damp):
    w = _randn(9, 13, seed=4)
    for scale in [1.0, 3.0]:
        gram = scale * torch.eye(13, dtype=torch.float64)
        for r in [1, 4, 9]:
            u, v = whitened_svd_factors(w, gram, r, damp)
            pu, pv = svd_factors(w, r)
            assert torch.allclose(u @ v, pu @ pv, rtol=0, atol=1e-12)
        assert torch.allclose(spectrum(w, gram, damp), spectrum(w) * math.sqrt(scale * (1 + damp)), rtol=1e-12)


def test_whitening_with_dead_channels_and_singular_grams():
    x = _inputs_with_loud_channels(k=16, loud=(2,))
    x[:, [5, 11]] = 0  # dead: never active in calibration
    w = _randn(8, 16, seed=5)
    gram = x.t() @ x / x.shape[0]
    u, v = whitened_svd_factors(w, gram, 4)  # damping makes the gram positive definite
    assert torch.isfinite(u).all() and torch.isfinite(v).all()
    assert factor_error(w, u, v, gram) < factor_error(w, *svd_factors(w, 4), gram)
    with pytest.raises(ValueError, match="not positive definite with damp=0"):
        whitened_svd_factors(w, gram, 4, damp=0)
    # A zero gram (no signal at all) falls back to plain SVD.
    u, v = whitened_svd_factors(w, torch.zeros(16, 16), 3)
    pu, pv = svd_factors(w, 3)
    assert torch.allclose(u @ v, pu @ pv, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match=r"gram must be \(16, 16\) for this weight, got \(15, 15\)"):
        whitened_svd_factors(w, torch.eye(15), 3)
    with pytest.raises(ValueError, match="damp must be >= 0"):
        spectrum(w, gram, damp=-1)


def test_factor_error_values():
    w = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    zero_u, zero_v = torch.zeros(2, 1), torch.zeros(1, 2)
    assert factor_error(w, zero_u, zero_v) == 1.0
    u, v = torch.tensor([[1.0], [0.0]]), torch.tensor([[3.0, 0.0]])  # keeps the 3, drops the 4
    assert math.isclose(factor_error(w, u, v), 4 / 5)
    # Output space, G = diag(4, 1): tr(E G Eᵀ) = 16·1, tr(W G Wᵀ) = 9·4 + 16·1.
    assert math.isclose(factor_error(w, u, v, torch.diag(torch.tensor([4.0, 1.0]))), math.sqrt(16 / 52))
    assert factor_error(w, *svd_factors(w, 2)) < 1e-7
    assert factor_error(torch.zeros(2, 2), zero_u, zero_v) == 0.0
    assert factor_error(torch.zeros(2, 2), u, v) == math.inf
    with pytest.raises(ValueError, match=r"need W \(N, K\), U \(N, r\), V \(r, K\)"):
        factor_error(w, torch.zeros(3, 1), zero_v)


def test_spectrum():
    w = _randn(12, 5, seed=6, dtype=torch.float32)
    sv = spectrum(w)
    assert sv.dtype == torch.float32 and sv.shape == (5,)
    assert torch.allclose(sv, torch.linalg.svdvals(w.double()).float())
    gram = _randn(5, 5, seed=7)
    gram = gram @ gram.t() + torch.eye(5, dtype=torch.float64)
    s = torch.linalg.cholesky(gram + 0.1 * torch.diagonal(gram).mean() * torch.eye(5, dtype=torch.float64))
    assert torch.allclose(spectrum(w, gram.float(), damp=0.1), torch.linalg.svdvals(w.double() @ s).float(), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# Allocation across layers
# ---------------------------------------------------------------------------------------------


def _random_layers(count, seed, sizes=((32, 48), (48, 32), (24, 24), (64, 16))):
    """name → (N, K, σ) with power-law spectra of varied decay, from slow (flat) to fast."""
    g = torch.Generator().manual_seed(seed)
    layers = {}
    for i in range(count):
        n, k = sizes[i % len(sizes)]
        decay = 0.05 + 2 * torch.rand((), generator=g, dtype=torch.float64)
        jitter = 1 + 0.1 * torch.rand(min(n, k), generator=g, dtype=torch.float64)
        sv = torch.arange(1, min(n, k) + 1, dtype=torch.float64).pow(-decay) * jitter
        layers[f"layer{i}"] = (n, k, sv.sort(descending=True).values.float())
    return layers


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.4, 0.6, 0.8, 0.95])
def test_allocate_ranks_meets_the_budget(ratio):
    layers = _random_layers(12, seed=0)
    ranks = allocate_ranks(layers, ratio)
    assert list(ranks) == list(layers)
    dense = sum(n * k for n, k, _ in layers.values())
    assert sum(_cost(n, k, ranks[name]) for name, (n, k, _) in layers.items()) <= ratio * dense
    assert all(1 <= ranks[name] <= min(n, k) for name, (n, k, _) in layers.items())
    assert all(ranks[name] <= max_useful_rank(n, k) or ranks[name] == min(n, k) for name, (n, k, _) in layers.items())
    assert allocate_ranks(layers, ratio) == ranks  # deterministic
    # The same budget spent uniformly (rank_for_ratio everywhere) discards more energy.
    uniform = {name: rank_for_ratio(n, k, ratio) for name, (n, k, _) in layers.items()}
    assert _objective(layers, ranks) < _objective(layers, uniform)


def test_allocate_ranks_gives_more_rank_to_slowly_decaying_spectra():
    j = torch.arange(1, 65, dtype=torch.float64)
    layers = {"fast": (64, 64, 0.5**j), "slow": (64, 64, j.pow(-0.5)), "medium": (64, 64, j.pow(-1.0))}
    for ratio in [0.1, 0.2, 0.3, 0.5]:  # at 0.5 "slow" is dense (rank 64)
        ranks = allocate_ranks(layers, ratio)
        assert ranks["fast"] < ranks["medium"] < ranks["slow"]
    # Only relative energy counts: scaling a layer's weights changes nothing.
    scaled = {name: (n, k, 1000 * sv) if name == "fast" else (n, k, sv) for name, (n, k, sv) in layers.items()}
    assert allocate_ranks(scaled, 0.2) == allocate_ranks(layers, 0.2)


def test_allocate_ranks_dense_and_exact_layers():
    j = torch.arange(1, 33, dtype=torch.float64)
    low_rank = torch.cat([torch.tensor([3.0, 2.0, 1.0]), torch.zeros(29)]).double()
    layers = {
        "flat": (32, 32, torch.ones(32)),  # nothing to gain from rank until dense
        "rank3": (32, 32, low_rank),  # exact at rank 3: never given more
        "vector": (1, 64, torch.ones(1)),  # rank 1 saves nothing: always dense
        "decaying": (32, 32, j.pow(-1.0)),
    }
    ranks = allocate_ranks(layers, 0.9)
    assert ranks == {"flat": 32, "rank3": 3, "vector": 1, "decaying": 32}  # 32 and 1: full rank = dense
    # Budget floor(0.2·3136) = 627, start 3·64 + 64 = 256. Gains per parameter: rank3 1→2 (4/14)/64,
    # decaying 1→2, rank3 2→3, decaying 2→3, then flat's jump to dense (31/32)/960, which does not
    # fit, then decaying 3→4 (fits) and nothing else does (51 left).
    assert allocate_ranks(layers, 0.2) == {"flat": 1, "rank3": 3, "vector": 1, "decaying": 4}
    # With room for it, the flat layer jumps from rank 1 straight to dense, before decaying grows.
    assert allocate_ranks(layers, 0.5) == {"flat": 32, "rank3": 3, "vector": 1, "decaying": 4}


def test_allocate_ranks_errors():
    layers = {"a": (64, 64, torch.ones(64)), "b": (64, 64, torch.ones(64))}
    # Rank 1 everywhere: 2·128 of 2·4096 parameters = 1/32.
    assert allocate_ranks(layers, 0.03125) == {"a": 1, "b": 1}
    with pytest.raises(ValueError, match=r"ratio 0.03 is too small.*smallest achievable ratio is 0.03125"):
        allocate_ranks(layers, 0.03)
    for bad in [0, 1, 2.0]:
        with pytest.raises(ValueError, match=r"ratio must be in \(0, 1\)"):
            allocate_ranks(layers, bad)
    with pytest.raises(ValueError, match=r"allocate_ranks\['a'\]: expected min\(N, K\) = 64 singular values, got 10"):
        allocate_ranks({"a": (64, 64, torch.ones(10))}, 0.5)
    assert allocate_ranks({}, 0.5) == {}


def _hull_prefix_budgets(layers):
    """Total costs after each step of the greedy while every step fits (all hull steps by slope)."""
    plans = [lowrank._LayerPlan(name, *layer) for name, layer in layers.items()]
    steps = [plan.hull_steps() for plan in plans]
    order = torch.argsort(-torch.cat([s for s, _ in steps]), stable=True)
    start = sum(plan.cost() for plan in plans)
    return (start + torch.cumsum(torch.cat([c for _, c in steps])[order], 0)).tolist()


def test_allocate_ranks_is_optimal_where_the_budget_ends_on_a_hull_step():
    """Note [Rank allocation]: there the continuous relaxation's optimum is integral, so the
    greedy must match a brute-force search over every combination of options."""
    for seed in range(20):
        layers = _random_layers(3, seed, sizes=((6, 9), (10, 5), (8, 8)))
        options = [  # per layer: (cost, error) of ranks 1..R and of dense
            [(r * (n + k), _discarded(sv, r)) for r in range(1, max_useful_rank(n, k) + 1)] + [(n * k, 0.0)]
            for n, k, sv in layers.values()
        ]
        dense = sum(n * k for n, k, _ in layers.values())
        for budget in _hull_prefix_budgets(layers):
            if budget >= dense:
                continue
            ranks = allocate_ranks(layers, (budget + 0.5) / dense)  # floor(ratio · dense) = budget
            feasible = (combo for combo in itertools.product(*options) if sum(c for c, _ in combo) <= budget)
            best = min(sum(e for _, e in combo) for combo in feasible)
            assert _objective(layers, ranks) <= best + 1e-12


def test_allocate_ranks_fast_path_matches_the_move_by_move_greedy():
    layers = _random_layers(16, seed=3)
    dense = sum(n * k for n, k, _ in layers.values())
    for ratio in [0.15, 0.5, 0.85]:
        plans = [lowrank._LayerPlan(name, *layer) for name, layer in layers.items()]
        lowrank._fill_greedily(plans, lowrank._parameter_budget(ratio, dense, "test") - sum(p.cost() for p in plans))
        assert allocate_ranks(layers, ratio) == {p.name: p.rank() for p in plans}


@pytest.mark.parametrize("n,k", [(300, 120), (120, 300)])
def test_large_weights_factor_through_the_gram_matrix_to_the_same_approximation(n, k, monkeypatch):
    """Above LARGE_SVD_BYTES the factors come from an eigh of the smaller Gram matrix, a block of
    rows at a time: the same best rank-r approximation as the SVD (to float64 rounding, for a
    weight whose kept singular values are far above 1e-8 of the largest)."""
    from memsave.ops import lowrank

    w = _randn(n, k, seed=n + k)
    sv = torch.linalg.svdvals(w)
    monkeypatch.setattr(lowrank, "ROW_BLOCK", 64)  # several blocks
    for r in (1, 17, 60):
        monkeypatch.setattr(lowrank, "LARGE_SVD_BYTES", 1 << 40)
        u0, v0 = svd_factors(w, r)
        monkeypatch.setattr(lowrank, "LARGE_SVD_BYTES", 0)
        u, v = svd_factors(w, r)
        assert u.shape == (n, r) and v.shape == (r, k) and u.dtype == torch.float64
        torch.testing.assert_close(u @ v, u0 @ v0, rtol=0, atol=1e-9 * sv[0].item())
        assert torch.isclose((w - u @ v).pow(2).sum(), sv[r:].pow(2).sum(), rtol=1e-8)
        assert torch.isclose(u.pow(2).sum(), v.pow(2).sum(), rtol=1e-8)  # the √Σ split
        # factor_error by blocks of rows is the whole-matrix formula.
        assert factor_error(w, u, v) == pytest.approx(((w - u @ v).norm() / w.norm()).item(), rel=1e-10)
        g = _randn(k, k, seed=3)
        g = g @ g.t()
        e = w - u @ v
        expected = (((e @ g) * e).sum() / ((w @ g) * w).sum()).sqrt().item()
        assert factor_error(w, u, v, g) == pytest.approx(expected, rel=1e-10)
