"""The int8-KV attention Triton kernel (memsave/codegen/triton/kv_attention.py) against
memsave::attention_int8_kv's plain reference, under TRITON_INTERPRET=1 at small awkward shapes
(L never a multiple of the block; decode T = 1 and a short prompt; grouped-query heads; no mask,
a bool mask hiding a static cache's tail, a float additive mask). GPU tests (marked gpu) run the
compiled kernel, through the op's CUDA dispatch."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")  # imported before TRITON_INTERPRET is set

import torch  # noqa: E402

import memsave.ops  # noqa: E402, F401
from memsave.codegen.triton import kv_attention  # noqa: E402
from memsave.ops.kv_cache import attention_int8_kv_reference, quantize_kv_int8  # noqa: E402

pytestmark = pytest.mark.usefixtures("triton_env")
ATOL = 1e-5


def _problem(b=2, h_kv=1, rep=1, t=1, length=37, d=16, dv=None, *, mask=None, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    dv = dv or d
    q = torch.randn(b, h_kv * rep, t, d, generator=g).to(device, dtype)
    k_codes, k_scale = quantize_kv_int8(torch.randn(b, h_kv, length, d, generator=g))
    v_codes, v_scale = quantize_kv_int8(torch.randn(b, h_kv, length, dv, generator=g))
    if mask == "bool":  # causal over the last t positions of `used`, then an unused tail (static cache)
        used = length - 11
        pos = torch.arange(length)
        attn_mask = pos[None, :] <= (used - t + torch.arange(t))[:, None]  # (T, L)
    elif mask == "float":  # (B, 1, T, L) additive, a few -inf
        attn_mask = torch.randn(b, 1, t, length, generator=g)
        attn_mask[..., ::5] = float("-inf")
    else:
        attn_mask = None
    args = [q, k_codes, k_scale, v_codes, v_scale, attn_mask]
    args = [a.to(device) if a is not None and a is not q else a for a in args]
    return (*args, d**-0.5)


@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("h_kv, rep, t, d", [(2, 1, 1, 16), (1, 4, 1, 32), (1, 4, 5, 16), (2, 1, 5, 32)])
def test_matches_the_reference(h_kv, rep, t, d, mask):
    args = _problem(h_kv=h_kv, rep=rep, t=t, d=d, mask=mask)
    got = kv_attention.attention_int8_kv_triton(*args)
    torch.testing.assert_close(got, attention_int8_kv_reference(*args), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_dot_path_matches_the_reference(mask):
    # tl.dot path: forced at T = 5 (rows padded to 16) and chosen at T = 18 (two row blocks).
    args = _problem(b=1, h_kv=1, rep=2, t=5, length=21, d=16, dv=32, mask=mask)
    blocks = dict(BLOCK_T=16, BLOCK_L=16, BLOCK_D=16, BLOCK_DV=32, USE_DOT=True)
    got = kv_attention.attention_int8_kv_triton(*args, blocks=blocks)
    torch.testing.assert_close(got, attention_int8_kv_reference(*args), atol=ATOL, rtol=1e-5)
    assert kv_attention.choose_blocks(18, 16, 16, interpret=True)["USE_DOT"]
    args = _problem(b=1, h_kv=1, rep=1, t=18, length=29, d=16, mask=mask)
    got = kv_attention.attention_int8_kv_triton(*args)
    torch.testing.assert_close(got, attention_int8_kv_reference(*args), atol=ATOL, rtol=1e-5)


def test_equals_the_op_and_keeps_its_dtype():
    args = _problem(h_kv=2, rep=2, t=3, length=19, d=16, mask="bool")
    torch.testing.assert_close(kv_attention.attention_int8_kv_triton(*args), torch.ops.memsave.attention_int8_kv(*args),
                               atol=ATOL, rtol=1e-5)
    args16 = (args[0].to(torch.bfloat16), *args[1:])
    got = kv_attention.attention_int8_kv_triton(*args16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, attention_int8_kv_reference(*args16))


def test_strided_cache_and_broadcast_masks_are_read_in_place():
    # A slice of a longer (static) cache, and masks of every rank that broadcasts.
    q, k_codes, k_scale, v_codes, v_scale, _, scale = _problem(b=2, h_kv=2, rep=2, t=2, length=40, d=16)
    kc, ks, vc, vs = k_codes[:, :, :23], k_scale[:, :, :23], v_codes[:, :, :23], v_scale[:, :, :23]
    assert not kc.is_contiguous()
    for m in (torch.arange(23) < 17, (torch.arange(23) < 20).expand(2, 23), torch.zeros(2, 4, 1, 23)):
        args = (q, kc, ks, vc, vs, m, scale)
        torch.testing.assert_close(kv_attention.attention_int8_kv_triton(*args), attention_int8_kv_reference(*args),
                                   atol=ATOL, rtol=1e-5)


def test_a_row_that_sees_no_key_is_nan_as_the_op():
    # As memsave::attention_int8_kv: 0/0. (F.scaled_dot_product_attention, the plain reference,
    # gives 0 there in recent torch; the kernel follows the op it replaces.)
    args = list(_problem(h_kv=1, rep=2, t=2, length=20, d=16))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1] = False  # the second query row sees nothing
    args[5] = mask
    got = kv_attention.attention_int8_kv_triton(*args)
    want = torch.ops.memsave.attention_int8_kv(*args)
    assert got[:, :, 1].isnan().all() and want[:, :, 1].isnan().all()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5, equal_nan=True)
    args[5] = torch.where(mask, 0.0, float("-inf"))
    torch.testing.assert_close(kv_attention.attention_int8_kv_triton(*args), want, atol=ATOL, rtol=1e-5, equal_nan=True)


def test_custom_op_has_the_reference_schema_and_fake():
    ref = torch.ops.memsave.attention_int8_kv.default._schema.arguments
    tri = torch.ops.memsave.attention_int8_kv_triton.default._schema.arguments
    assert [(a.name, str(a.type)) for a in ref] == [(a.name, str(a.type)) for a in tri]
    args = _problem(h_kv=1, rep=2, t=1, length=9, d=16, mask="bool")
    torch.library.opcheck(torch.ops.memsave.attention_int8_kv_triton.default, args)


def test_cpu_op_stays_plain_torch():
    # The Triton kernel is the op's CUDA kernel only: on CPU the op runs without Triton.
    args = _problem(h_kv=1, rep=2, t=1, length=9, d=16)
    from memsave.codegen.triton import kv_attention as mod

    calls = []
    original = mod.attention_int8_kv_triton
    mod.attention_int8_kv_triton = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        torch.ops.memsave.attention_int8_kv(*args)
    finally:
        mod.attention_int8_kv_triton = original
    assert not calls


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t, mask", [(1, "bool"), (1, None), (5, "float"), (70, "bool")])
def test_gpu_op_runs_the_kernel_and_matches(dtype, t, mask):
    args = _problem(b=2, h_kv=2, rep=4, t=t, length=300, d=64, mask=mask, device="cuda", dtype=dtype)
    from memsave.codegen.triton import kv_attention as mod

    calls = []
    original = mod.attention_int8_kv_triton
    mod.attention_int8_kv_triton = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        got = torch.ops.memsave.attention_int8_kv(*args)  # dispatches to the Triton kernel on CUDA
    finally:
        mod.attention_int8_kv_triton = original
    assert calls and got.dtype == dtype
    want = attention_int8_kv_reference(*args)
    tol = dict(atol=ATOL, rtol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tol)
