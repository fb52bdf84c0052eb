"""Kernels for memsave::linear_nm: the Triton kernel (memsave/codegen/triton/sparse_nm.py) and
the 2:4 semi-structured lowering (sparse_semi_structured.py).

The Triton kernel runs on CPU under TRITON_INTERPRET=1, set per test by a fixture, as in
tests/test_triton_kernels.py (which explains why Triton is imported first). The semi-structured
lowering needs an sm80+ GPU: on CPU its predicate and graph rewrite are checked with the
conversion stubbed; GPU tests (marked gpu; skipped without CUDA) check the numerics.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")  # imported before TRITON_INTERPRET is set

import torch  # noqa: E402
import torch.fx as fx  # noqa: E402
from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

import memsave.ops  # noqa: E402, F401  (memsave::linear_nm)
from memsave.codegen import kernels  # noqa: E402
from memsave.codegen import triton as mt  # noqa: E402
from memsave.codegen.triton import sparse_nm, sparse_semi_structured as semi  # noqa: E402
from memsave.ops import nm_keep_mask, pack_nm, unpack_nm  # noqa: E402
from memsave.weights import WEIGHTS  # noqa: E402

F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Allowed error, relative to max Σ|x|·|w| (the scale of a dot product's rounding error).
RTOL = {F32: 1e-5, F16: 2e-3, BF16: 1.6e-2}
LINEAR_NM = torch.ops.memsave.linear_nm.default


# Every test runs Triton under the interpreter (gpu-marked ones compiled), kernels cached in a
# per-session folder: the `triton_env` fixture in conftest.py.
pytestmark = pytest.mark.usefixtures("triton_env")


@pytest.fixture
def registry(monkeypatch):
    """A copy of the kernel registry for the test, so register() does not leak into other tests."""
    monkeypatch.setattr(kernels, "_KERNELS", {op: list(ks) for op, ks in kernels._KERNELS.items()})


# --------------------------------------------------------------------------- helpers


def sparse_weight(rows, k, n, m, dtype, device="cpu", seed=0):
    """(values, indices, dense) of a random n:m-pruned (rows, k) weight."""
    w = torch.randn(rows, k, generator=torch.Generator().manual_seed(seed))
    values, indices = pack_nm(w, nm_keep_mask(w.abs(), n, m), n, m)
    values, indices = values.to(dtype).to(device), indices.to(device)
    return values, indices, unpack_nm(values.cpu(), indices.cpu(), n, m, k, F32).double()


def assert_close(y, expected, bound, dtype, what):
    assert y.dtype == dtype and y.shape == expected.shape, (what, y.dtype, y.shape)
    err = (y.cpu().double() - expected.cpu().double()).abs().max().item()
    assert err <= RTOL[dtype] * bound, f"{what}: max error {err:.3g} > {RTOL[dtype]} × {bound:.3g}"


def check_case(n, m, dtype, bias, mrows, rows, k, device="cpu", x_lead=(), **launch_kwargs):
    values, indices, dense = sparse_weight(rows, k, n, m, dtype, device)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(*x_lead, mrows, k, generator=gen).to(dtype).to(device)
    b = torch.randn(rows, generator=gen).to(dtype).to(device) if bias else None
    y = sparse_nm.launch(x, values, indices, b, n, m, k, **launch_kwargs)
    x64 = x.cpu().double()
    expected = x64 @ dense.T + (b.cpu().double() if bias else 0)
    bound = (x64.abs() @ dense.abs().T).max().item()
    reference = LINEAR_NM(x, values, indices, b, n, m, k)
    what = f"{n}:{m} {dtype} bias={bias} M={mrows} N={rows} K={k} {launch_kwargs}"
    assert_close(y, expected, bound, dtype, what + " vs float64")
    assert_close(y, reference, bound, dtype, what + " vs reference")


# --------------------------------------------------------------------------- Triton: correctness

# (n, m, dtype, bias, M, N, K): 2:4, 4:8 and 1:4 with fp32 and fp16, with and without bias,
# M = 1 / 3 / 17, N = 24 / 40 (not multiples of the interpreter's BLOCK_N = 32), K a multiple
# of m but not of BLOCK_K = 32 (K = 8: less than one tile); then the other patterns (3-bit
# positions straddle bytes) and bf16 (computed in fp32 when interpreted).
CASES = [
    (2, 4, F32, False, 1, 24, 40),
    (2, 4, F16, True, 17, 40, 72),
    (2, 4, F32, True, 3, 40, 200),
    (2, 4, F16, False, 3, 24, 104),
    (4, 8, F32, True, 17, 24, 72),
    (4, 8, F16, False, 1, 40, 200),
    (4, 8, F16, True, 3, 24, 40),
    (1, 4, F32, False, 17, 40, 104),
    (1, 4, F16, True, 1, 24, 200),
    (1, 4, F32, True, 3, 24, 8),
    (3, 8, F32, False, 3, 40, 72),  # 3 positions a group: chunks of 8 positions span groups
    (7, 8, F16, True, 17, 24, 40),
    (3, 4, F32, False, 1, 40, 72),
    (2, 4, BF16, True, 3, 24, 72),
    (1, 8, BF16, False, 17, 40, 104),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "{}of{}-{}-{}-m{}n{}k{}".format(
    c[0], c[1], str(c[2])[6:], "bias" if c[3] else "nobias", *c[4:]))
def test_matches_reference_and_float64(case):
    check_case(*case)


def test_leading_dims_strided_and_empty_x():
    check_case(2, 4, F32, True, 3, 24, 40, x_lead=(2,))
    values, indices, dense = sparse_weight(24, 64, 2, 4, F32)
    base = torch.randn(2, 3, 128)
    for x in (base[..., :64], base[..., :64].transpose(0, 1), torch.randn(64, 5).T):
        y = sparse_nm.launch(x, values, indices, None, 2, 4, 64)
        assert_close(y, x.double() @ dense.T, (x.double().abs() @ dense.abs().T).max().item(), F32, f"{x.stride()}")
    assert sparse_nm.launch(torch.randn(0, 3, 64), values, indices, None, 2, 4, 64).shape == (0, 3, 24)


def test_a_forced_block_config_runs_and_is_checked():
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)
    check_case(4, 8, F32, False, 17, 40, 72, config=config)
    values, indices, _ = sparse_weight(24, 64, 2, 4, F32)
    with pytest.raises(ValueError, match=r"BLOCK_K must be a power of two ≥ 16, got 8"):
        sparse_nm.launch(torch.randn(2, 64), values, indices, None, 2, 4, 64, config={**config, "BLOCK_K": 8})


def test_bad_arguments_are_clear_errors(monkeypatch):
    values, indices, _ = sparse_weight(24, 64, 2, 4, F32)
    x = torch.randn(2, 64)
    with pytest.raises(TypeError, match=r"values must have the activations' dtype torch.float16"):
        sparse_nm.launch(x.half(), values, indices, None, 2, 4, 64)
    with pytest.raises(TypeError, match=r"x must be one of .*got torch.float64"):
        sparse_nm.launch(x.double(), values.double(), indices, None, 2, 4, 64)
    with pytest.raises(ValueError, match=r"indices must be uint8 \(N, 8\) for 2:4 sparsity of K=64"):
        sparse_nm.launch(x, values, indices[:, :4], None, 2, 4, 64)
    with pytest.raises(ValueError, match=r"m=4 must divide K \(in_features\), got K=62"):
        sparse_nm.launch(x[:, :62], values, indices, None, 2, 4, 62)
    with pytest.raises(ValueError, match=r"m must be one of \(4, 8\), got m=16"):
        torch.ops.memsave.linear_nm_triton(x, values, indices, None, 2, 16, 64)
    with pytest.raises(ValueError, match=r"bias must be \(N,\) = \(24,\)"):
        sparse_nm.launch(x, values, indices, torch.zeros(23), 2, 4, 64)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match=r"x is on cpu; the Triton kernels run on CUDA tensors"):
        sparse_nm.launch(x, values, indices, None, 2, 4, 64)


# --------------------------------------------------------------------------- Triton: source and op


def test_one_source_file_per_spec_written_by_hash(kernel_cache):
    spec = sparse_nm.make_spec(2, 4, True, F16, True)
    text = sparse_nm.render(spec)
    path = mt.source.emit(text)
    assert path.parent == kernel_cache and path.name == f"memsave_triton_{mt.source.source_hash(text)}.py"
    fn, _ = sparse_nm.kernel_for(spec)
    assert type(fn).__name__ == "InterpretedFunction" and sparse_nm.kernel_for(spec)[0] is fn
    specs = {sparse_nm.make_spec(n, m, bias, dtype, False) for n, m in ((2, 4), (4, 8), (1, 4))
             for bias in (False, True) for dtype in (F32, F16, BF16)}
    assert len({sparse_nm.render(s) for s in specs}) == len(specs) == 18


def test_templates_specialize_the_code_and_avoid_jit_helpers():
    src = sparse_nm.render(sparse_nm.make_spec(2, 4, False, BF16, False))
    assert "bias_ptr" not in src and "tl.bfloat16" in src and src.count("tl.where(") == 2
    src = sparse_nm.render(sparse_nm.make_spec(3, 8, True, F32, False))
    assert "bias_ptr" in src and 'input_precision="ieee"' in src and src.count("tl.where(") == 3
    assert "tl.float32" in sparse_nm.render(sparse_nm.make_spec(2, 4, False, BF16, True))  # interpreter: fp32 dots
    for n, m in ((1, 4), (3, 4), (1, 8), (7, 8)):
        source = sparse_nm.render(sparse_nm.make_spec(n, m, True, F16, False))
        code = "\n".join(line.split("#")[0] for line in source.splitlines())  # comments may name them
        for helper in ("tl.zeros", "tl.sum", "tl.cdiv", "tl.static_range", "inline_asm"):
            assert helper not in code, (n, m, helper)
    for config in sparse_nm.block_configs(sparse_nm.make_spec(2, 4, False, F16, False)):
        for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
            assert config[key] >= 16 and config[key] & (config[key] - 1) == 0


def test_opcheck():
    values, indices, _ = sparse_weight(24, 72, 4, 8, F32)
    op = torch.ops.memsave.linear_nm_triton.default
    torch.library.opcheck(op, (torch.randn(2, 3, 72), values, indices, torch.randn(24), 4, 8, 72))
    values, indices, _ = sparse_weight(40, 64, 2, 4, F16)
    torch.library.opcheck(op, (torch.randn(17, 64).half(), values, indices, None, 2, 4, 64))


# --------------------------------------------------------------------------- selection


def _nm_graph(device, dtype, n=2, m=4, rows=64, k=128, constants=True, bias=False, values_dtype=None):
    """A graph calling memsave::linear_nm with fake-tensor metadata on `device`. With
    constants=True, values and indices are get_attr nodes over real CPU buffers (what the
    prune pass makes), their metadata saying `device`."""
    values, indices, _ = sparse_weight(rows, k, n, m, values_dtype or dtype)
    graph = fx.Graph()
    x = graph.placeholder("x")
    if constants:
        root = torch.nn.Module()
        root.register_buffer("values", values)
        root.register_buffer("indices", indices)
        v, i = graph.get_attr("values"), graph.get_attr("indices")
    else:
        root = torch.nn.Module()
        v, i = graph.placeholder("values"), graph.placeholder("indices")
    b = graph.placeholder("bias") if bias else None
    out = graph.call_function(LINEAR_NM, (x, v, i, b, n, m, k))
    graph.output(out)
    gm = fx.GraphModule(root, graph)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        vals = {
            x: torch.empty(3, k, dtype=dtype, device=device),
            v: torch.empty(values.shape, dtype=values.dtype, device=device),
            i: torch.empty(indices.shape, dtype=torch.uint8, device=device),
        }
        if b is not None:
            vals[b] = torch.empty(rows, dtype=dtype, device=device)
        for node, val in vals.items():
            node.meta["val"] = val
        out.meta["val"] = torch.empty(3, rows, dtype=dtype, device=device)
    return gm


def _call(gm):
    return next(n for n in gm.graph.nodes if n.op == "call_function")


def test_register_is_idempotent_and_semi_structured_comes_first(registry):
    mt.register()
    mt.register()
    names = [k.name for k in kernels.kernels_for(LINEAR_NM)]
    # memsave's native CPU kernels (exact and bf16-narrowed) are registered by the backend; they
    # apply to CPU activations only, so their place beside the CUDA kernels does not matter.
    assert names.count("native-nm") == 1 and names.count("native-nm-bf16") == 1
    cuda = [k for k in kernels.kernels_for(LINEAR_NM) if not k.name.startswith("native-")]
    assert [k.name for k in cuda] == [semi.KERNEL_NAME, sparse_nm.KERNEL_NAME]
    triton_kernel = cuda[1]
    assert triton_kernel.op is torch.ops.memsave.linear_nm_triton.default  # schema checked on registration


def test_triton_applies_only_to_supported_cuda_nodes():
    # Fake CUDA tensors need no GPU: the predicate reads only metadata.
    assert sparse_nm.applies(_call(_nm_graph("cuda", F16)))
    assert sparse_nm.applies(_call(_nm_graph("cuda", F32, n=3, m=8, constants=False)))
    assert not sparse_nm.applies(_call(_nm_graph("cpu", F16)))
    assert not sparse_nm.applies(_call(_nm_graph("cuda", torch.float64)))
    assert not sparse_nm.applies(_call(_nm_graph("cuda", F16, values_dtype=F32)))


def test_select_kernels_retargets_cuda_nodes_to_triton(registry):
    mt.register()
    gm = _nm_graph("cuda", F32)  # fp32: not for sparse tensor cores
    chosen = kernels.select_kernels(gm)
    assert _call(gm).target is torch.ops.memsave.linear_nm_triton.default
    assert _call(gm).meta[kernels.KERNEL_TAG] == sparse_nm.KERNEL_NAME and chosen == {sparse_nm.KERNEL_NAME: 1}


# --------------------------------------------------------------------------- semi-structured 2:4


@pytest.fixture
def sm80(monkeypatch):
    """Pretend the (fake) CUDA device is an sm80+ GPU."""
    monkeypatch.setattr(semi, "_sm80_or_later", lambda device: True)


def test_semi_structured_applies_to_constant_2_4_fp16_bf16_nodes(sm80):
    assert semi.applies(_call(_nm_graph("cuda", F16)))
    assert semi.applies(_call(_nm_graph("cuda", BF16, bias=True)))
    assert not semi.applies(_call(_nm_graph("cuda", F32)))  # fp32: Triton's
    assert not semi.applies(_call(_nm_graph("cuda", F16, n=4, m=8)))
    assert not semi.applies(_call(_nm_graph("cuda", F16, n=1, m=4)))
    assert not semi.applies(_call(_nm_graph("cuda", F16, constants=False)))  # values computed at run time
    assert not semi.applies(_call(_nm_graph("cpu", F16)))
    assert not semi.applies(_call(_nm_graph("cuda", F16, rows=24)))  # N not a multiple of the tile
    assert not semi.applies(_call(_nm_graph("cuda", F16, k=72)))


def test_semi_structured_needs_sm80():
    assert not semi.applies(_call(_nm_graph("cuda", F16)))  # no GPU here: capability unknown


@pytest.fixture
def stub_conversion(monkeypatch):
    """CPU stand-ins for torch's 2:4 compression: the 'packed' buffer is the dense weight."""
    calls = []

    def to_semi(dense, backend):
        calls.append(backend)
        return dense.clone(), torch.zeros(1, dtype=torch.int16)

    monkeypatch.setattr(semi, "to_semi_structured", to_semi)
    monkeypatch.setattr(semi, "from_semi_structured", lambda packed, meta, backend, n, k: packed.clone())
    return calls


def test_semi_structured_lowering_rewrites_the_node(sm80, stub_conversion, registry):
    mt.register()
    gm = _nm_graph("cuda", F16, bias=True)
    values, indices = gm.values, gm.indices
    chosen = kernels.select_kernels(gm)
    assert chosen == {semi.KERNEL_NAME: 1} and stub_conversion == [semi.default_backend()]
    node = _call(gm)
    assert node.target is torch.ops.memsave.linear_semi_structured.default
    x, packed, meta, bias, backend, out_features, in_features = node.args
    assert (backend, out_features, in_features) == (semi.default_backend(), 64, 128)
    assert bias.op == "placeholder" and packed.op == meta.op == "get_attr"
    assert torch.equal(getattr(gm, packed.target), unpack_nm(values, indices, 2, 4, 128, F16))
    assert not hasattr(gm, "values") and not hasattr(gm, "indices")  # the old constants are dropped
    assert node.meta["val"].shape == (3, 64) and node.meta[kernels.KERNEL_TAG] == semi.KERNEL_NAME


def test_semi_structured_conversion_keeps_one_copy_in_the_weight_cache(stub_conversion):
    weight = torch.randn(64, 128).half()
    keep = nm_keep_mask(weight.float().abs(), 2, 4)
    values = WEIGHTS.get_or_build(weight, ("test_prune", "values"), lambda: pack_nm(weight, keep, 2, 4)[0])
    indices = WEIGHTS.get_or_build(weight, ("test_prune", "indices"), lambda: pack_nm(weight, keep, 2, 4)[1])
    form = semi.converted(values, indices, 128, "cutlass")
    assert semi.converted(values, indices, 128, "cutlass") is form and stub_conversion == ["cutlass"]  # built once
    # The separate entries were given up for the converted form and come back from it exactly.
    never = lambda: pytest.fail("rebuilt from the weight")  # noqa: E731
    again_values = WEIGHTS.get_or_build(weight, ("test_prune", "values"), never)
    again_indices = WEIGHTS.get_or_build(weight, ("test_prune", "indices"), never)
    assert torch.equal(again_values, values) and torch.equal(again_indices, indices)
    # Values not from the cache: converted directly, nothing cached.
    loose = pack_nm(weight, keep, 2, 4)
    assert torch.equal(semi.converted(*loose, 128, "cutlass")[0], form[0]) and len(stub_conversion) == 2


def test_semi_structured_conversion_gives_up_a_tuple_entry_too(stub_conversion):
    # How the prune pass caches its result: (values, indices, sqnr) under one key.
    weight = torch.randn(64, 128).half()
    keep = nm_keep_mask(weight.float().abs(), 2, 4)
    key = ("test_prune", "2:4")
    values, indices, sqnr = WEIGHTS.get_or_build(weight, key, lambda: (*pack_nm(weight, keep, 2, 4), 12.5))
    semi.converted(values, indices, 128, "cutlass")
    again = WEIGHTS.get_or_build(weight, key, lambda: pytest.fail("rebuilt from the weight"))
    assert again[0] is not values and len(again) == 3 and again[2] == 12.5
    assert torch.equal(again[0], values) and torch.equal(again[1], indices)
    # A later compile gets the rebuilt pair, which is converted already: no second conversion.
    semi.converted(again[0], again[1], 128, "cutlass")
    assert stub_conversion == ["cutlass"]


def test_semi_structured_shape_limits_follow_torch():
    assert semi.shape_supported("cusparselt", F16, 64, 128)
    assert semi.shape_supported("cutlass", BF16, 64, 128)
    assert not semi.shape_supported("cutlass", F16, 64, 96)  # CUTLASS wants K % 64
    assert not semi.shape_supported("cusparselt", F32, 64, 128)  # cuSPARSELt: no fp32
    with pytest.raises(ValueError, match=r"backend must be one of \('cusparselt', 'cutlass'\), got 'cusp'"):
        semi.shape_supported("cusp", F16, 64, 128)


# --------------------------------------------------------------------------- GPU


GPU_CASES = [(2, 4, F16, True), (2, 4, BF16, False), (4, 8, F16, False), (1, 4, F32, True), (3, 8, BF16, True)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"{c[0]}of{c[1]}-{str(c[2])[6:]}")
def test_compiled_triton_kernel_matches_on_cuda_every_config(case):
    n, m, dtype, bias = case
    if dtype == BF16 and torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("bf16 tl.dot needs sm80+")
    rows, k = 200, 1000  # K not a multiple of any BLOCK_K, N not a multiple of any BLOCK_N
    spec = sparse_nm.make_spec(n, m, bias, dtype, False)
    for mrows in (1, 100):
        for config in sparse_nm.block_configs(spec):
            check_case(n, m, dtype, bias, mrows, rows, k, device="cuda", config=config)
        check_case(n, m, dtype, bias, mrows, rows, k, device="cuda")  # autotuned


def _require_sm80():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("2:4 sparse tensor cores need sm80+")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, BF16])
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_semi_structured_op_matches_on_cuda(dtype, backend):
    _require_sm80()
    if backend == "cusparselt" and not torch.backends.cusparselt.is_available():
        pytest.skip("no cuSPARSELt in this build")
    rows, k = 256, 512
    values, indices, dense = sparse_weight(rows, k, 2, 4, dtype, device="cuda")
    packed, meta = semi.to_semi_structured(unpack_nm(values, indices, 2, 4, k, dtype), backend)
    # The conversion is exact both ways, so the cache can rebuild values and positions from it.
    back = semi.from_semi_structured(packed, meta, backend, rows, k)
    assert torch.equal(back, unpack_nm(values, indices, 2, 4, k, dtype))
    x = torch.randn(2, 7, k, device="cuda", dtype=dtype)  # rows not a multiple of the tile
    bias = torch.randn(rows, device="cuda", dtype=dtype)
    y = torch.ops.memsave.linear_semi_structured(x, packed, meta, bias, backend, rows, k)
    x64 = x.cpu().double()
    expected = x64 @ dense.T + bias.cpu().double()
    assert_close(y, expected, (x64.abs() @ dense.abs().T).max().item(), dtype, f"semi-structured {backend} {dtype}")


@pytest.mark.gpu
def test_selected_semi_structured_kernel_runs_on_cuda(registry):
    _require_sm80()
    mt.register()
    rows, k = 128, 256
    values, indices, dense = sparse_weight(rows, k, 2, 4, F16, device="cuda")

    class Pruned(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("values", values)
            self.register_buffer("indices", indices)

        def forward(self, x):
            return LINEAR_NM(x, self.values, self.indices, None, 2, 4, k)

    gm = fx.symbolic_trace(Pruned())
    x = torch.randn(5, k, device="cuda", dtype=F16)
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    FakeTensorProp(gm, FakeTensorMode(allow_non_fake_inputs=True)).propagate(x)
    assert kernels.select_kernels(gm) == {semi.KERNEL_NAME: 1}
    expected = x.cpu().double() @ dense.T
    bound = (x.cpu().double().abs() @ dense.abs().T).max().item()
    assert_close(gm(x), expected, bound, F16, "selected semi-structured kernel")
    compiled = torch.compile(gm, fullgraph=True)  # Inductor calls the op as an extern kernel
    assert_close(compiled(x), expected, bound, F16, "compiled")
