"""Sparse weight formats (memsave/ops/sparse.py): bitmask + values and N:M semi-structured.

Structure (exact round trips, bit layouts, byte counts) is asserted exactly; the linear ops
are compared with F.linear on the masked dense weight, in float64 with a bound scaled by
Σ|x|·|w| for the low-precision dtypes.
"""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from memsave.memory.estimate import WORKSPACE
from memsave.memory.track import measure_peak
from memsave.ops import (
    bitmask_bytes,
    nm_bytes,
    nm_from_dense,
    nm_keep_mask,
    pack_bitmask,
    pack_nm,
    packed_length,
    unpack_bitmask,
    unpack_bits,
    unpack_nm,
)
from memsave.ops import sparse as sparse_ops

memsave_ops = torch.ops.memsave
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
NM_PATTERNS = [(2, 4), (1, 4), (3, 4), (4, 8), (1, 8), (3, 8), (7, 8)]
# Allowed error relative to max Σ|x|·|w| (the scale of a dot product's rounding error).
RTOL = {F32: 1e-5, F16: 2e-3, BF16: 1.6e-2}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _random_keep(n, k, density, seed):
    return torch.rand(n, k, generator=_gen(seed)) < density


def _masked(w, keep):
    return torch.where(keep, w, torch.zeros_like(w))


# --------------------------------------------------------------------------- bitmask


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("n,k", [(1, 1), (3, 7), (4, 8), (5, 13), (6, 64), (2, 100)])
def test_bitmask_round_trip_is_exact(n, k, dtype):
    w = torch.randn(n, k, generator=_gen(k)).to(dtype)
    keep = _random_keep(n, k, 0.4, seed=n)
    keep[0] = True  # an all-kept row
    if n > 1:
        keep[1] = False  # a none-kept row
    values, mask = pack_bitmask(w, keep)
    assert values.dtype == dtype and values.shape == (int(keep.sum()),)
    assert torch.equal(values, w[keep])  # row-major order
    assert mask.dtype == torch.uint8 and mask.shape == (n, (k + 7) // 8)
    dense = unpack_bitmask(values, mask, k, dtype)
    assert dense.dtype == dtype and torch.equal(dense, _masked(w, keep))
    assert torch.equal(memsave_ops.densify_bitmask(values, mask, k, F32), _masked(w, keep).float())


def test_bitmask_bit_order_is_little_endian():
    keep = torch.zeros(2, 10, dtype=torch.bool)
    keep[0, 0] = keep[0, 9] = True  # bit 0 of byte 0, bit 1 of byte 1
    keep[1, 3] = keep[1, 7] = keep[1, 8] = True
    _, mask = pack_bitmask(torch.ones(2, 10), keep)
    assert mask.tolist() == [[0b00000001, 0b10], [0b10001000, 0b01]]


def test_bitmask_none_kept_at_all():
    values, mask = pack_bitmask(torch.randn(3, 20), torch.zeros(3, 20, dtype=torch.bool))
    assert values.shape == (0,) and not mask.any()
    assert torch.equal(unpack_bitmask(values, mask, 20, F32), torch.zeros(3, 20))


def test_bitmask_dense_in_blocks_of_rows(monkeypatch):
    monkeypatch.setattr(sparse_ops, "CHUNK_ELEMS", 64)  # blocks of 2 rows at K = 30
    w, keep = torch.randn(7, 30, generator=_gen(3)), _random_keep(7, 30, 0.5, seed=4)
    keep[2:4] = False  # a whole block without kept weights
    values, mask = pack_bitmask(w, keep)
    assert torch.equal(unpack_bitmask(values, mask, 30, F32), _masked(w, keep))
    assert torch.equal(unpack_bitmask(values, mask, 30, F16), _masked(w, keep).half())


def test_bitmask_errors_are_clear():
    w, keep = torch.randn(3, 20), _random_keep(3, 20, 0.5, seed=1)
    values, mask = pack_bitmask(w, keep)
    nnz = values.numel()
    with pytest.raises(ValueError, match=rf"the mask keeps {nnz} weights but {nnz - 1} values were given"):
        unpack_bitmask(values[:-1], mask, 20, F32)
    with pytest.raises(ValueError, match=rf"the mask keeps {nnz} weights but {nnz + 1} values were given"):
        unpack_bitmask(torch.cat([values, values[:1]]), mask, 20, F32)
    with pytest.raises(ValueError, match=rf"the mask keeps {nnz} weights but 0 values were given"):
        unpack_bitmask(values[:0], mask, 20, F32)
    with pytest.raises(ValueError, match=r"mask must be uint8 \(N, ceil\(K/8\)\) = \(N, 2\) for K=16"):
        unpack_bitmask(values, mask, 16, F32)
    with pytest.raises(ValueError, match=r"keep must be a bool tensor shaped like w"):
        pack_bitmask(w, keep.float())
    with pytest.raises(ValueError, match=r"w must be a 2-D float"):
        pack_bitmask(w.reshape(-1), keep.reshape(-1))


# --------------------------------------------------------------------------- N:M


def _brute_force_keep(scores, n, m):
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    for r in range(scores.shape[0]):
        for g in range(scores.shape[1] // m):
            group = [(-float(scores[r, g * m + i]), i) for i in range(m)]  # larger score, then lower index
            for _, i in sorted(group)[:n]:
                keep[r, g * m + i] = True
    return keep


@pytest.mark.parametrize("n,m", NM_PATTERNS)
def test_nm_keep_mask_keeps_the_top_n_of_every_group(n, m):
    scores = torch.randint(0, 4, (5, 3 * m), generator=_gen(n * m)).float()  # many ties
    keep = nm_keep_mask(scores, n, m)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    assert torch.equal(keep, _brute_force_keep(scores, n, m))
    assert (keep.reshape(5, 3, m).sum(-1) == n).all()


def test_nm_keep_mask_ties_go_to_the_lower_index():
    keep = nm_keep_mask(torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0, 2.0, 2.0, 2.0]]), 2, 4)
    assert keep.tolist() == [[True, True, False, False, False, True, True, False]]


@pytest.mark.parametrize("call", [
    lambda: nm_keep_mask(torch.randn(2, 10), 2, 4),
    lambda: pack_nm(torch.randn(2, 10), torch.ones(2, 10, dtype=torch.bool), 2, 4),
    lambda: unpack_nm(torch.randn(2, 5), torch.zeros(2, 2, dtype=torch.uint8), 2, 4, 10, F32),
    lambda: nm_bytes(2, 10, 2, 4, 2),
], ids=["keep_mask", "pack", "unpack", "bytes"])
def test_k_not_a_multiple_of_m_is_a_clear_error(call):
    with pytest.raises(ValueError, match=r"m=4 must divide K \(in_features\), got K=10"):
        call()


@pytest.mark.parametrize("n,m,message", [
    (1, 2, r"m must be one of \(4, 8\), got m=2"),
    (2, 16, r"m must be one of \(4, 8\), got m=16"),
    (4, 4, r"n must satisfy 1 <= n < m=4, got n=4"),
    (9, 8, r"n must satisfy 1 <= n < m=8, got n=9"),
    (0, 4, r"n must satisfy 1 <= n < m=4, got n=0"),
])
def test_unsupported_patterns_are_clear_errors(n, m, message):
    with pytest.raises(ValueError, match=message):
        nm_keep_mask(torch.randn(2, 32), n, m)
    with pytest.raises(ValueError, match=message):
        indices = torch.zeros(2, 4, dtype=torch.uint8)
        memsave_ops.linear_nm(torch.randn(1, 32), torch.randn(2, 16), indices, None, n, m, 32)


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("n,m", NM_PATTERNS)
def test_nm_round_trip_is_exact(n, m, dtype):
    rows, k = 5, 8 * m  # K/m·n stored values: not always a multiple of 8 codes
    w = torch.randn(rows, k, generator=_gen(m + n)).to(dtype)
    keep = nm_keep_mask(w.float().abs(), n, m)
    values, indices = pack_nm(w, keep, n, m)
    kc = k // m * n
    bits = sparse_ops.index_bits(m)
    assert values.dtype == dtype and values.shape == (rows, kc) and torch.equal(values, w[keep].reshape(rows, kc))
    assert indices.dtype == torch.uint8 and indices.shape == (rows, packed_length(kc, bits))
    expected_positions = torch.arange(k).remainder(m).expand(rows, k)[keep].reshape(rows, kc)
    assert torch.equal(unpack_bits(indices, bits, kc).long(), expected_positions)
    dense = unpack_nm(values, indices, n, m, k, dtype)
    assert dense.dtype == dtype and torch.equal(dense, _masked(w, keep))
    assert torch.equal(memsave_ops.densify_nm(values, indices, n, m, k, dtype), dense)


def test_nm_layout_of_a_2_4_row():
    # The docstring's example: [a 0 b 0 | 0 c 0 d] → values [a b c d], positions 0 2 1 3.
    w = torch.tensor([[1.0, 0, 2, 0, 0, 3, 0, 4]])
    values, indices = pack_nm(w, w != 0, 2, 4)
    assert values.tolist() == [[1, 2, 3, 4]]
    # 2-bit positions, little-endian: 0 | 2 << 2 | 1 << 4 | 3 << 6; the row is padded to 8 codes.
    assert indices.tolist() == [[0 | 2 << 2 | 1 << 4 | 3 << 6, 0]]


def test_nm_layout_of_a_3_bit_row():
    # 4:8 over 16 weights: 8 positions of 3 bits = one 24-bit little-endian chunk in 3 bytes.
    keep = torch.zeros(1, 16, dtype=torch.bool)
    keep[0, [1, 4, 6, 7, 8, 9, 10, 15]] = True
    _, indices = pack_nm(torch.randn(1, 16), keep, 4, 8)
    positions = [1, 4, 6, 7, 0, 1, 2, 7]
    word = sum(p << (3 * i) for i, p in enumerate(positions))
    assert indices.tolist() == [[word & 0xFF, word >> 8 & 0xFF, word >> 16]]


def test_nm_dense_in_blocks_of_rows(monkeypatch):
    monkeypatch.setattr(sparse_ops, "CHUNK_ELEMS", 40)  # blocks of 2 rows at K/m·n = 16
    w = torch.randn(7, 32, generator=_gen(5))
    keep = nm_keep_mask(w.abs(), 2, 4)
    values, indices = pack_nm(w, keep, 2, 4)
    assert torch.equal(unpack_nm(values, indices, 2, 4, 32, F32), _masked(w, keep))


def test_pack_nm_names_the_first_bad_group():
    keep = nm_keep_mask(torch.randn(3, 16, generator=_gen(0)).abs(), 2, 4)
    keep[1, 8:12] = torch.tensor([True, True, True, False])
    message = r"exactly n=2 weights in every group of m=4; row 1, group 2 \(columns 8..11\) keeps 3"
    with pytest.raises(ValueError, match=message):
        pack_nm(torch.randn(3, 16), keep, 2, 4)
    with pytest.raises(ValueError, match=r"keep must be a bool tensor shaped like w"):
        pack_nm(torch.randn(3, 16), keep[:, :8], 2, 4)


def test_unpack_nm_checks_the_stored_shapes():
    w = torch.randn(3, 16)
    values, indices = pack_nm(w, nm_keep_mask(w.abs(), 2, 4), 2, 4)
    with pytest.raises(ValueError, match=r"indices must be uint8 \(N, 2\) for 2:4 sparsity of K=16"):
        unpack_nm(values, indices[:, :1], 2, 4, 16, F32)
    with pytest.raises(ValueError, match=r"values must hold N·K/m·n = 3·8 kept weights, got \(3, 7\)"):
        unpack_nm(values[:, :7], indices, 2, 4, 16, F32)


def test_nm_from_dense_recovers_the_format():
    w = torch.randn(4, 32, generator=_gen(6))
    values, indices = pack_nm(w, nm_keep_mask(w.abs(), 2, 4), 2, 4)
    dense = unpack_nm(values, indices, 2, 4, 32, F32)
    dense[0, :4] = 0  # a group whose kept weights are zeros: any two positions do
    again = nm_from_dense(dense, 2, 4)
    assert torch.equal(unpack_nm(*again, 2, 4, 32, F32), dense)
    with pytest.raises(ValueError, match=r"not 2:4 sparse: row 0, group 0 \(columns 0..3\) has more than 2"):
        nm_from_dense(torch.ones(2, 8), 2, 4)


# --------------------------------------------------------------------------- the linear ops


def _bitmask_case(rows, k, dtype, seed=0):
    w = torch.randn(rows, k, generator=_gen(seed))
    keep = _random_keep(rows, k, 0.3, seed + 1)
    values, mask = pack_bitmask(w.to(dtype), keep)
    return (values, mask), _masked(w.to(dtype), keep)


def _nm_case(rows, k, dtype, n=2, m=4, seed=0):
    w = torch.randn(rows, k, generator=_gen(seed)).to(dtype)
    keep = nm_keep_mask(w.float().abs(), n, m)
    return pack_nm(w, keep, n, m), _masked(w, keep)


def _linear(fmt, x, parts, bias, k, n=2, m=4):
    if fmt == "bitmask":
        return memsave_ops.linear_bitmask(x, *parts, bias, k)
    return memsave_ops.linear_nm(x, *parts, bias, n, m, k)


@pytest.mark.parametrize("fmt", ["bitmask", "nm"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("x_shape", [(3,), (2, 5)], ids=["2d", "3d"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_linear_equals_f_linear_on_the_masked_weight(fmt, dtype, x_shape, with_bias):
    rows, k = 24, 40
    parts, dense = _bitmask_case(rows, k, dtype) if fmt == "bitmask" else _nm_case(rows, k, dtype)
    x = torch.randn(*x_shape, k, generator=_gen(7)).to(dtype)
    bias = torch.randn(rows, generator=_gen(8)).to(dtype) if with_bias else None
    y = _linear(fmt, x, parts, bias, k)
    assert y.dtype == dtype and y.shape == (*x_shape, rows)
    expected = torch.nn.functional.linear(x.double(), dense.double(), None if bias is None else bias.double())
    bound = (x.double().abs() @ dense.double().abs().T).max().item()
    assert (y.double() - expected).abs().max().item() <= RTOL[dtype] * bound


def test_linear_wants_values_in_the_activation_dtype():
    (values, indices), _ = _nm_case(8, 16, F32)
    with pytest.raises(TypeError, match=r"values must have the activations' dtype torch.float16, got torch.float32"):
        memsave_ops.linear_nm(torch.randn(2, 16).half(), values, indices, None, 2, 4, 16)
    (values, mask), _ = _bitmask_case(8, 16, F32)
    with pytest.raises(TypeError, match=r"linear_bitmask: values must have the activations' dtype"):
        memsave_ops.linear_bitmask(torch.randn(2, 16).half(), values, mask, None, 16)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., in_features=16\), got \(2, 12\)"):
        memsave_ops.linear_bitmask(torch.randn(2, 12), values, mask, None, 16)


def test_values_may_come_from_a_computation():
    # What the quantize pass does: values produced by an op (here a cast), not a stored constant.
    (values, indices), dense = _nm_case(8, 32, F32)
    x = torch.randn(3, 32)
    y = memsave_ops.linear_nm(x.half(), (values * 1).half(), indices, None, 2, 4, 32)
    assert torch.allclose(y.float(), x.half().float() @ dense.half().float().T, atol=2e-2)
    (values, mask), dense = _bitmask_case(8, 32, F32)
    y = memsave_ops.linear_bitmask(x, values.reshape(1, -1), mask, None, 32)  # any shape of nnz values
    assert torch.allclose(y, x @ dense.T, atol=1e-5)


def test_fake_kernels_give_the_right_shapes():
    (nm_values, indices), _ = _nm_case(24, 40, F16)
    (bm_values, mask), _ = _bitmask_case(24, 40, F16)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(2, 5, 40).half())
        fake = lambda t: mode.from_tensor(t)  # noqa: E731
        y = memsave_ops.linear_nm(x, fake(nm_values), fake(indices), None, 2, 4, 40)
        assert y.shape == (2, 5, 24) and y.dtype == F16
        y = memsave_ops.linear_bitmask(x, fake(bm_values), fake(mask), fake(torch.zeros(24).half()), 40)
        assert y.shape == (2, 5, 24) and y.dtype == F16
        d = memsave_ops.densify_nm(fake(nm_values), fake(indices), 2, 4, 40, F32)
        assert d.shape == (24, 40) and d.dtype == F32
        d = memsave_ops.densify_bitmask(fake(bm_values), fake(mask), 40, BF16)
        assert d.shape == (24, 40) and d.dtype == BF16
        with pytest.raises(ValueError, match=r"m=4 must divide K"):  # checked while tracing
            memsave_ops.densify_nm(fake(nm_values), fake(indices), 2, 4, 42, F32)


def test_opcheck():
    (nm_values, indices), _ = _nm_case(24, 40, F32)
    (bm_values, mask), _ = _bitmask_case(24, 40, F32)
    x, bias = torch.randn(2, 3, 40), torch.randn(24)
    torch.library.opcheck(memsave_ops.linear_nm.default, (x, nm_values, indices, bias, 2, 4, 40))
    torch.library.opcheck(memsave_ops.linear_bitmask.default, (x, bm_values, mask, None, 40))
    torch.library.opcheck(memsave_ops.densify_nm.default, (nm_values, indices, 2, 4, 40, F16))
    torch.library.opcheck(memsave_ops.densify_bitmask.default, (bm_values, mask, 40, F32))


# --------------------------------------------------------------------------- sizes and memory


def test_byte_counts_match_the_stored_tensors():
    for rows, k, dtype in ((24, 40, F16), (5, 13, F32)):
        (values, mask), _ = _bitmask_case(rows, k, dtype)
        stored = values.numel() * values.element_size() + mask.numel()
        assert bitmask_bytes(rows, k, values.numel(), values.element_size()) == stored
    for n, m in NM_PATTERNS:
        (values, indices), _ = _nm_case(6, 3 * m, F16, n, m)
        assert nm_bytes(6, 3 * m, n, m, 2) == values.numel() * 2 + indices.numel()
    # 2:4 in fp16: half the values plus 2 bits per kept value = 56.25% of dense.
    assert nm_bytes(4096, 4096, 2, 4, 2) / (4096 * 4096 * 2) == 0.5625


# (values dtype, output dtype): the linear ops' case (equal) and a densify that casts.
DTYPE_PAIRS = [(F32, F32), (F16, F16), (BF16, BF16), (F32, F16), (F16, F32)]


def _assert_bounds(measured_fn, estimate):
    out, stats = measure_peak(measured_fn)
    temporaries = stats.peak_bytes - out.numel() * out.element_size()
    assert temporaries <= estimate <= 1.5 * temporaries + 2**16, (temporaries, estimate)


@pytest.mark.parametrize("n,m", [(2, 4), (3, 8)])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=lambda p: f"{str(p[0])[6:]}-to-{str(p[1])[6:]}")
def test_nm_densify_workspace_bounds_the_measured_temporaries(n, m, pair, monkeypatch):
    monkeypatch.setattr(sparse_ops, "CHUNK_ELEMS", 1 << 16)
    rows, k = 128, 2048  # two or more blocks of rows
    (values, indices), _ = _nm_case(rows, k, pair[0], n, m)
    cast = pair[1].itemsize if pair[0] != pair[1] else 0
    _assert_bounds(lambda: unpack_nm(values, indices, n, m, k, pair[1]), sparse_ops.nm_workspace(rows, k, n, m, cast))


@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=lambda p: f"{str(p[0])[6:]}-to-{str(p[1])[6:]}")
def test_bitmask_densify_workspace_bounds_the_measured_temporaries(pair, monkeypatch):
    monkeypatch.setattr(sparse_ops, "CHUNK_ELEMS", 1 << 16)
    rows, k = 128, 2048  # four blocks of rows
    (values, mask), _ = _bitmask_case(rows, k, pair[0])
    estimate = sparse_ops.bitmask_workspace(rows, k, pair[0].itemsize)
    _assert_bounds(lambda: unpack_bitmask(values, mask, k, pair[1]), estimate)


def test_linear_workspace_counts_the_dense_weight():
    import torch.fx as fx
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    def f(x, values, indices, mask, bm_values):
        y = memsave_ops.linear_nm.default(x, values, indices, None, 2, 4, 64)
        return y + memsave_ops.linear_bitmask.default(x, bm_values, mask, None, 64)

    (values, indices), _ = _nm_case(32, 64, F16)
    (bm_values, mask), _ = _bitmask_case(32, 64, F16)
    gm = fx.symbolic_trace(f)
    FakeTensorProp(gm).propagate(torch.randn(3, 64).half(), values, indices, mask, bm_values)
    nm_node, bm_node = [n for n in gm.graph.nodes if n.op == "call_function"][:2]
    dense = 32 * 64 * 2
    assert WORKSPACE[nm_node.target](nm_node) == dense + sparse_ops.nm_workspace(32, 64, 2, 4)
    assert WORKSPACE[bm_node.target](bm_node) == dense + sparse_ops.bitmask_workspace(32, 64, 2)
