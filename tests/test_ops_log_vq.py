"""Log quantization and vector quantization ops: references, fake kernels, error properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memsave.memory.track import measure_peak
from memsave.ops import (
    choose_logparams,
    choose_logparams_mse,
    dequantize_log,
    dequantize_vq,
    kmeans_codebook,
    linear_log,
    linear_vq,
    log_bits_per_weight,
    pack_bits,
    packed_length,
    quantize_log,
    quantize_vq,
    quantize_weight_log,
    quantize_weight_vq,
    unpack_bits,
    vq_bits_per_weight,
)
from memsave.ops import log as log_ops
from memsave.ops import vq as vq_ops

memsave_ops = torch.ops.memsave


def _randn(*shape, seed=0, scale=0.02):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _non_increasing(history: list[float], w: torch.Tensor) -> bool:
    """Up to fp32 rounding: relative 1e-6, absolute 1e-7 of the mean squared weight."""
    slack = 1e-7 * float(w.float().pow(2).mean())
    return all(b <= a * (1 + 1e-6) + slack for a, b in zip(history, history[1:]))


def _per_weight(p: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """(N, G) per-group parameter → (N, K) per weight."""
    return p.float().repeat_interleave(group_size, dim=1)[:, :k]


# ---------------------------------------------------------------------------------------------
# Log quantization
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("n,k,group_size", [(1, 1, 1), (1, 1, 32), (3, 50, 16), (5, 64, 64), (4, 37, 37), (2, 70, 32)])
def test_log_round_trip_structure(bits, n, k, group_size):
    w = _randn(n, k, seed=bits)
    log_zmin, step = choose_logparams(w, bits, group_size)
    groups = (k + group_size - 1) // group_size
    assert log_zmin.shape == step.shape == (n, groups)
    assert log_zmin.dtype == step.dtype == torch.float16
    assert (step > 0).all()
    packed = quantize_log(w, log_zmin, step, bits, group_size)
    assert packed.dtype == torch.uint8 and packed.shape == (n, packed_length(groups * group_size, bits))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        dq = dequantize_log(packed, log_zmin, step, bits, group_size, k, dtype)
        assert dq.shape == (n, k) and dq.dtype == dtype and dq.is_contiguous()
        assert torch.isfinite(dq).all()


def test_log_codes_layout_sign_bit_on_top_and_zero_code():
    # Grid 1, 2, 4, …, 64 (bits 4: 7 levels); hand-checked codes.
    log_zmin = torch.zeros(1, 1, dtype=torch.float16)
    step = torch.full((1, 1), math.log(2), dtype=torch.float16)
    w = torch.tensor([[0.0, 0.49, 0.51, 0.7, 1.0, 1.5, -3.0, 64.0, 1e9, -0.3]])
    codes = unpack_bits(quantize_log(w, log_zmin, step, 4, 10), 4, 10)
    #                  0   flush  ↑1  ↑1   1   2   −4   64   top  flush(−)
    assert codes.tolist() == [[0, 0, 1, 1, 1, 2, 8 | 3, 7, 7, 0]]
    dq = dequantize_log(pack_bits(codes, 4), log_zmin, step, 4, 10, 10, torch.float32)
    s = float(step)
    expected = torch.tensor([[0, 0, 1, 1, 1, math.exp(s), -math.exp(2 * s), math.exp(6 * s), math.exp(6 * s), 0]])
    torch.testing.assert_close(dq, expected)
    assert not torch.signbit(dq[dq == 0]).any()  # zeros are +0


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_log_keeps_signs_and_zeros(bits):
    w = _randn(16, 96, seed=1)
    w[w.abs() < 0.01] = 0  # exact zeros scattered about (about a third)
    w[3] = 0  # an all-zero row
    w[5, 32:64] = 0  # an all-zero group
    packed, log_zmin, step = quantize_weight_log(w, bits, 32)
    dq = dequantize_log(packed, log_zmin, step, bits, 32, 96, torch.float32)
    assert (dq[w == 0] == 0).all()
    nonzero = dq != 0
    assert torch.equal(torch.sign(dq[nonzero]), torch.sign(w[nonzero]))
    # The full nonzero range: no nonzero weight flushes to zero (with 3 bits or more; the
    # one level of 2 bits sits at the range's geometric mean, and half of it flushes).
    if bits > 2:
        assert torch.equal(nonzero, w != 0)
    # MSE-chosen ranges may flush small weights, never flip a sign.
    packed, log_zmin, step = quantize_weight_log(w, bits, 32, mse=True)
    dq = dequantize_log(packed, log_zmin, step, bits, 32, 96, torch.float32)
    assert (dq[w == 0] == 0).all()
    assert (torch.sign(dq) * torch.sign(w) >= 0).all()


@pytest.mark.parametrize("bits", [3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("group_size", [32, 100])
@pytest.mark.parametrize("mse", [False, True])
def test_log_error_is_at_most_half_a_step_in_log_space(bits, group_size, mse):
    w = _randn(24, 200, seed=bits)  # 200: last group padded for 32 and 128
    packed, log_zmin, step = quantize_weight_log(w, bits, group_size, mse=mse)
    dq = dequantize_log(packed, log_zmin, step, bits, group_size, 200, torch.float32)
    lz, s = _per_weight(log_zmin, group_size, 200), _per_weight(step, group_size, 200)
    top = lz + (log_ops.levels(bits) - 1) * s
    la = w.abs().log()
    in_range = (la >= lz) & (la <= top + 1e-5)  # fp32 rounding of lz + (L − 1)·s
    if not mse:  # the full range covers every nonzero weight
        assert in_range.all()
    assert in_range.float().mean() > 0.25
    err = (dq.abs().log() - la).abs()
    assert (err[in_range] <= s[in_range] / 2 + 1e-5).all()
    # Beyond the top level: clamped to it; below the smallest level: that level or zero.
    above, below = la > top + 1e-5, la < lz
    assert torch.allclose(dq.abs()[above], top[above].exp())
    assert ((dq.abs()[below] == 0) | torch.isclose(dq.abs()[below], lz[below].exp())).all()


def test_log_two_bits_is_ternary():
    w = _randn(8, 64, seed=2)
    for mse in (False, True):
        packed, log_zmin, step = quantize_weight_log(w, 2, 16, mse=mse)
        dq = dequantize_log(packed, log_zmin, step, 2, 16, 64, torch.float32)
        level = _per_weight(log_zmin, 16, 64).exp()
        assert ((dq == 0) | torch.isclose(dq.abs(), level)).all()


def test_log_more_bits_lower_error():
    w = _randn(64, 256, seed=3)

    def mse(bits, use_mse):
        packed, log_zmin, step = quantize_weight_log(w, bits, 64, mse=use_mse)
        return float((dequantize_log(packed, log_zmin, step, bits, 64, 256, torch.float32) - w).pow(2).mean())

    searched = [mse(b, True) for b in range(2, 9)]
    assert all(a > b for a, b in zip(searched, searched[1:])), searched
    # The full nonzero range wastes 3 bits' few levels on tiny weights; from 3 bits on it is monotone too.
    full = [mse(b, False) for b in range(3, 9)]
    assert all(a > b for a, b in zip(full, full[1:])), full
    assert all(m <= f for m, f in zip(searched[1:], full))


def test_log_mse_params_never_worse_per_group():
    w = _randn(32, 256, seed=4)
    w[:, ::7] *= 20  # outliers
    for bits in (3, 4):
        errs = []
        for choose in (choose_logparams, choose_logparams_mse):
            lz, s = choose(w, bits, 64)
            dq = dequantize_log(quantize_log(w, lz, s, bits, 64), lz, s, bits, 64, 256, torch.float32)
            errs.append((dq - w).pow(2).reshape(32, 4, 64).sum(-1))
        assert (errs[1] <= errs[0] * (1 + 1e-5)).all()


@settings(max_examples=40, deadline=None)
@given(
    bits=st.integers(3, 8),
    n=st.integers(1, 4),
    k=st.integers(1, 70),
    group_size=st.integers(1, 80),
    seed=st.integers(0, 10_000),
    zero_frac=st.sampled_from([0.0, 0.3, 1.0]),
)
def test_log_dequantized_weights_requantize_to_the_same_codes(bits, n, k, group_size, seed, zero_frac):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 10
    w[torch.rand(n, k, generator=g) < zero_frac] = 0
    log_zmin, step = choose_logparams(w, bits, group_size)
    packed = quantize_log(w, log_zmin, step, bits, group_size)
    dq = dequantize_log(packed, log_zmin, step, bits, group_size, k, torch.float32)
    assert torch.equal(torch.sign(dq), torch.sign(w))  # full range: every sign, every zero kept
    assert torch.equal(quantize_log(dq, log_zmin, step, bits, group_size), packed)


def test_choosing_parameters_leaves_the_weight_alone():
    w = _randn(16, 64, seed=17)  # fp32, K a multiple of the group and of dim: the helpers see views of w
    original = w.clone()
    choose_logparams(w, 4, 32)
    choose_logparams_mse(w, 4, 32)
    quantize_weight_log(w, 3, 64, mse=True)
    kmeans_codebook(w, 4, 16, iters=3)
    quantize_weight_vq(w, 2, 16, iters=3)
    assert torch.equal(w, original)


def test_log_bad_parameters_are_named():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bits must be one of 2, 3, 4, 5, 6, 7, 8, got 1"):
        choose_logparams(w, 1, 8)
    with pytest.raises(ValueError, match="group_size must be positive"):
        choose_logparams(w, 4, 0)


@pytest.mark.parametrize("bits,group_size,dtype,bias", [(4, 16, torch.float32, True), (3, 7, torch.float16, False)])
def test_log_ops_pass_opcheck(bits, group_size, dtype, bias):
    w = _randn(8, 40, seed=5)  # 40: a padded last group for 16 and 7
    log_zmin, step = choose_logparams(w, bits, group_size)
    torch.library.opcheck(memsave_ops.quantize_log.default, (w, log_zmin, step, bits, group_size))
    packed = quantize_log(w, log_zmin, step, bits, group_size)
    torch.library.opcheck(memsave_ops.dequantize_log.default, (packed, log_zmin, step, bits, group_size, 40, dtype))
    x = torch.randn(3, 40)
    bias = torch.randn(8) if bias else None
    torch.library.opcheck(memsave_ops.linear_log.default, (x, packed, log_zmin, step, bias, bits, group_size, 40))
    w_dq = dequantize_log(packed, log_zmin, step, bits, group_size, 40, torch.float32)
    torch.testing.assert_close(
        linear_log(x, packed, log_zmin, step, bias, bits, group_size, 40), torch.nn.functional.linear(x, w_dq, bias)
    )


@pytest.mark.parametrize("n,k,bits,group_size", [(64, 200, 4, 64), (7, 33, 3, 33), (16, 128, 8, 128), (1, 1, 2, 1)])
def test_log_bits_per_weight_counts_the_stored_bytes(n, k, bits, group_size):
    packed, log_zmin, step = quantize_weight_log(_randn(n, k), bits, group_size)
    stored = sum(t.numel() * t.element_size() for t in (packed, log_zmin, step))
    assert log_bits_per_weight(n, k, bits, group_size) == stored * 8 / (n * k)
    assert log_bits_per_weight(4096, 4096, 4, 128) == 4.25


# ---------------------------------------------------------------------------------------------
# Vector quantization
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n,k,dim,c",
    [(1, 1, 2, 16), (1, 7, 4, 4), (5, 33, 2, 16), (8, 64, 4, 256), (3, 10, 1, 8), (6, 50, 3, 32), (2, 9, 4, 3)],
)
def test_vq_round_trip_structure(n, k, dim, c):
    w = _randn(n, k, seed=n * k)
    codebook, indices = kmeans_codebook(w, dim, c, iters=5)
    v = (k + dim - 1) // dim
    bits = vq_ops.index_bits_for(c)
    assert codebook.shape == (c, dim) and codebook.dtype == torch.float16
    assert torch.isfinite(codebook).all()
    assert indices.shape == (n, v) and indices.dtype == torch.uint8 and int(indices.max()) < c
    packed = quantize_vq(w, codebook)
    assert packed.dtype == torch.uint8 and packed.shape == (n, packed_length(v, bits))
    assert torch.equal(packed, pack_bits(indices, bits))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        dq = dequantize_vq(packed, codebook, bits, dim, k, dtype)
        assert dq.shape == (n, k) and dq.dtype == dtype and dq.is_contiguous()


@pytest.mark.parametrize("dim,c", [(2, 16), (4, 64), (1, 8)])
def test_vq_indices_are_the_nearest_centroids(dim, c):
    w = _randn(12, 30, seed=7)  # 30: a padded last vector for dim 4
    codebook, indices = kmeans_codebook(w, dim, c, iters=10)
    vectors = torch.nn.functional.pad(w, (0, (-30) % dim)).reshape(-1, dim)
    dist = (vectors[:, None, :] - codebook.float()[None]).pow(2).sum(-1)  # brute force (M, C)
    chosen = dist.gather(1, indices.reshape(-1, 1).long()).squeeze(1)
    # ‖c‖² − 2·x·c in fp32 may break near-ties differently: within rounding of ‖x‖², ‖c‖².
    slack = 1e-6 * (vectors.pow(2).sum(1) + codebook.float().pow(2).sum(1).max())
    assert (chosen <= dist.min(1).values + slack).all()
    # A codebook from elsewhere: quantize_vq picks the nearest of those too.
    other = torch.randn(c, dim, generator=torch.Generator().manual_seed(8)).half() * 0.02
    idx = unpack_bits(quantize_vq(w, other), vq_ops.index_bits_for(c), vectors.shape[0] // 12)
    dist = (vectors[:, None, :] - other.float()[None]).pow(2).sum(-1)
    chosen = dist.gather(1, idx.reshape(-1, 1).long()).squeeze(1)
    assert (chosen <= dist.min(1).values + slack).all()


@pytest.mark.parametrize("dim,c,max_points", [(2, 16, 256), (4, 256, 256), (2, 64, 8)])
def test_kmeans_never_increases_the_training_mse(dim, c, max_points):
    w = _randn(64, 128, seed=9)
    history: list[float] = []
    kmeans_codebook(w, dim, c, iters=25, max_points_per_centroid=max_points, history=history)
    assert 2 <= len(history) <= 25
    assert _non_increasing(history, w), history
    assert history[-1] < history[0]


def test_kmeans_reseeds_empty_clusters_and_recovers_exact_clusters():
    # 6 distinct vectors (fp16-exact), repeated: k-means++ picks duplicates once the
    # distances are 0, those clusters are empty and get re-seeded; the result is exact.
    points = torch.tensor([[0.5, -1.0], [0.25, 0.25], [-2.0, 1.0], [1.0, 1.0], [0.0, 0.0], [-0.5, -0.75]])
    choice = torch.randint(0, 6, (40, 16), generator=torch.Generator().manual_seed(10))
    w = points[choice].reshape(40, 32)
    history: list[float] = []
    codebook, indices = kmeans_codebook(w, 2, 8, iters=25, history=history)
    assert _non_increasing(history, w), history
    dq = dequantize_vq(pack_bits(indices, 3), codebook, 3, 2, 32, torch.float32)
    assert torch.equal(dq, w)
    # Fewer vectors than centroids: still C finite centroids, and an exact result.
    codebook, indices = kmeans_codebook(points[:3].reshape(1, 6), 2, 16)
    assert codebook.shape == (16, 2) and torch.isfinite(codebook).all()
    dq = dequantize_vq(pack_bits(indices, 4), codebook, 4, 2, 6, torch.float32)
    assert torch.equal(dq, points[:3].reshape(1, 6))


def test_vq_more_centroids_lower_error():
    w = _randn(32, 128, seed=11)
    errors = []
    for c in (2, 4, 16, 64, 256):
        packed, codebook = quantize_weight_vq(w, 2, c)
        dq = dequantize_vq(packed, codebook, vq_ops.index_bits_for(c), 2, 128, torch.float32)
        errors.append(float((dq - w).pow(2).mean()))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors


def test_kmeans_is_deterministic_for_a_seed():
    w = _randn(32, 64, seed=12)
    a = kmeans_codebook(w, 4, 32, seed=3, max_points_per_centroid=8)  # sampled training set
    b = kmeans_codebook(w, 4, 32, seed=3, max_points_per_centroid=8)
    c = kmeans_codebook(w, 4, 32, seed=4, max_points_per_centroid=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_vq_dequantize_is_a_codebook_gather(dtype):
    w = _randn(9, 23, seed=13)
    codebook, indices = kmeans_codebook(w, 4, 16, iters=5)
    dq = dequantize_vq(pack_bits(indices, 4), codebook, 4, 4, 23, dtype)
    expected = codebook.to(dtype)[indices.long()].reshape(9, 24)[:, :23]
    assert torch.equal(dq, expected)


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 4),
    k=st.integers(1, 40),
    dim=st.integers(1, 5),
    c=st.integers(1, 256),
    seed=st.integers(0, 10_000),
)
def test_vq_any_shape_round_trips(n, k, dim, c, seed):
    w = _randn(n, k, seed=seed)
    history: list[float] = []
    codebook, indices = kmeans_codebook(w, dim, c, iters=4, seed=seed, max_points_per_centroid=2, history=history)
    assert _non_increasing(history, w), history
    bits = vq_ops.index_bits_for(c)
    packed = quantize_vq(w, codebook)
    assert torch.equal(unpack_bits(packed, bits, indices.shape[1]), indices)
    dq = dequantize_vq(packed, codebook, bits, dim, k, torch.float32)
    assert dq.shape == (n, k)
    assert torch.equal(dq, codebook.float()[indices.long()].reshape(n, -1)[:, :k])


def test_vq_bad_parameters_are_named():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="n_centroids must be in 1..256"):
        kmeans_codebook(w, 2, 257)
    with pytest.raises(ValueError, match="dim must be positive"):
        kmeans_codebook(w, 0, 16)
    with pytest.raises(ValueError, match=r"expected \(C, 4\)"):
        dequantize_vq(torch.zeros(4, 4, dtype=torch.uint8), torch.zeros(16, 2, dtype=torch.float16), 4, 4, 8, torch.float32)


@pytest.mark.parametrize("dim,c,dtype,bias", [(4, 256, torch.float32, True), (3, 5, torch.float16, False)])
def test_vq_ops_pass_opcheck(dim, c, dtype, bias):
    w = _randn(8, 40, seed=14)  # 40: a padded last vector for dim 3
    codebook, _ = kmeans_codebook(w, dim, c, iters=3)
    bits = vq_ops.index_bits_for(c)
    torch.library.opcheck(memsave_ops.quantize_vq.default, (w, codebook))
    packed = quantize_vq(w, codebook)
    torch.library.opcheck(memsave_ops.dequantize_vq.default, (packed, codebook, bits, dim, 40, dtype))
    x = torch.randn(3, 40)
    bias = torch.randn(8) if bias else None
    torch.library.opcheck(memsave_ops.linear_vq.default, (x, packed, codebook, bias, bits, dim, 40))
    w_dq = dequantize_vq(packed, codebook, bits, dim, 40, torch.float32)
    torch.testing.assert_close(
        linear_vq(x, packed, codebook, bias, bits, dim, 40), torch.nn.functional.linear(x, w_dq, bias)
    )


@pytest.mark.parametrize("n,k,dim,c", [(64, 128, 4, 256), (7, 33, 2, 16), (16, 50, 3, 5), (1, 1, 2, 2)])
def test_vq_bits_per_weight_counts_the_stored_bytes(n, k, dim, c):
    packed, codebook = quantize_weight_vq(_randn(n, k), dim, c, iters=2)
    stored = packed.numel() * packed.element_size() + codebook.numel() * codebook.element_size()
    assert vq_bits_per_weight(n, k, dim, c) == stored * 8 / (n * k)
    # The configurations, on a 4096×4096 weight.
    assert 2.0 < vq_bits_per_weight(4096, 4096, 4, 256) < 2.001
    assert 4.0 < vq_bits_per_weight(4096, 4096, 2, 256) < 4.001
    assert 2.0 < vq_bits_per_weight(4096, 4096, 2, 16) < 2.0001


# ---------------------------------------------------------------------------------------------
# Memory: chunked references, and the workspace the estimator is told about
# ---------------------------------------------------------------------------------------------


def test_kmeans_temporaries_stay_chunked():
    w = _randn(256, 2048, seed=15)  # 2 MiB; 131,072 vectors of 4, a 16,384-vector training sample
    _, stats = measure_peak(kmeans_codebook, w, 4, 64, iters=3)
    # A distance chunk (4 MiB) and its argmin, the training sample, the uint8 indices: not the
    # 131,072 × 64 distance matrix (32 MiB).
    assert stats.peak_bytes < 4 * vq_ops.CHUNK_ELEMS + 4 * 2**20


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7, 8])
def test_log_dequantize_workspace_bounds_the_measured_temporaries(bits):
    n, k, group = 256, 2048, 128  # two blocks of rows
    packed, log_zmin, step = quantize_weight_log(_randn(n, k), bits, group)
    for dtype in (torch.float32, torch.bfloat16):
        out, stats = measure_peak(dequantize_log, packed, log_zmin, step, bits, group, k, dtype)
        temporaries = stats.peak_bytes - out.numel() * out.element_size()
        estimate = log_ops.dequantize_workspace(n, k, group, bits)
        assert temporaries <= estimate <= 1.5 * temporaries + 2**16, (temporaries, estimate)


@pytest.mark.parametrize("dim,c", [(4, 256), (2, 16), (1, 8), (3, 32)])
def test_vq_dequantize_workspace_bounds_the_measured_temporaries(dim, c):
    n, k = 256, 2048
    w = _randn(n, k)
    codebook, _ = kmeans_codebook(w[:4], dim, c, iters=1)
    packed, bits = quantize_vq(w, codebook), vq_ops.index_bits_for(c)
    for dtype in (torch.float32, torch.float16):
        out, stats = measure_peak(dequantize_vq, packed, codebook, bits, dim, k, dtype)
        temporaries = stats.peak_bytes - out.numel() * out.element_size()
        estimate = vq_ops.dequantize_workspace(n, k, dim, bits, dtype)
        assert temporaries <= estimate <= 1.5 * temporaries + 2**16, (temporaries, estimate)


# ---------------------------------------------------------------------------------------------
# Tracing through torch.compile
# ---------------------------------------------------------------------------------------------


def _log_vq_matmul(packed_log, log_zmin, step, packed_vq, codebook, x):
    w1 = memsave_ops.dequantize_log(packed_log, log_zmin, step, 4, 32, 96, torch.float32)
    w2 = memsave_ops.dequantize_vq(packed_vq, codebook, 4, 2, 96, torch.float32)
    return x @ w1.t() + x @ w2.t()


@pytest.mark.parametrize("codegen", ["fx", "inductor"])
def test_log_and_vq_ops_trace_through_torch_compile(codegen):
    import memsave

    w, x = _randn(16, 96, seed=16), torch.randn(5, 96)
    packed_log, log_zmin, step = quantize_weight_log(w, 4, 32)
    packed_vq, codebook = quantize_weight_vq(w, 2, 16, iters=3)
    args = (packed_log, log_zmin, step, packed_vq, codebook, x)
    expected = _log_vq_matmul(*args)
    compiled = torch.compile(_log_vq_matmul, backend="memsave", options={"codegen": codegen}, fullgraph=True)
    with memsave.collect() as reports:
        torch.testing.assert_close(compiled(*args), expected)
    (report,) = reports
    assert report.records
