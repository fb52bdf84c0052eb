"""Triton kernels for memsave::linear_affine (memsave/codegen/triton/).

On CPU they run under TRITON_INTERPRET=1, set per test by a fixture. @triton.jit reads the
variable when a function is decorated, i.e. when memsave imports a generated kernel file, so
it need not be set before `import triton` — as long as the kernels avoid Triton's own @jit
helpers (tl.zeros, tl.sum, ...), which were decorated at `import triton`. This file imports
Triton first on purpose, so that is what it checks (`test_interpreted_although_triton_was_imported_first`).
Scoping the variable to each test also keeps it away from other tests: set for a whole
process on a GPU machine, it would turn every compiled Triton kernel into an interpreted one.

GPU tests (marked gpu; skipped without CUDA) run the compiled kernels, every block config.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")  # imported before TRITON_INTERPRET is set: see above

import torch  # noqa: E402
import torch.fx as fx  # noqa: E402

import memsave.ops  # noqa: E402, F401  (memsave::linear_affine)
from memsave.codegen import kernels  # noqa: E402
from memsave.codegen import triton as mt  # noqa: E402
from memsave.codegen.triton import launcher  # noqa: E402
from memsave.codegen.triton import source  # noqa: E402
from memsave.codegen.triton.configs import MIN_BLOCK_K, block_configs  # noqa: E402
from memsave.codegen.triton.spec import KernelSpec, make_spec  # noqa: E402
from memsave.codegen.triton.templates import render  # noqa: E402
from memsave.ops.affine import num_groups, quantize_weight  # noqa: E402
from memsave.ops.pack import unpack_bits  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Allowed error, relative to max |x|·|w| (the scale of a dot product's rounding error). fp16 and
# bf16 round the weight (like the reference does) and the output.
RTOL = {F32: 1e-5, F16: 2e-3, BF16: 1.6e-2}


# Every test runs Triton under the interpreter (gpu-marked ones compiled), kernels cached in a
# per-session folder: the `triton_env` fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("triton_env")


# --------------------------------------------------------------------------- helpers


def quantized(n, k, bits, group, symmetric, bias, dtype, device="cpu", seed=0):
    """(packed, scale, offset, bias, group_size) of a random (n, k) weight; group None = per channel."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen)
    group_size = k if group is None else group
    packed, scale, offset = quantize_weight(w, bits, group_size, symmetric)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return move(packed), move(scale), move(offset), move(b), group_size


def float64_linear(x, packed, scale, offset, bias, bits, group_size, k):
    """y and max|x|·|w| in float64, straight from the codes."""
    n, groups = packed.shape[0], num_groups(k, group_size)
    codes = unpack_bits(packed.cpu(), bits, groups * group_size).reshape(n, groups, group_size).double()
    s = scale.cpu().double().unsqueeze(-1)
    m = offset.cpu().double().unsqueeze(-1) if offset is not None else -(2 ** (bits - 1)) * s
    w = (codes * s + m).reshape(n, -1)[:, :k]
    x64 = x.cpu().double().reshape(-1, k)
    y = x64 @ w.T + (bias.cpu().double() if bias is not None else 0)
    bound = (x64.abs() @ w.abs().T).max().item()
    return y.reshape(*x.shape[:-1], n), bound


def assert_close(y, expected, bound, dtype, what):
    assert y.dtype == dtype and y.shape == expected.shape, (what, y.dtype, y.shape)
    err = (y.cpu().double() - expected.cpu().double()).abs().max().item()
    assert err <= RTOL[dtype] * bound, f"{what}: max error {err:.3g} > {RTOL[dtype]} × {bound:.3g}"


def check_case(bits, group, symmetric, bias, dtype, m, n, k, device="cpu", **launch_kwargs):
    packed, scale, offset, b, gs = quantized(n, k, bits, group, symmetric, bias, dtype, device)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype).to(device)
    expected, bound = float64_linear(x, packed, scale, offset, b, bits, gs, k)
    reference = torch.ops.memsave.linear_affine(x, packed, scale, offset, b, bits, gs, k)
    y = mt.launch(x, packed, scale, offset, b, bits, gs, k, **launch_kwargs)
    what = f"bits={bits} group={group} sym={symmetric} bias={bias} {dtype} M={m} N={n} K={k} {launch_kwargs}"
    assert_close(y, expected, bound, dtype, what + " vs float64")
    assert_close(y, reference, bound, dtype, what + " vs reference")


# --------------------------------------------------------------------------- correctness

# (bits, group (None: per channel), symmetric, bias, dtype, M, N, K): every bits × grouping
# pairing, K not a multiple of the group, groups that are not multiples of 16 ("element"
# scales), one group wider than K, all three dtypes (bf16 is computed in fp32 when interpreted).
CASES = [
    (2, 32, True, False, F32, 1, 24, 64),
    (2, 64, False, True, F16, 3, 40, 200),
    (2, None, False, False, BF16, 17, 24, 100),
    (3, 32, False, True, F32, 3, 40, 100),
    (3, 64, True, False, F16, 17, 40, 200),
    (3, None, True, True, F32, 1, 24, 200),
    (3, 128, False, False, BF16, 1, 40, 200),
    (3, 20, True, False, F16, 1, 40, 64),
    (4, 128, True, True, F16, 1, 40, 200),
    (4, 32, False, False, F32, 17, 24, 100),
    (4, None, False, True, F16, 3, 24, 64),
    (4, 64, False, True, BF16, 3, 24, 100),
    (4, 12, False, True, F32, 3, 24, 100),
    (4, 128, False, False, F32, 3, 24, 100),  # one group, wider than K
    (8, 64, False, False, F32, 3, 24, 100),
    (8, None, True, True, BF16, 17, 40, 64),
    (8, 128, True, False, F16, 1, 40, 200),
    (8, 48, False, True, F32, 17, 24, 100),
]


@pytest.mark.parametrize("variant", ["gemv", "gemm"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-g{}-{}-{}-{}-m{}n{}k{}".format(
    c[0], c[1] or "ch", "sym" if c[2] else "asym", "bias" if c[3] else "nobias", str(c[4])[6:], *c[5:]))
def test_matches_reference_and_float64(case, variant):
    check_case(*case, variant=variant)


def test_picks_gemv_for_few_rows_and_gemm_for_more(monkeypatch):
    seen = []
    real = launcher.kernel_for
    monkeypatch.setattr(launcher, "kernel_for", lambda spec: seen.append(spec.variant) or real(spec))
    for m in (1, mt.GEMV_MAX_ROWS, mt.GEMV_MAX_ROWS + 1):
        check_case(4, 32, False, False, F32, m, 24, 64)
    assert seen == ["gemv", "gemv", "gemm"]


def test_leading_dims_strided_and_transposed_x():
    k, n = 64, 24
    packed, scale, offset, b, gs = quantized(n, k, 4, 32, False, True, F32)
    base = torch.randn(2, 3, 2 * k)
    for x in (base[..., :k], base[..., :k].transpose(0, 1), torch.randn(k, 5).T):  # row-strided, permuted, column-major
        y = mt.launch(x, packed, scale, offset, b, 4, gs, k)
        expected, bound = float64_linear(x, packed, scale, offset, b, 4, gs, k)
        assert_close(y, expected, bound, F32, f"x {tuple(x.shape)} strides {x.stride()}")
    empty = mt.launch(torch.randn(0, 3, k), packed, scale, offset, b, 4, gs, k)
    assert empty.shape == (0, 3, n)


def test_forced_block_config_must_keep_k_tiles_in_one_group():
    packed, scale, offset, b, gs = quantized(24, 100, 4, 32, True, False, F32)
    x = torch.randn(2, 100)
    config = dict(BLOCK_N=16, BLOCK_K=16, num_warps=4, num_stages=1)  # several tiles per group
    y = mt.launch(x, packed, scale, offset, b, 4, gs, 100, variant="gemv", config=config)
    expected, bound = float64_linear(x, packed, scale, offset, b, 4, gs, 100)
    assert_close(y, expected, bound, F32, "BLOCK_K=16")
    with pytest.raises(ValueError, match=r"BLOCK_K=64 must divide group_size=32.*try 32"):
        mt.launch(x, packed, scale, offset, b, 4, gs, 100, variant="gemv", config={**config, "BLOCK_K": 64})


# --------------------------------------------------------------------------- the op


def test_opcheck():
    op = torch.ops.memsave.linear_affine_triton.default
    packed, scale, offset, b, gs = quantized(24, 100, 4, 32, False, True, F32)
    torch.library.opcheck(op, (torch.randn(2, 3, 100), packed, scale, offset, b, 4, gs, 100))
    packed, scale, _, _, gs = quantized(40, 64, 3, None, True, False, F16)
    torch.library.opcheck(op, (torch.randn(17, 64).half(), packed, scale, None, None, 3, gs, 64))


@pytest.fixture
def registry(monkeypatch):
    """A copy of the kernel registry for the test, so register() does not leak into other tests."""
    monkeypatch.setattr(kernels, "_KERNELS", {op: list(ks) for op, ks in kernels._KERNELS.items()})


def test_schema_matches_the_reference_and_register_is_idempotent(registry):
    reference = torch.ops.memsave.linear_affine.default
    mt.register()
    mt.register()
    ours = [k for k in kernels.kernels_for(reference) if k.name == mt.KERNEL_NAME]
    assert len(ours) == 1 and ours[0].op is torch.ops.memsave.linear_affine_triton.default


def _linear_graph(device: str, dtype: torch.dtype, bits: int = 4):
    """A graph calling memsave::linear_affine, with fake-tensor metadata on `device`."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    def f(x, packed, scale, offset):
        return torch.ops.memsave.linear_affine.default(x, packed, scale, offset, None, bits, 32, 64)

    gm = fx.symbolic_trace(f)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        args = (
            torch.empty(3, 64, dtype=dtype, device=device),
            torch.empty(24, 64 // 8 * bits, dtype=torch.uint8, device=device),
            torch.empty(24, 2, dtype=torch.float16, device=device),
            torch.empty(24, 2, dtype=torch.float16, device=device),
        )
    FakeTensorProp(gm, mode).propagate(*args)
    return gm


def _linear_node(gm):
    return next(n for n in gm.graph.nodes if n.op == "call_function")


def test_applies_only_to_supported_cuda_nodes():
    # Fake CUDA tensors need no GPU: the predicate reads only metadata.
    assert mt.applies(_linear_node(_linear_graph("cuda", F16)))
    assert mt.applies(_linear_node(_linear_graph("cuda", F32)))
    assert not mt.applies(_linear_node(_linear_graph("cpu", F16)))
    assert not mt.applies(_linear_node(_linear_graph("cuda", torch.float64)))
    assert not mt.applies(_linear_node(_linear_graph("cuda", F16, bits=5)))


def test_select_kernels_retargets_cuda_nodes(registry):
    mt.register()
    gm = _linear_graph("cuda", F16)
    chosen = kernels.select_kernels(gm)
    node = _linear_node(gm)
    assert node.target is torch.ops.memsave.linear_affine_triton.default
    assert node.meta[kernels.KERNEL_TAG] == mt.KERNEL_NAME and chosen.get(mt.KERNEL_NAME) == 1


# --------------------------------------------------------------------------- errors


def test_unsupported_bits_is_a_clear_error():
    packed, scale, offset, b, gs = quantized(24, 64, 5, 32, False, False, F32)
    x = torch.randn(1, 64)
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8\), got 5"):
        mt.launch(x, packed, scale, offset, b, 5, gs, 64)
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8\), got 5"):
        torch.ops.memsave.linear_affine_triton(x, packed, scale, offset, b, 5, gs, 64)
    with pytest.raises(ValueError, match=r"got 1"):
        make_spec("gemv", 1, 32, 64, True, False, F32, True)


def test_bad_arguments_are_clear_errors(monkeypatch):
    packed, scale, offset, b, gs = quantized(24, 64, 4, 32, False, False, F32)
    with pytest.raises(TypeError, match=r"x must be one of .*float16.*got torch.float64"):
        mt.launch(torch.randn(1, 64, dtype=torch.float64), packed, scale, offset, b, 4, gs, 64)
    with pytest.raises(ValueError, match=r"packed must be uint8 \(N, 32\)"):
        mt.launch(torch.randn(1, 64), packed[:, :16], scale, offset, b, 4, gs, 64)
    with pytest.raises(ValueError, match=r"x must be \(\.\.\., in_features=64\), got \(1, 63\)"):
        mt.launch(torch.randn(1, 63), packed, scale, offset, b, 4, gs, 64)
    with pytest.raises(ValueError, match=r"variant must be one of \('gemv', 'gemm'\)"):
        mt.launch(torch.randn(1, 64), packed, scale, offset, b, 4, gs, 64, variant="gemm2")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match=r"x is on cpu; the Triton kernels run on CUDA tensors"):
        mt.launch(torch.randn(1, 64), packed, scale, offset, b, 4, gs, 64)


# --------------------------------------------------------------------------- source and configs


def test_source_files_are_named_by_hash_and_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSAVE_TRITON_CACHE", str(tmp_path))
    spec = make_spec("gemv", 4, 32, 64, False, True, F32, True)
    text = render(spec)
    path = source.emit(text)
    assert path == tmp_path / f"memsave_triton_{source.source_hash(text)}.py" and path.read_text() == text
    stamp = path.stat().st_mtime_ns
    assert source.emit(render(spec)) == path and path.stat().st_mtime_ns == stamp  # reused, not rewritten
    other = source.emit(render(make_spec("gemv", 8, 32, 64, False, True, F32, True)))
    assert other != path and len(list(tmp_path.glob("memsave_triton_*.py"))) == 2
    path.write_text(text[:100])  # a half-written file (a killed process) is written again
    assert source.emit(text).read_text() == text
    module = source.load(text)
    assert source.load(text) is module and module.__file__ == str(path)
    monkeypatch.delenv("MEMSAVE_TRITON_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert source.cache_dir() == tmp_path / ".cache" / "memsave" / "triton"


def test_interpreted_although_triton_was_imported_first():
    spec = make_spec("gemm", 4, 32, 64, True, False, F16, True)
    fn, _ = launcher.kernel_for(spec)
    assert type(fn).__name__ == "InterpretedFunction"


def test_templates_specialize_the_code():
    gemv_sym = render(make_spec("gemv", 4, 32, 64, True, False, F32, False))
    assert "offset_ptr" not in gemv_sym and "bias_ptr" not in gemv_sym and "tl.dot" not in gemv_sym
    gemm = render(make_spec("gemm", 3, 32, 100, False, True, F32, False))
    assert "offset_ptr" in gemm and "bias_ptr" in gemm and 'input_precision="ieee"' in gemm
    assert "tl.bfloat16" in render(make_spec("gemm", 4, 32, 100, True, False, BF16, False))
    assert "tl.float32" in render(make_spec("gemm", 4, 32, 100, True, False, BF16, True))  # interpreter: fp32 dots
    # Per-channel kernels do not depend on K (one file for all layers).
    per_channel = [make_spec("gemv", 8, k, k, True, False, F16, False) for k in (64, 4096)]
    assert per_channel[0] == per_channel[1]
    for spec in _all_specs():
        code = "\n".join(line.split("#")[0] for line in render(spec).splitlines())  # comments may name them
        for helper in ("tl.zeros", "tl.sum", "tl.cdiv", "tl.max(", "tl.static_range", "inline_asm"):
            assert helper not in code, (spec.name, helper)


def _all_specs():
    for variant in ("gemv", "gemm"):
        for bits in mt.SUPPORTED_BITS:
            for group, k in ((16, 64), (32, 100), (48, 100), (64, 200), (128, 4096), (12, 100), (4096, 4096)):
                for dtype in (F32, F16, BF16):
                    yield make_spec(variant, bits, group, k, bits % 2 == 0, bits == 4, dtype, False)


def test_gpu_block_configs_meet_the_dot_minimums_and_tile_groups():
    for spec in _all_specs():
        configs = block_configs(spec)
        assert configs, spec.name
        for c in configs:
            for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
                if key in c:
                    assert c[key] >= (MIN_BLOCK_K if key != "BLOCK_N" or spec.variant == "gemm" else 1)
                    assert c[key] & (c[key] - 1) == 0, (spec.name, c)
            if spec.scales == "tile":
                assert spec.group_size % c["BLOCK_K"] == 0, (spec.name, c)


# --------------------------------------------------------------------------- GPU


GPU_CASES = [
    (4, 128, False, True, BF16),  # int4 g128 asym: the decode workhorse
    (8, None, True, False, F16),  # int8 per channel
    (3, 64, False, False, F16),
    (2, 32, True, True, F32),
    (4, 12, False, False, BF16),  # "element" scales
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"b{c[0]}-g{c[1] or 'ch'}-{str(c[4])[6:]}")
def test_compiled_kernels_match_on_cuda_every_config(case):
    bits, group, symmetric, bias, dtype = case
    n, k = 200, 1000  # K not a multiple of the group; N not a multiple of any BLOCK_N
    for m, variant in ((1, "gemv"), (5, "gemv"), (100, "gemm")):
        spec = make_spec(variant, bits, group or k, k, symmetric, bias, dtype, False)
        assert not spec.interpret
        for config in block_configs(spec):
            check_case(bits, group, symmetric, bias, dtype, m, n, k, device="cuda", variant=variant, config=config)
        check_case(bits, group, symmetric, bias, dtype, m, n, k, device="cuda")  # autotuned


@pytest.mark.gpu
def test_selected_kernel_runs_on_cuda(registry):
    mt.register()
    gm = _linear_graph("cuda", F16)
    kernels.select_kernels(gm)
    assert _linear_node(gm).target is torch.ops.memsave.linear_affine_triton.default
    packed, scale, offset, _, gs = quantized(24, 64, 4, 32, False, False, F16, device="cuda")
    x = torch.randn(3, 64, device="cuda", dtype=F16)
    y = gm(x, packed, scale, offset)
    expected, bound = float64_linear(x, packed, scale, offset, None, 4, gs, 64)
    assert_close(y, expected, bound, F16, "selected kernel")
    compiled = torch.compile(gm, fullgraph=True)  # Inductor calls the op as an extern kernel
    assert_close(compiled(x, packed, scale, offset), expected, bound, F16, "compiled")
