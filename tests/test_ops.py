"""memsave's custom ops: references, fake kernels, tracing through torch.compile, the kernel seam."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from memsave.codegen import kernels
from memsave.ops import (
    bits_per_weight,
    choose_qparams_affine,
    dequantize_affine,
    pack_bits,
    packed_length,
    quantize_affine,
    quantize_weight,
    unpack_bits,
)

memsave_ops = torch.ops.memsave


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 3), n=st.integers(1, 70), seed=st.integers(0, 10_000))
def test_pack_unpack_round_trip(bits, rows, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**bits, (rows, n), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, packed_length(n, bits))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


def test_pack_layout_is_low_nibble_first():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    assert pack_bits(codes, 4).tolist() == [[1 | 2 << 4, 3 | 4 << 4, 5 | 6 << 4, 7 | 8 << 4]]
    assert pack_bits(codes[:, :4] - 1, 2).tolist() == [[0 | 1 << 2 | 2 << 4 | 3 << 6, 0]]


def test_pack_rejects_bad_input():
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_bits(torch.zeros(1, 8, dtype=torch.uint8), 9)
    with pytest.raises(TypeError, match="must be integers"):
        pack_bits(torch.zeros(1, 8), 4)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_round_to_nearest_error_is_at_most_half_a_step(bits, group_size, symmetric):
    w = torch.randn(24, 200, generator=torch.Generator().manual_seed(bits))  # 200: not a multiple of 64/128
    packed, scale, offset = quantize_weight(w, bits, group_size, symmetric)
    g = 200 if group_size is None else group_size
    assert scale.shape == (24, (200 + g - 1) // g) and scale.dtype == torch.float16
    assert (offset is None) == symmetric
    dq = dequantize_affine(packed, scale, offset, bits, g, 200, torch.float32)
    assert dq.shape == w.shape
    step = scale.float().repeat_interleave(g, dim=1)[:, :200]
    # Half a step, plus fp16 rounding of the stored scale/offset.
    assert ((dq - w).abs() <= 0.5 * step + 2e-3 * w.abs().amax()).all()


def test_values_on_the_grid_come_back_exactly():
    scale = torch.full((2, 1), 0.25, dtype=torch.float16)
    offset = torch.full((2, 1), -1.0, dtype=torch.float16)
    codes = torch.arange(16, dtype=torch.float32).repeat(2, 1)
    w = codes * 0.25 - 1.0
    packed = quantize_affine(w, scale, offset, 4, 16)
    assert torch.equal(dequantize_affine(packed, scale, offset, 4, 16, 16, torch.float32), w)


def test_bits_per_weight_meets_the_issue_bounds():
    assert bits_per_weight(4096, 4096, 4, 128, symmetric=False) <= 4.3
    assert bits_per_weight(1024, 512, 8, 512, symmetric=True) <= 8.1
    assert bits_per_weight(1024, 512, 8, 512, symmetric=False) <= 8.1


def test_bad_quantization_parameters_are_named():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="bits must be one of 2, 3, 4, 5, 6, 7, 8, got 1"):
        choose_qparams_affine(w, 1, 8, True)
    with pytest.raises(ValueError, match="group_size must be positive"):
        choose_qparams_affine(w, 4, 0, True)


@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_kernels_and_schemas_pass_opcheck(symmetric):
    w = torch.randn(8, 40)
    scale, offset = choose_qparams_affine(w, 4, 16, symmetric)
    torch.library.opcheck(memsave_ops.quantize_affine.default, (w, scale, offset, 4, 16))
    packed = quantize_affine(w, scale, offset, 4, 16)
    torch.library.opcheck(memsave_ops.dequantize_affine.default, (packed, scale, offset, 4, 16, 40, torch.float32))


def _dequant_matmul(packed, scale, x):
    w = memsave_ops.dequantize_affine(packed, scale, None, 4, 32, 96, torch.float32)
    return x @ w.t()


@pytest.mark.parametrize("codegen", ["fx", "inductor"])
def test_ops_trace_through_torch_compile(codegen):
    import memsave

    w, x = torch.randn(16, 96), torch.randn(5, 96)
    packed, scale, _ = quantize_weight(w, 4, 32, symmetric=True)
    expected = _dequant_matmul(packed, scale, x)
    compiled = torch.compile(_dequant_matmul, backend="memsave", options={"codegen": codegen}, fullgraph=True)
    with memsave.collect() as reports:
        torch.testing.assert_close(compiled(packed, scale, x), expected)
    (report,) = reports
    assert report.records  # the pipeline ran over a graph holding memsave.dequantize_affine


def test_kernel_seam_swaps_in_a_registered_kernel(monkeypatch):
    import memsave

    monkeypatch.setattr(kernels, "_KERNELS", {})
    calls = []

    @torch.library.custom_op("memsave_test::dequantize_affine_fast", mutates_args=())
    def fast(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int,
             group_size: int, in_features: int, dtype: torch.dtype) -> torch.Tensor:
        calls.append(bits)
        return dequantize_affine(packed, scale, offset, bits, group_size, in_features, dtype)

    fast.register_fake(lambda packed, scale, offset, bits, group_size, in_features, dtype:
                       packed.new_empty((packed.shape[0], in_features), dtype=dtype))
    kernels.register_kernel(
        memsave_ops.dequantize_affine.default,
        kernels.Kernel.retarget(
            "test-fast", torch.ops.memsave_test.dequantize_affine_fast.default, lambda node: node.args[3] == 4
        ),
    )
    with pytest.raises(ValueError, match="does not match reference"):
        kernels.register_kernel(
            memsave_ops.dequantize_affine.default,
            kernels.Kernel.retarget("wrong", memsave_ops.quantize_affine.default, lambda node: True),
        )
    w, x = torch.randn(16, 96), torch.randn(5, 96)
    packed, scale, _ = quantize_weight(w, 4, 32, symmetric=True)
    compiled = torch.compile(_dequant_matmul, backend="memsave", options={"codegen": "fx"}, fullgraph=True)
    compiled(packed, scale, x)  # compiles (debug mode also runs the graph once to measure its error)
    calls.clear()
    torch.testing.assert_close(compiled(packed, scale, x), _dequant_matmul(packed, scale, x))
    assert calls == [4]  # the compiled graph ran the fast kernel, not the reference
