"""Low-rank factorization of linear weights, W (N, K) ≈ U (N, r) · V (r, K): the numerical core
of the factorize pass.

A rank-r factorization stores r·(N + K) numbers instead of N·K, so it only saves memory below
`max_useful_rank` (about N·K / (N + K), half the smaller side for a square matrix). Two ways to
choose the factors:

    u, v = svd_factors(w, rank)                  # best in weight space: min ‖W − UV‖_F
    u, v = whitened_svd_factors(w, gram, rank)   # best in output space: min ‖(W − UV)·Xᵀ‖_F

(each the truncation of one SVD, `svd_decomposition` / `whitened_decomposition`, which can be
kept to truncate at several ranks), and one way to choose ranks for a whole model under a
parameter budget:

    spectra = {name: (n, k, spectrum(w, gram)) for name, (w, gram) in layers.items()}
    ranks = allocate_ranks(spectra, ratio=0.5)   # Σ cost ≤ 0.5 · Σ N·K; full rank = keep dense

Everything is computed in float64 (SVD and Cholesky of fp32 data in fp32 lose digits that
matter at these sizes). Tensors come back in float32, or in float64 when `w` is float64 (so
exact identities can be checked), on `w`'s device.
"""

from __future__ import annotations

import heapq
import math
from fractions import Fraction

import torch

# ---------------------------------------------------------------------------------------------
# Ranks and budgets
# ---------------------------------------------------------------------------------------------


def max_useful_rank(out_features: int, in_features: int) -> int:
    """Largest r with r·(N+K) < N·K (factorizing at a higher rank stores more than dense).

    0 when even rank 1 does not save anything (N = 1 or K = 1, or N = K = 2).
    """
    n, k = _check_shape(out_features, in_features)
    return (n * k - 1) // (n + k)


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Largest r >= 1 with r·(N+K) <= ratio·N·K, or 0 when even r = 1 exceeds it.

    ratio in (0, 1) is read as the decimal it prints as (0.3 is 3/10 exactly), so boundary
    cases come out as written: rank_for_ratio(20, 20, 0.3) == 3, since 3·40 = 0.3·400.
    """
    n, k = _check_shape(out_features, in_features)
    return _parameter_budget(ratio, n * k, "rank_for_ratio") // (n + k)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose top-r singular values hold >= `energy` (in (0, 1]) of Σσ².

    0 for an all-zero spectrum (there is nothing to keep).
    """
    if not 0 < energy <= 1:
        raise ValueError(f"rank_for_energy: energy must be in (0, 1], got {energy}")
    power = _sorted_power(singular_values, "rank_for_energy")  # (L,) σ² descending
    kept = torch.cumsum(power, 0)  # (L,) energy of the top r = 1..L
    total = kept[-1]  # the sum kept ends with, so energy 1 is reached at rank L at the latest
    if total == 0:
        return 0
    return int(torch.searchsorted(kept, energy * total).item()) + 1  # first r with kept >= energy·total


def _check_shape(out_features: int, in_features: int) -> tuple[int, int]:
    if out_features < 1 or in_features < 1:
        raise ValueError(f"lowrank: a weight needs N >= 1 and K >= 1, got N={out_features}, K={in_features}")
    return int(out_features), int(in_features)


def _parameter_budget(ratio: float, dense: int, who: str) -> int:
    """floor(ratio · dense) exactly, with ratio read as the decimal it prints as."""
    _check_ratio(ratio, who)
    return math.floor(Fraction(str(float(ratio))) * dense)


def _check_ratio(ratio: float, who: str) -> None:
    if not 0 < ratio < 1:
        raise ValueError(f"{who}: ratio must be in (0, 1) (the fraction of dense parameters to keep), got {ratio}")


def _sorted_power(singular_values: torch.Tensor, who: str) -> torch.Tensor:
    """(L,) singular values → (L,) σ² in float64 on the CPU, largest first."""
    sv = singular_values.detach()
    if sv.dim() != 1 or sv.numel() == 0:
        raise ValueError(f"{who}: singular values must be a non-empty 1-D tensor, got shape {tuple(sv.shape)}")
    sv = sv.double().cpu()
    if not torch.isfinite(sv).all() or (sv < 0).any():
        raise ValueError(f"{who}: singular values must be finite and non-negative")
    return sv.sort(descending=True).values.pow(2)


# ---------------------------------------------------------------------------------------------
# Factors
# ---------------------------------------------------------------------------------------------


def svd_factors(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated SVD: U (N, r) = U_r·sqrt(Σ_r), V (r, K) = sqrt(Σ_r)·V_rᵀ.

    U @ V is the best rank-r approximation of W in Frobenius norm (Eckart–Young): its squared
    error is the sum of the discarded σ². The √Σ split gives both factors the same scale.
    """
    _check_rank(w, rank, "svd_factors")
    return svd_decomposition(w).factors(rank)


def whitened_svd_factors(
    w: torch.Tensor, gram: torch.Tensor, rank: int, damp: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Activation-aware truncated SVD (SVD-LLM's truncation-aware whitening, Wang et al. 2024).

    With S the Cholesky factor of the damped input second moment (see Note [Whitening]),
    decompose W·S = UΣVᵀ, keep r, and return U_r·sqrt(Σ_r) (N, r) and sqrt(Σ_r)·V_rᵀ·S⁻¹ (r, K).
    This minimizes the output error ‖(W − UV)·Xᵀ‖_F over the calibration inputs X (for the
    damped second moment), not the weight error. gram (K, K) is ActivationStats.gram.
    """
    _check_rank(w, rank, "whitened_svd_factors")
    return whitened_decomposition(w, gram, damp).factors(rank)


class Decomposition:
    """A weight's SVD (of W, or of W·S when whitened), kept to truncate at any rank: factors(r)
    is svd_factors / whitened_svd_factors at rank r, from one SVD for every rank (the budget
    planner scores several ranks of one weight)."""

    def __init__(self, w: torch.Tensor, left: torch.Tensor, sv: torch.Tensor, right_t: torch.Tensor,
                 whitening: torch.Tensor | None = None):
        self.shape, self.out = tuple(w.shape), _out_dtype(w)
        self.left, self.sv, self.right_t = left, sv, right_t  # (N, L) (L,) (L, K), float64
        self.whitening = whitening  # (K, K) lower-triangular S, or None

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_rank_of(self.shape, rank, "Decomposition.factors")
        root = self.sv[:rank].sqrt()  # (r,)
        u = self.left[:, :rank] * root  # (N, r)
        v = root.unsqueeze(1) * self.right_t[:rank]  # (r, K)
        if self.whitening is not None:
            # V = √Σ_r·V_rᵀ·S⁻¹, i.e. the solution of V·S = √Σ_r·V_rᵀ (triangular, no inverse formed).
            v = torch.linalg.solve_triangular(self.whitening, v, upper=False, left=False)
        return u.to(self.out), v.to(self.out)


def svd_decomposition(w: torch.Tensor) -> Decomposition:
    """The SVD svd_factors truncates (of a large weight: through its Gram matrix, _GramDecomposition)."""
    if w.dim() != 2:
        raise ValueError(f"svd_decomposition: weight must be 2-D (N, K), got shape {tuple(w.shape)}")
    if w.numel() * 8 > LARGE_SVD_BYTES:
        return _GramDecomposition(w)
    left, sv, right_t = torch.linalg.svd(w.detach().double(), full_matrices=False)  # (N, L) (L,) (L, K)
    return Decomposition(w, left, sv, right_t)


def whitened_decomposition(w: torch.Tensor, gram: torch.Tensor, damp: float = 1e-2) -> Decomposition:
    """The SVD of W·S that whitened_svd_factors truncates (Note [Whitening])."""
    if w.dim() != 2:
        raise ValueError(f"whitened_decomposition: weight must be 2-D (N, K), got shape {tuple(w.shape)}")
    s = _whitening(gram.to(w.device), w.shape[1], damp, "whitened_svd_factors")  # (K, K) lower triangular
    left, sv, right_t = torch.linalg.svd(w.detach().double() @ s, full_matrices=False)  # (N, L) (L,) (L, K)
    return Decomposition(w, left, sv, right_t, whitening=s)


# A float64 SVD of an (N, K) weight holds a float64 copy, U (N, min) and LAPACK's workspace:
# about 3x the weight's fp32 bytes twice over (a 5632 x 2048 weight: ~300 MiB at its peak, what
# kept factorizing a 210M model from streaming in half its fp32 size). Above this many float64
# bytes the factors come from the (min, min) Gram matrix instead (_GramDecomposition).
LARGE_SVD_BYTES = 16 << 20
ROW_BLOCK = 1024


class _GramDecomposition(Decomposition):
    """svd_factors through the eigen-decomposition of the smaller Gram matrix, built and used a
    block of rows at a time in float64: for N >= K, WᵀW = V Σ² Vᵀ, so V_r and σ_r come from a
    (K, K) eigh and U_r·√Σ_r = W V_r / √σ_r. The squared condition number costs accuracy only in
    singular values below ~1e-8 of the largest, far under what a truncation to `rank` keeps
    from an fp32 weight; memory: the (K, K) Gram and its eigenvectors beside the fp32 factors."""

    def __init__(self, w: torch.Tensor):
        weight = w.detach()
        self.transposed = weight.shape[0] < weight.shape[1]  # W = (Wᵀ)ᵀ: decompose Wᵀ, swap the roles
        self.weight = weight.t() if self.transposed else weight  # (n, k), n >= k
        self.shape, self.out = tuple(w.shape), _out_dtype(w)
        n, k = self.weight.shape
        gram = torch.zeros(k, k, dtype=torch.float64, device=weight.device)
        for i in range(0, n, ROW_BLOCK):
            rows = self.weight[i : i + ROW_BLOCK].double()
            gram.addmm_(rows.t(), rows)
        self.values, self.vectors = torch.linalg.eigh(gram)  # ascending
        del gram

    def factors(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_rank_of(self.shape, rank, "Decomposition.factors")
        n = self.weight.shape[0]
        top = torch.flip(self.values[-rank:], [0]).clamp_min(0)  # σ², largest first
        basis = torch.flip(self.vectors[:, -rank:], [1])  # (K, r): V_r
        sigma = top.sqrt()
        inverse_root = torch.where(sigma > 0, sigma.rsqrt(), torch.zeros_like(sigma))
        u = torch.empty(n, rank, dtype=self.out, device=self.weight.device)
        for i in range(0, n, ROW_BLOCK):
            u[i : i + ROW_BLOCK] = (self.weight[i : i + ROW_BLOCK].double() @ basis * inverse_root).to(self.out)  # U_r √Σ_r
        v = (sigma.sqrt().unsqueeze(1) * basis.t()).to(self.out)  # √Σ_r V_rᵀ
        if self.transposed:
            return v.t().contiguous(), u.t().contiguous()
        return u, v


# Note [Whitening]
# For inputs X (rows, K) with second moment G = XᵀX / rows, the output error of an approximation
# W' is ‖(W − W')·Xᵀ‖²_F = rows · tr(E G Eᵀ), E = W − W'. If G = S·Sᵀ (Cholesky, S lower
# triangular), tr(E G Eᵀ) = ‖E·S‖²_F = ‖W·S − W'·S‖²_F. So the best rank-r W' in output space is
# (best rank-r approximation of W·S)·S⁻¹, and Eckart–Young applies to W·S: its discarded σ² are
# exactly the output error. Before Cholesky, G gets damp·mean(diag G) on its diagonal (as in GPTQ),
# which makes it positive definite even with dead or collinear input channels and pulls the
# solution slightly towards plain SVD; for G = c·I the result *is* plain SVD. A zero G (no
# calibration signal at all) is replaced by I: every factorization has zero output error then,
# and plain SVD is the sensible tie-break.


def spectrum(w: torch.Tensor, gram: torch.Tensor | None = None, damp: float = 1e-2) -> torch.Tensor:
    """Singular values of W (gram None) or of W·S (whitened, Note [Whitening]), largest first.

    (min(N, K),): what rank_for_energy and allocate_ranks look at. With a gram, σ² measure
    output error: dropping σ_j costs σ_j² of tr(W G Wᵀ) (G damped).
    """
    matrix = w.detach().double()
    if matrix.dim() != 2:
        raise ValueError(f"spectrum: weight must be 2-D (N, K), got shape {tuple(w.shape)}")
    if gram is not None:
        matrix = matrix @ _whitening(gram.to(w.device), w.shape[1], damp, "spectrum")
    return torch.linalg.svdvals(matrix).to(_out_dtype(w))


def factor_error(w: torch.Tensor, u: torch.Tensor, v: torch.Tensor, gram: torch.Tensor | None = None) -> float:
    """Relative error of W ≈ U·V: ‖W − UV‖_F / ‖W‖_F, or with gram (K, K) the output-space
    sqrt(tr(E G Eᵀ) / tr(W G Wᵀ)), E = W − UV (the undamped G: the error on the actual inputs).

    0 when W and UV are both zero, inf when only W is.
    """
    n, k = w.shape if w.dim() == 2 else (-1, -1)
    if u.dim() != 2 or v.dim() != 2 or n < 0 or u.shape[0] != n or v.shape[1] != k or u.shape[1] != v.shape[0]:
        raise ValueError(
            f"factor_error: need W (N, K), U (N, r), V (r, K), got {tuple(w.shape)}, {tuple(u.shape)}, {tuple(v.shape)}"
        )
    g = None if gram is None else _check_gram(gram, k, "factor_error").to(w.device)  # (K, K)
    vd = v.detach().double().to(w.device)
    num, den = output_error_sums(w, lambda rows: u[rows].detach().double().to(w.device) @ vd, g, torch.float64)
    num, den = max(num, 0.0), max(den, 0.0)
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return math.sqrt(num / den)


def output_error_sums(w: torch.Tensor, approx_rows, gram: torch.Tensor | None, dtype: torch.dtype) -> tuple[float, float]:
    """(tr(E G Eᵀ), tr(W G Wᵀ)) for E = Ŵ − W, or the squared Frobenius norms when `gram` is
    None, in `dtype`, a block of rows at a time (no (N, K) temporaries): `approx_rows(slice)`
    gives those rows of Ŵ. factor_error and the budget planner's output noise both read it."""
    g = None if gram is None else gram.to(dtype)
    num = den = 0.0
    for i in range(0, w.shape[0], ROW_BLOCK):
        rows = slice(i, i + ROW_BLOCK)
        exact = w[rows].detach().to(dtype)
        error = approx_rows(rows).to(dtype) - exact
        if g is None:
            num, den = num + error.pow(2).sum().item(), den + exact.pow(2).sum().item()
        else:
            # tr(E G Eᵀ) = Σ (E G) ∘ E; a PSD G makes both ≥ 0, up to rounding.
            num, den = num + ((error @ g) * error).sum().item(), den + ((exact @ g) * exact).sum().item()
    return num, den


def _check_rank(w: torch.Tensor, rank: int, who: str) -> None:
    if w.dim() != 2:
        raise ValueError(f"{who}: weight must be 2-D (N, K), got shape {tuple(w.shape)}")
    _check_rank_of(tuple(w.shape), rank, who)


def _check_rank_of(shape: tuple[int, int], rank: int, who: str) -> None:
    n, k = shape
    if not 1 <= rank <= min(n, k):
        raise ValueError(f"{who}: rank must be in 1..min(N, K) = {min(n, k)} for N={n}, K={k}, got rank={rank}")


def _check_gram(gram: torch.Tensor, k: int, who: str) -> torch.Tensor:
    if gram.shape != (k, k):
        raise ValueError(f"{who}: gram must be ({k}, {k}) for this weight, got {tuple(gram.shape)}")
    return gram.detach().double()


def _whitening(gram: torch.Tensor, k: int, damp: float, who: str) -> torch.Tensor:
    """(K, K) gram → (K, K) lower-triangular S with S·Sᵀ = gram + damp·mean(diag)·I."""
    if damp < 0:
        raise ValueError(f"{who}: damp must be >= 0, got {damp}")
    g = _check_gram(gram, k, who)  # (K, K)
    scale = torch.diagonal(g).mean()
    if scale == 0:
        return torch.eye(k, dtype=g.dtype, device=g.device)  # no signal: plain SVD (Note [Whitening])
    damped = g + damp * scale * torch.eye(k, dtype=g.dtype, device=g.device)
    s, info = torch.linalg.cholesky_ex(damped)
    if info.item() != 0:
        raise ValueError(f"{who}: gram + damp·mean(diag)·I is not positive definite with damp={damp}; use a larger one")
    return s


def _out_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------
# Allocation across layers
# ---------------------------------------------------------------------------------------------


def allocate_ranks(layers: dict[str, tuple[int, int, torch.Tensor]], ratio: float) -> dict[str, int]:
    """Per-layer ranks with Σ cost_i ≤ ratio · Σ N_i·K_i, minimizing Σ_i (discarded σ²)/(Σ σ²).

    layers: name → (N, K, singular values from `spectrum`, length min(N, K)). Each layer is
    either factorized at a rank r in 1..max_useful_rank (cost r·(N+K), error its relative
    discarded energy) or kept dense (cost N·K, error 0), returned as rank min(N, K), where
    r·(N+K) >= N·K, so the caller's "dense when r(N+K) >= N·K" rule keeps it dense. Rank 0 is
    never returned. A layer with max_useful_rank 0 is always dense.

    The algorithm (Note [Rank allocation]): start every layer at its cheapest option (rank 1,
    or dense when rank 1 saves nothing); then repeatedly make the move with the largest error
    reduction per parameter among all layers' two possible moves, "rank r → r+1" and "rank r →
    dense", skipping moves that no longer fit in the budget or reduce nothing, until none is
    left. Deterministic (ties go to the earlier layer in `layers`' order).

    ratio in (0, 1) (read as the decimal it prints as). ValueError when the cheapest option
    everywhere already exceeds the budget, naming the smallest achievable ratio.
    """
    _check_ratio(ratio, "allocate_ranks")
    plans = [_LayerPlan(name, n, k, sv) for name, (n, k, sv) in layers.items()]
    if not plans:
        return {}
    dense_total = sum(p.dense_cost for p in plans)
    budget = _parameter_budget(ratio, dense_total, "allocate_ranks")
    start = sum(p.cost() for p in plans)
    if start > budget:
        raise ValueError(
            f"allocate_ranks: ratio {ratio} is too small for these layers: the smallest achievable ratio is "
            f"{start / dense_total:.6g} (rank 1 everywhere, dense where rank 1 saves nothing: "
            f"{start} of {dense_total} parameters)"
        )
    left = _take_hull_prefix(plans, budget - start)
    _fill_greedily(plans, left)
    return {p.name: p.rank() for p in plans}


# Note [Rank allocation]
# Each layer has a menu of options: rank r = 1..R (R = max_useful_rank) at cost r·c (c = N + K)
# and relative error e(r) = Σ_{j>r} σ_j² / Σ_j σ_j², or dense at cost D = N·K, error 0. Picking
# one option per layer under a total cost is a multiple-choice knapsack. Its continuous relaxation
# (Sinha & Zoltners 1979) is solved exactly by walking each layer along the lower convex hull of
# its (cost, error) points and interleaving all layers' hull steps in order of decreasing slope
# (error reduction per parameter), which is what the greedy does while every move fits:
# - the rank points form a convex curve (σ sorted, so the gains σ_{r+1}² shrink with r);
# - from rank r, the steepest way down is either the next rank (slope σ_{r+1}²/(T·c)) or the
#   jump to dense (slope e(r)/(D − r·c)); any other rank point is a mix of unit steps, each no
#   steeper than the first. Taking the steeper of the two at each point is exactly the hull,
#   whose slopes then decrease, so layers are never asked to take a worse step before a better one.
# The dense jump often wins early: for a flat spectrum (all σ equal) it is steeper than any rank
# step, since min(N, K)·(N+K) >= N·K, so such a layer goes straight from rank 1 to dense when the
# budget reaches it. The integer problem differs only at the budget's edge: a move that does not
# fit is skipped and cheaper moves of other layers (or the layer's next rank, when its dense jump
# did not fit) are taken instead, until nothing fits. So when the budget ends exactly after a hull
# step the result is optimal (the relaxation's optimum is then integral), and otherwise its error
# exceeds the optimum by at most the error reduction of the first move that did not fit (the
# relaxation would take a fraction of it; the greedy takes everything before it, then more).
# Moves that reduce nothing (σ = 0 beyond a layer's true rank) are never taken, so the budget
# may be left partly unused.
#
# For speed (hundreds of layers × thousands of ranks) the part where every move fits is done at
# once: all layers' hull steps are sorted by slope (stable, so ties keep layer and step order)
# and the longest prefix that fits is taken. From there a heap runs the same greedy move by move
# on what is left (less than the first move that did not fit).


class _LayerPlan:
    """One layer's options and its current choice: rank `current` (1..R), or dense (None)."""

    def __init__(self, name: str, n: int, k: int, singular_values: torch.Tensor):
        self.name = name
        self.n, self.k = _check_shape(n, k)
        who = f"allocate_ranks[{name!r}]"
        power = _sorted_power(singular_values, who)  # (L,) σ², largest first
        if power.numel() != min(self.n, self.k):
            raise ValueError(f"{who}: expected min(N, K) = {min(self.n, self.k)} singular values, got {power.numel()}")
        total = power.sum()
        self.gain = power / total if total > 0 else power  # (L,) gain[r] = error reduction of rank r → r+1
        # discarded[r] = e(r) for r = 0..L, summed from the small end for accuracy.
        tail = torch.flip(torch.cumsum(torch.flip(self.gain, (0,)), 0), (0,))  # (L,)
        self.discarded = torch.cat([tail, tail.new_zeros(1)])  # (L + 1,)
        self.per_rank = self.n + self.k
        self.dense_cost = self.n * self.k
        self.max_rank = max_useful_rank(self.n, self.k)
        self.current: int | None = 1 if self.max_rank >= 1 else None
        self._dense_after = self.max_rank  # set by hull_steps

    def cost(self) -> int:
        return self.dense_cost if self.current is None else self.current * self.per_rank

    def rank(self) -> int:
        return min(self.n, self.k) if self.current is None else self.current

    def moves(self) -> list[tuple[float, int, int | None]]:
        """(slope, cost, new rank or None for dense) of each move from here that reduces the error;
        the rank move first (it wins ties: same slope, cheaper)."""
        r = self.current
        if r is None:
            return []
        found = []
        gain = self.gain[r].item() if r < self.max_rank else 0.0
        if gain > 0:
            found.append((gain / self.per_rank, self.per_rank, r + 1))
        discarded = self.discarded[r].item()
        if discarded > 0:
            jump = self.dense_cost - r * self.per_rank
            found.append((discarded / jump, jump, None))
        return found

    def hull_steps(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(S,) slopes and (S,) costs of the steepest moves (the first of `moves` on ties) taken one
        after the other from rank 1 (Note [Rank allocation]): rank steps while the next rank is at
        least as steep as the jump to dense, then that jump. Computed for all ranks at once."""
        if self.current is None:
            return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
        ranks = torch.arange(1, self.max_rank + 1)  # (R,)
        rank_slope = self.gain[ranks] / self.per_rank  # (R,) slope of r → r+1 (r = R has no such move)
        rank_slope[-1] = 0
        jump = self.dense_cost - ranks * self.per_rank  # (R,) > 0
        dense_slope = self.discarded[ranks] / jump  # (R,)
        stop = (rank_slope <= 0) | (rank_slope < dense_slope)  # (R,) true at r = R at least
        m = int(stop.int().argmax().item()) + 1  # the first rank whose steepest move is not a rank step
        self._dense_after = m  # hull step number m (1-based) is the jump to dense
        slopes, costs = rank_slope[: m - 1], torch.full((m - 1,), self.per_rank, dtype=torch.int64)
        if dense_slope[m - 1] > 0:
            slopes = torch.cat([slopes, dense_slope[m - 1 : m]])
            costs = torch.cat([costs, jump[m - 1 : m]])
        # Non-increasing in exact arithmetic; clip rounding so the global stable sort keeps this
        # layer's steps in order.
        return torch.cummin(slopes, 0).values, costs

    def advance(self, steps: int) -> None:
        """Take the first `steps` of hull_steps: rank steps, then the jump to dense."""
        if steps:
            self.current = 1 + steps if steps < self._dense_after else None


def _take_hull_prefix(plans: list[_LayerPlan], left: int) -> int:
    """Take the longest slope-ordered prefix of all hull steps that fits in `left`; returns what is left."""
    steps = [plan.hull_steps() for plan in plans]
    slopes = torch.cat([s for s, _ in steps])  # (S,) all layers' steps, layer by layer
    costs = torch.cat([c for _, c in steps])  # (S,)
    owners = torch.cat([torch.full((len(s),), i, dtype=torch.int64) for i, (s, _) in enumerate(steps)])  # (S,)
    order = torch.argsort(-slopes, stable=True)  # (S,) ties keep layer and step order
    spent = torch.cumsum(costs[order], 0)  # (S,)
    taken = int(torch.searchsorted(spent, torch.tensor(left), right=True).item())
    if taken == 0:
        return left
    counts = torch.bincount(owners[order[:taken]], minlength=len(plans))  # (layers,)
    for plan, count in zip(plans, counts.tolist()):
        plan.advance(count)
    return left - int(spent[taken - 1].item())


def _fill_greedily(plans: list[_LayerPlan], left: int) -> None:
    """The greedy, move by move: best slope first, skipping moves that do not fit in `left`."""
    heap = []

    def offer(index: int) -> None:
        plan = plans[index]
        for kind, (slope, cost, to) in enumerate(plan.moves()):
            if cost <= left:
                heapq.heappush(heap, (-slope, index, kind, plan.current, cost, to))

    for index in range(len(plans)):
        offer(index)
    while heap:
        _, index, _, source, cost, to = heapq.heappop(heap)
        plan = plans[index]
        if plan.current != source or cost > left:  # stale, or no longer fits (and never will)
            continue
        plan.current = to
        left -= cost
        offer(index)
