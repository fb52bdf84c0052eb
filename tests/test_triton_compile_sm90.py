"""Hand-written Triton kernels compile for a GPU without one: Triton's own compiler and the
ptxas it ships lower them to an sm_90 cubin here (the interpreter, which the other tests use,
accepts code a GPU compile rejects). The KV-cache attention kernels, decode (broadcast scores, a
bool mask) and several rows (tl.dot, no mask), for int8 and both KIVI widths; the fused linear
cross-entropy's forward and backward in bf16, with and without a bias, at the GPU block sizes."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from memsave.codegen.triton import chunked_ce, kv_attention, kv_attention_kivi  # noqa: E402

VARIANTS = [(False, 1, True), (True, 64, False)]  # (USE_DOT, BLOCK_T, HAS_MASK with a bool mask)


def _cubin_bytes(fn, pointers: dict[str, str], constexprs: dict) -> int:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        else:  # sizes, strides, the softmax scale
            signature[name] = "fp32" if name == "scale" else "i64" if name.startswith("s") else "i32"
    source = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()})
    try:
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    except RuntimeError as error:  # a Triton without its NVIDIA backend's tools
        if "ptxas" in str(error) and "not found" in str(error):
            pytest.skip(f"no ptxas: {error}")
        raise
    return len(kernel.asm["cubin"])


@pytest.fixture
def compiled_mode(monkeypatch, kernel_cache):
    monkeypatch.setenv("MEMSAVE_TRITON_CACHE", str(kernel_cache))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.usefixtures("compiled_mode")
@pytest.mark.parametrize("use_dot, block_t, has_mask", VARIANTS)
def test_int8_kernel_compiles_for_sm90(use_dot, block_t, has_mask):
    fn = kv_attention._kernels(False).attention_int8_kv
    pointers = dict(q_ptr="*bf16", kc_ptr="*i8", ks_ptr="*fp32", vc_ptr="*i8", vs_ptr="*fp32",
                    m_ptr="*u8" if has_mask else "*fp32", o_ptr="*bf16")
    constexprs = dict(HAS_MASK=has_mask, MASK_BOOL=has_mask, USE_DOT=use_dot, BLOCK_T=block_t, BLOCK_L=32,
                      BLOCK_D=64, BLOCK_DV=64)
    assert _cubin_bytes(fn, pointers, constexprs) > 0


@pytest.mark.usefixtures("compiled_mode")
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("use_dot, block_t, has_mask", VARIANTS)
def test_kivi_kernel_compiles_for_sm90(bits, use_dot, block_t, has_mask):
    fn = kv_attention_kivi._kernels(False).attention_kivi
    pointers = dict(q_ptr="*bf16", kp_ptr="*u8", ks_ptr="*fp16", km_ptr="*fp16", kw_ptr="*fp16", len_ptr="*i64",
                    vp_ptr="*u8", vs_ptr="*fp16", vm_ptr="*fp16", m_ptr="*u8" if has_mask else "*fp32", o_ptr="*bf16")
    constexprs = dict(BITS=bits, K_GROUP=32, V_GROUP=64, HAS_MASK=has_mask, MASK_BOOL=has_mask, USE_DOT=use_dot,
                      BLOCK_T=block_t, BLOCK_L=32, BLOCK_D=64, BLOCK_DV=64)
    assert _cubin_bytes(fn, pointers, constexprs) > 0


@pytest.mark.usefixtures("compiled_mode")
@pytest.mark.parametrize("has_bias", [False, True])
def test_linear_cross_entropy_kernels_compile_for_sm90(has_bias):
    module = chunked_ce._kernels(False)
    blocks = {k: v for k, v in chunked_ce.GPU_BLOCKS.items() if k.startswith("BLOCK")}
    common = dict(h_ptr="*bf16", w_ptr="*bf16", b_ptr="*bf16", labels_ptr="*i64", lse_ptr="*fp32")
    forward = dict(common, loss_ptr="*fp32")
    assert _cubin_bytes(module.lce_forward, forward, dict(HAS_BIAS=has_bias, IEEE=False, **blocks)) > 0
    backward = dict(common, scale_ptr="*fp32", gh_ptr="*fp32", gw_ptr="*fp32", gb_ptr="*fp32")
    flags = dict(HAS_BIAS=has_bias, NEED_H=True, NEED_W=True, NEED_B=has_bias, IEEE=False, **blocks)
    assert _cubin_bytes(module.lce_backward, backward, flags) > 0
