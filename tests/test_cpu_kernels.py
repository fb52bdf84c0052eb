"""CPU fast paths for quantized linears: layouts, numerics against the reference, selection,
one copy of each weight, and recompiles that rebuild memsave's own format from the kernel's."""

import pytest
import torch

import memsave
from memsave.codegen import cpu, kernels
from memsave.memory.track import live_tensor_bytes
from memsave.ops import dequantize_affine, linear_affine, pack_bits, quantize_weight
from memsave.report import ErrorStats
from memsave.weights import WEIGHTS

memsave_ops = torch.ops.memsave
# What this CPU offers (both decided at run time by the product too): torch packs CPU int4 in
# the layout memsave converts to only with AVX-512 (else memsave does not use that kernel), and
# the native kernels' bf16 products need avx512_bf16.
INT4_LAYOUT = cpu.int4_layout_matches_torch()
NO_INT4_LAYOUT = "this torch packs CPU int4 in another layout here (no AVX-512): memsave does not use the kernel"


def _bf16_products() -> bool:
    from memsave.codegen.native import build
    from memsave.codegen.native import kernels as native

    return build.library() is not None and native.has_bf16_products()


@pytest.mark.parametrize("n, k", [(64, 64), (128, 96), (192, 256)])
def test_int4_layout_is_torchs_and_inverts_exactly(n, k):
    codes = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(n + k), dtype=torch.int32)
    packed = pack_bits(codes.to(torch.uint8), 4)
    ours = cpu.to_int4pack(packed, n, k)
    # Where torch's layout is another (no AVX-512), the first-use check says so and the kernel is off.
    assert torch.equal(ours, torch._convert_weight_to_int4pack_for_cpu(codes, 1)) == INT4_LAYOUT
    assert torch.equal(cpu.from_int4pack(ours, n, k), packed)


@pytest.mark.skipif(not INT4_LAYOUT, reason=NO_INT4_LAYOUT)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_kernel_matches_the_reference(symmetric, group):
    n, k = 128, 256
    gen = torch.Generator().manual_seed(group)  # inputs too: the result must not depend on test order
    w = torch.randn(n, k, generator=gen)
    packed, scale, offset = quantize_weight(w, 4, group, symmetric)
    x, bias = torch.randn(2, 5, k, generator=gen).bfloat16(), torch.randn(n, generator=gen).bfloat16()
    expected = linear_affine(x.float(), packed, scale, offset, bias.float(), 4, group, k)
    got = cpu.linear_int4_cpu(x, cpu.to_int4pack(packed, n, k), cpu.int4_scales_zeros(scale, offset), bias, group, n)
    assert got.dtype == torch.bfloat16 and got.shape == (2, 5, n)
    assert ErrorStats.between([expected], [got.float()]).sqnr_db > 35  # bf16 rounding, not a different weight
    # Against a float64 result, the kernel is about as close as torch's own bf16 computation of
    # the reference: within 2× its error (measured ~1.6×: ATen keeps scales and zeros in bf16).
    w64 = dequantize_affine(packed, scale, offset, 4, group, k, torch.float64)
    exact = torch.nn.functional.linear(x.double(), w64, bias.double())
    torch_bf16 = linear_affine(x, packed, scale, offset, bias, 4, group, k)
    kernel_error = (got.double() - exact).abs().max()
    assert kernel_error <= 2 * (torch_bf16.double() - exact).abs().max()


def test_int8_kernel_matches_the_reference():
    n, k = 96, 160
    w = torch.randn(n, k)
    packed, scale, _ = quantize_weight(w, 8, None, symmetric=True)
    x = torch.randn(7, k).bfloat16()
    expected = linear_affine(x.float(), packed, scale, None, None, 8, k, k)
    got = cpu.linear_int8_cpu(x, (packed ^ 0x80).view(torch.int8), scale.reshape(-1).bfloat16(), None)
    assert ErrorStats.between([expected], [got.float()]).sqnr_db > 35


def test_kernel_ops_pass_opcheck():
    n, k = 64, 64
    packed, scale, offset = quantize_weight(torch.randn(n, k), 4, 32, symmetric=False)
    x = torch.randn(3, k).bfloat16()
    torch.library.opcheck(
        memsave_ops.linear_int4_cpu.default,
        (x, cpu.to_int4pack(packed, n, k), cpu.int4_scales_zeros(scale, offset), None, 32, n),
    )
    packed8, scale8, _ = quantize_weight(torch.randn(n, k), 8, None, symmetric=True)
    torch.library.opcheck(
        memsave_ops.linear_int8_cpu.default, (x, (packed8 ^ 0x80).view(torch.int8), scale8.reshape(-1).bfloat16(), None)
    )


def _mlp():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).eval()


def _compile(model, x, quantize, monkeypatch=None, no_kernels=False):
    if no_kernels:
        monkeypatch.setattr(kernels, "_KERNELS", {})
    compiled = torch.compile(model, backend="memsave", options={"quantize": quantize, "codegen": "fx"})
    with memsave.collect() as reports, torch.no_grad():
        out = compiled(x)
    return compiled, out, reports


BF16_INT4 = {"bits": 4, "group_size": 64, "symmetric": False, "compute_dtype": "bfloat16"}
BF16_INT8 = {"bits": 8, "compute_dtype": "bfloat16"}


@pytest.mark.parametrize("quantize, kernel", [(BF16_INT4, "cpu-int4pack"), (BF16_INT8, "cpu-int8pack")])
def test_selected_through_the_backend_and_close_to_the_reference_path(quantize, kernel, monkeypatch):
    x = torch.randn(4, 128)
    _, fast, (report,) = _compile(_mlp(), x, quantize)
    select = report.records[-1]
    if kernel == "cpu-int4pack" and not INT4_LAYOUT:
        kernel = "native-affine"  # the layout check turned ATen's kernel off: memsave's own runs
    assert select.name == "select_kernels" and select.details["kernels"] == {kernel: 2}
    torch._dynamo.reset()
    _, reference, (ref_report,) = _compile(_mlp(), x, quantize, monkeypatch, no_kernels=True)
    assert ref_report.records[-1].details["kernels"] == {}  # no kernel registered: the reference runs
    assert ErrorStats.between([reference], [fast]).sqnr_db > 35


def test_fp32_activations_get_the_fastest_kernel_by_default_and_the_exact_one_on_request(monkeypatch):
    asym = {"bits": 4, "group_size": 64, "symmetric": False}
    x = torch.randn(12, 128)  # more rows than the fused kernel takes: a prefill-sized call
    _, reference, _ = _compile(_mlp(), x, asym, monkeypatch, no_kernels=True)
    monkeypatch.undo()
    torch._dynamo.reset()
    # Default: the native kernel with bf16 products at this size (the fastest here); the report
    # names it per layer, and its error is bf16 rounding.
    _, fast, (report,) = _compile(_mlp(), x, asym)
    select = report.records[-1]
    assert select.details["kernels"] == {"native-affine-bf16": 2}
    assert set(select.details["per_layer"]) == {"0.weight", "2.weight"}
    assert 30 < ErrorStats.between([reference], [fast]).sqnr_db < 80  # close, not exact
    torch._dynamo.reset()
    # compute_dtype "float32": the native kernel in fp32, exact up to summation order.
    _, exact, (report,) = _compile(_mlp(), x, {**asym, "compute_dtype": "float32"})
    assert report.records[-1].details["kernels"] == {"native-affine": 2}
    torch.testing.assert_close(exact, reference, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    # Decode-sized calls of 4-bit codes in whole 64-weight groups take bf16 products by default
    # too where the CPU has avx512_bf16 (a narrowed decode path; without it, the exact kernel);
    # other widths decode exactly (int3: no narrowed path).
    _, _, (report,) = _compile(_mlp(), x[:4], asym)
    decode = "native-affine-bf16" if _bf16_products() else "native-affine"
    assert report.records[-1].details["kernels"] == {decode: 2}
    torch._dynamo.reset()
    _, _, (report,) = _compile(_mlp(), x[:4], {"bits": 3, "group_size": 64, "symmetric": False})
    assert report.records[-1].details["kernels"] == {"native-affine": 2}
    torch._dynamo.reset()
    # int8 keeps fp32 products at any size: the format chosen for fidelity.
    _, _, (report,) = _compile(_mlp(), x, "int8")
    assert report.records[-1].details["kernels"] == {"native-affine": 2}


@pytest.mark.skipif(not INT4_LAYOUT, reason=NO_INT4_LAYOUT)
def test_one_copy_of_each_weight_and_recompiles_rebuild_the_generic_form():
    model = _mlp()
    generic_bytes = sum(
        sum(live_tensor_bytes([t]) for t in quantize_weight(m.weight.detach(), 4, 64, False) if t is not None)
        for m in model if isinstance(m, torch.nn.Linear)
    )
    compiled, _, (report,) = _compile(model, torch.randn(4, 128), BF16_INT4)
    constants = report.constant_tensors()
    # Only the kernel layout is held: the same bytes as memsave's own packed codes and scales
    # (bf16 [scale, zero] pairs instead of fp16 scale + offset), no second copy.
    assert live_tensor_bytes(constants) == generic_bytes
    builds = WEIGHTS.builds
    with memsave.collect() as reports, torch.no_grad():
        out = compiled(torch.randn(9, 128))  # a new shape: recompile without the fp32 weights
    assert out.shape == (9, 64)
    assert reports[0].records[-1].details["kernels"] == {"cpu-int4pack": 2}
    assert WEIGHTS.builds == builds  # nothing recomputed: codes rebuilt from the kernel layout
    new_constants = {id(t) for t in reports[0].constant_tensors()}
    assert {id(t) for t in constants} <= new_constants | {id(t) for t in constants}
    assert any(id(t) in new_constants for t in constants)  # the same kernel tensors are reused


@pytest.mark.slow
def test_compute_dtype_casts_compile_with_inductor():
    """quantize's compute_dtype casts are prims.convert_element_type: with aten._to_copy (which
    AOTAutograd decomposes before memsave sees the graph) Inductor failed on an HF Llama with
    "both a fallback and a decomp for same op: aten._to_copy.default"."""
    from memsave.models import build_hf_llama, hf_inputs

    model = build_hf_llama("tiny")
    inputs = hf_inputs(model, batch=1, seq=8)
    with torch.no_grad():
        expected = model(*inputs)
    compiled = torch.compile(model, backend="memsave", options={"quantize": {"bits": 8, "compute_dtype": "bfloat16"}})
    with memsave.collect() as reports, torch.no_grad():
        out = compiled(*inputs)
    kernels = {k for r in reports for rec in r.records if rec.name == "select_kernels" for k in rec.details["kernels"]}
    assert "cpu-int8pack" in kernels  # codegen: Inductor (the default)
    assert ErrorStats.between([expected], [out]).sqnr_db > 15
