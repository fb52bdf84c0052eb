"""memsave's C kernels (codegen/native) against the plain-torch reference ops they stand in for:
every stored format, decode-sized and prefill-sized batches (the fused and the tiled path),
odd shapes, bias, narrow activations, the portable (non-AVX-512) build, and selection through
the backend."""

import pytest
import torch

import memsave
from memsave.codegen.native import build, kernels as native
from memsave.ops import quantize_weight
from memsave.ops.log import quantize_weight_log
from memsave.ops.sparse import nm_keep_mask, pack_bitmask, pack_nm
from memsave.ops.vq import quantize_weight_vq

memsave_ops = torch.ops.memsave
pytestmark = pytest.mark.skipif(build.library() is None, reason=f"no native build: {build.unavailable_reason()}")

# rows of activations: 1 and 5 run the fused kernel, 8 its largest block, 11 the tiled GEMM path
ROWS = (1, 5, 8, 11)


def _weight(n, k, seed):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5


def _close(got, expected):
    # fp32 throughout: only the summation order differs from the reference's matmul.
    torch.testing.assert_close(got, expected, rtol=2e-5, atol=2e-5 * expected.abs().max().item())


def _cases(n, k):
    """(name, reference op, native op, args without x) for every format on one (n, k) weight."""
    w, bias = _weight(n, k, n + k), torch.randn(n, generator=torch.Generator().manual_seed(1))
    cases = []
    for bits, group, sym in [(8, k, True), (4, 64, False), (4, 32, True), (4, k, False), (3, k, True), (3, 64, False),
                             (2, k, True), (2, 64, False), (8, 64, False)]:
        packed, scale, offset = quantize_weight(w, bits, group, sym)
        args = (packed, scale, offset, bias, bits, group, k)
        cases.append((f"int{bits}-g{group}", memsave_ops.linear_affine.default, native.linear_affine_native, args))
    for bits, group in [(4, k), (4, 64), (3, k), (2, k)]:
        packed, log_zmin, step = quantize_weight_log(w, bits, group)
        cases.append((f"log{bits}-g{group}", memsave_ops.linear_log.default, native.linear_log_native,
                      (packed, log_zmin, step, None, bits, group, k)))
    for dim, centroids in [(2, 256), (4, 256), (1, 16), (2, 64)]:
        indices, codebook = quantize_weight_vq(w, dim, centroids, iters=2)
        cases.append((f"vq{dim}x{centroids}", memsave_ops.linear_vq.default, native.linear_vq_native,
                      (indices, codebook, bias, (centroids - 1).bit_length(), dim, k)))
    for n_, m_ in [(2, 4), (4, 8), (1, 4), (3, 8)]:
        values, positions = pack_nm(w, nm_keep_mask(w.abs(), n_, m_), n_, m_)
        cases.append((f"{n_}:{m_}", memsave_ops.linear_nm.default, native.linear_nm_native, (values, positions, bias, n_, m_, k)))
    if k % 8 == 0:
        packed, scale, _ = quantize_weight(w, 8, None, symmetric=True)
        cases.append(("w8a8", memsave_ops.linear_w8a8.default, native.linear_w8a8_native, (packed, scale, bias)))
    return cases


@pytest.mark.parametrize("n, k", [(96, 256), (80, 200), (130, 72)])
def test_every_format_matches_its_reference(n, k):
    for name, reference, op, args in _cases(n, k):
        for rows in ROWS:
            x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows))
            try:
                _close(op(x, *args), reference(x, *args))
            except AssertionError as e:
                raise AssertionError(f"{name}, {rows} rows: {e}") from None


def test_narrowed_variants_round_only_prefill_products_to_bf16():
    n, k = 96, 256
    for name, reference, op, args in _cases(n, k)[::3]:
        narrowed = getattr(native, op.name().split("::")[1].split(".")[0] + "_bf16", None)
        if narrowed is None:
            continue  # W8A8 has no narrowed variant
        # Decode-sized calls: bf16 products where linear.c has a narrowed decode path (2/4-bit
        # affine and log codes), else the same fp32 kernel, bit for bit.
        small = torch.randn(3, k, generator=torch.Generator().manual_seed(3))
        bf16_decode = name.split("-")[0] in ("int4", "int2", "log4", "log2") and native.has_bf16_products()
        if bf16_decode:
            expected = reference(small, *args)
            relative = ((narrowed(small, *args) - expected).norm() / expected.norm()).item()
            assert 0 < relative < 1e-2, (name, relative)
        else:
            assert torch.equal(narrowed(small, *args), op(small, *args)), name
        large = torch.randn(40, k, generator=torch.Generator().manual_seed(4))
        expected = reference(large, *args)
        got = narrowed(large, *args)
        relative = ((got - expected).norm() / expected.norm()).item()
        assert 0 < relative < 1e-2, (name, relative)  # bf16 rounding of weights, activations, sums


@pytest.mark.skipif(build.library() is None or not native.has_bf16_products(), reason="needs avx512_bf16")
@pytest.mark.parametrize("k, group, symmetric", [(256, 64, False), (256, 32, True), (384, 128, False), (256, 256, True)])
def test_int4_decode_rounds_only_the_activations_to_bf16(k, group, symmetric):
    """The int4 narrowed decode (scale after the sums, codes as exact bf16 integers) is the
    reference on bf16-rounded activations up to fp32 summation order: weights are not rounded."""
    n = 70
    packed, scale, offset = quantize_weight(_weight(n, k, k + group), 4, group, symmetric)
    args = (packed, scale, offset, torch.randn(n), 4, group, k)
    for rows in (1, 3, 8):
        x = torch.randn(rows, k, generator=torch.Generator().manual_seed(rows)) * 3 + 1  # a mean: offsets matter
        expected = memsave_ops.linear_affine(x.bfloat16().float(), *args)
        got = native.linear_affine_native_bf16(x, *args)
        relative = ((got - expected).norm() / expected.norm()).item()
        assert relative < 2e-5, (rows, relative)
        assert not torch.equal(got, native.linear_affine_native(x, *args))  # the narrowed path ran


def test_bitmask_matches_its_reference_with_any_pattern():
    for n, k, density in [(64, 256, 0.5), (70, 201, 0.1), (33, 48, 0.95)]:
        w = _weight(n, k, k)
        keep = torch.rand(n, k, generator=torch.Generator().manual_seed(n)) < density
        keep[3] = False  # an empty row
        values, mask = pack_bitmask(w, keep)
        row_start = native.bitmask_row_start(mask, k)
        assert row_start[-1] == values.numel() and row_start[4] == row_start[3]
        bias = torch.randn(n)
        for rows in ROWS:
            x = torch.randn(rows, k)
            _close(native.linear_bitmask_native(x, values, mask, row_start, bias, k),
                   memsave_ops.linear_bitmask(x, values, mask, bias, k))


def test_the_python_tile_loop_matches_where_no_blas_symbol_is_found(monkeypatch):
    monkeypatch.setattr(native, "_sgemm", lambda: None)
    monkeypatch.setattr(native, "TILE_BYTES", 16 * 200 * 4)  # several tiles
    for name, reference, op, args in _cases(80, 200)[::4]:
        x = torch.randn(11, 200)
        _close(op(x, *args), reference(x, *args))


def test_batch_dims_and_narrow_activations():
    n, k = 64, 128
    packed, scale, offset = quantize_weight(_weight(n, k, 0), 4, 64, False)
    args = (packed, scale, offset, None, 4, 64, k)
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(7))
    got = native.linear_affine_native(x, *args)
    assert got.shape == (2, 3, n) and got.dtype == torch.float32
    _close(got, memsave_ops.linear_affine(x, *args))
    # bf16 activations: computed in fp32 and returned in bf16 (the reference computes in bf16).
    xb = x.bfloat16()
    got = native.linear_affine_native(xb, *args)
    assert got.dtype == torch.bfloat16
    # One rounding to bf16 apart from the fp32 result (the fp32 sums may differ in their last
    # bit from the reference's, which can flip a rounding: so a tolerance of one bf16 step).
    torch.testing.assert_close(got.float(), memsave_ops.linear_affine(xb.float(), *args), rtol=2**-7, atol=1e-5)


def test_w8a8_sums_are_exact_integers():
    """The VNNI path sums (q + 128)·x − 128·Σx in int32: the same integers as torch._int_mm."""
    n, k = 64, 256
    packed, scale, _ = quantize_weight(_weight(n, k, 3), 8, None, symmetric=True)
    one = torch.ones(n, 1, dtype=torch.float16)  # unit scales: the output is the integer sum times x's scale
    x = torch.randn(5, k)
    codes, x_scale = memsave_ops.quantize_per_token(x)
    expected = torch._int_mm(codes, (packed ^ 0x80).view(torch.int8).t().contiguous()).float() * x_scale
    assert torch.equal(native.linear_w8a8_native(x, packed, one, None), expected)


def test_the_portable_build_matches_too():
    """Machines without AVX-512 run the plain-C path of the same source."""
    portable = build.library(("-mno-avx512f",))
    assert portable is not None, build.unavailable_reason()
    isa = native._lib().ms_isa()  # 0 already on a CPU without AVX-512
    before = native.use_library(portable)
    try:
        assert native._lib().ms_isa() == 0
        for name, reference, op, args in _cases(72, 200)[::3]:
            for rows in (1, 11):
                x = torch.randn(rows, 200)
                _close(op(x, *args), reference(x, *args))
    finally:
        native.use_library(before)
    assert native._lib().ms_isa() == isa


def test_ops_pass_opcheck():
    n, k = 64, 64
    packed, scale, offset = quantize_weight(_weight(n, k, 5), 4, 32, False)
    torch.library.opcheck(native.linear_affine_native, (torch.randn(3, k), packed, scale, offset, None, 4, 32, k))
    values, mask = pack_bitmask(_weight(n, k, 6), torch.rand(n, k) < 0.5)
    torch.library.opcheck(
        native.linear_bitmask_native, (torch.randn(2, k), values, mask, native.bitmask_row_start(mask, k), None, k)
    )


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)).eval()


@pytest.mark.parametrize(
    "options, kernel",
    [
        ({"quantize": "int8"}, "native-affine"),
        ({"quantize": "int3"}, "native-affine"),
        ({"quantize": "log4"}, "native-log-bf16"),  # 4-bit codes: bf16 products by default
        ({"quantize": "vq4"}, "native-vq"),
        ({"quantize": "w8a8"}, "native-w8a8"),
        ({"prune": "2:4"}, "native-nm"),
        ({"prune": "unstructured-50"}, "native-bitmask"),
    ],
)
@pytest.mark.parametrize("codegen", ["inductor", "fx"])
def test_short_names_run_native_kernels_through_the_backend(options, kernel, codegen, monkeypatch):
    from memsave.codegen import kernels

    if not native.has_bf16_products():  # no avx512_bf16: the fp32 products are the default
        kernel = kernel.removesuffix("-bf16")
    x = torch.randn(3, 128)
    outputs = {}
    for registry in ("native", "reference"):
        torch._dynamo.reset()
        if registry == "reference":
            monkeypatch.setattr(kernels, "_KERNELS", {})
        compiled = torch.compile(_model(), backend="memsave", options={**options, "codegen": codegen})
        with memsave.collect() as reports, torch.no_grad():
            outputs[registry] = compiled(x)
        select = reports[0].records[-1]
        if registry == "native":
            assert select.details["kernels"] == {kernel: 2}
            assert set(select.details["per_layer"].values()) == {kernel}
    if kernel.endswith("-bf16"):
        relative = (outputs["native"] - outputs["reference"]).norm() / outputs["reference"].norm()
        assert relative < 1e-2
    else:
        _close(outputs["native"], outputs["reference"])
