"""The int8-KV attention Triton kernel (memsave/codegen/triton/kv_attention.py) against
memsave::attention_int8_kv's plain reference, under TRITON_INTERPRET=1 at small awkward shapes
(L never a multiple of the block; decode T = 1 and a short prompt; grouped-query heads; no mask,
a bool mask hiding a static cache's tail, a float additive mask). GPU tests (marked gpu) run the
compiled kernel, through the op's CUDA dispatch."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")  # imported before TRITON_INTERPRET is set

import torch

import memsave.ops  # noqa: F401
from memsave.codegen.triton import kv_attention
from memsave.ops.kv_cache import attention_int8_kv_reference, quantize_kv_int8

pytestmark = pytest.mark.usefixtures("triton_env")
ATOL = 1e-5


def _problem(b=2, h_kv=1, rep=1, t=1, length=37, d=16, dv=None, *, mask=None, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    dv = dv or d
    q = torch.randn(b, h_kv * rep, t, d, generator=g).to(device, dtype)
    k_codes, k_scale = quantize_kv_int8(torch.randn(b, h_kv, length, d, generator=g))
    v_codes, v_scale = quantize_kv_int8(torch.randn(b, h_kv, length, dv, generator=g))
    if mask == "bool":  # causal over the last t positions of `used`, then an unused tail (static cache)
        used = length - min(11, length // 3)
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
def test_both_score_paths_at_other_shapes(mask):
    # The broadcast path (chosen for T = 1) forced at T = 5, and D != D_v, on the dot path too.
    args = _problem(b=1, h_kv=1, rep=2, t=5, length=21, d=16, dv=32, mask=mask)
    want = attention_int8_kv_reference(*args)
    assert kv_attention.choose_blocks(5, 16, 32, interpret=True)["USE_DOT"]
    torch.testing.assert_close(kv_attention.attention_int8_kv_triton(*args), want, atol=ATOL, rtol=1e-5)
    blocks = {"BLOCK_T": 8, "BLOCK_L": 8, "BLOCK_D": 16, "BLOCK_DV": 32, "USE_DOT": False}
    got = kv_attention.attention_int8_kv_triton(*args, blocks=blocks)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    # Two row blocks (T = 18 > BLOCK_T = 16).
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
    for m in ((torch.arange(23) < 17)[None], (torch.arange(23) < 20).expand(2, 23), torch.zeros(2, 4, 1, 23)):
        args = (q, kc, ks, vc, vs, m, scale)
        torch.testing.assert_close(kv_attention.attention_int8_kv_triton(*args), attention_int8_kv_reference(*args),
                                   atol=ATOL, rtol=1e-5)


def test_a_row_that_sees_no_key_is_zero_as_the_op_and_sdpa():
    args = list(_problem(h_kv=1, rep=2, t=2, length=20, d=16))
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1] = False  # the second query row sees nothing
    args[5] = mask
    got = kv_attention.attention_int8_kv_triton(*args)
    want = torch.ops.memsave.attention_int8_kv(*args)
    assert not got[:, :, 1].any() and not want[:, :, 1].any()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(want, attention_int8_kv_reference(*args), atol=ATOL, rtol=1e-5)
    args[5] = torch.where(mask, 0.0, float("-inf"))
    torch.testing.assert_close(kv_attention.attention_int8_kv_triton(*args), want, atol=ATOL, rtol=1e-5)


def test_custom_op_has_the_reference_schema_and_fake():
    ref = torch.ops.memsave.attention_int8_kv.default._schema.arguments
    tri = torch.ops.memsave.attention_int8_kv_triton.default._schema.arguments
    assert [(a.name, str(a.type)) for a in ref] == [(a.name, str(a.type)) for a in tri]
    args = _problem(h_kv=1, rep=2, t=1, length=9, d=16, mask="bool")
    torch.library.opcheck(torch.ops.memsave.attention_int8_kv_triton.default, args)


def _count_kernel_calls(monkeypatch) -> list:
    calls = []
    original = kv_attention.attention_int8_kv_triton
    monkeypatch.setattr(kv_attention, "attention_int8_kv_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def test_cpu_op_stays_plain_torch(monkeypatch):
    # The Triton kernel is the op's CUDA kernel only: on CPU the op runs its plain torch.
    calls = _count_kernel_calls(monkeypatch)
    args = _problem(h_kv=1, rep=2, t=1, length=9, d=16)
    torch.ops.memsave.attention_int8_kv(*args)
    assert not calls
    assert torch._C._dispatch_has_kernel_for_dispatch_key("memsave::attention_int8_kv", "CUDA")


def test_register_offers_the_twin_to_codegen():
    from memsave.codegen.kernels import _KERNELS

    kv_attention.register()
    kv_attention.register()  # idempotent
    names = [k.name for k in _KERNELS[torch.ops.memsave.attention_int8_kv.default]]
    assert names.count(kv_attention.KERNEL_NAME) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t, d, mask", [(1, 64, "bool"), (1, 128, None), (5, 64, "float"), (70, 128, "bool"),
                                        (17, 256, None)])
def test_gpu_op_runs_the_kernel_and_matches(monkeypatch, dtype, t, d, mask):
    calls = _count_kernel_calls(monkeypatch)
    args = _problem(b=2, h_kv=2, rep=4, t=t, length=300, d=d, mask=mask, device="cuda", dtype=dtype)
    got = torch.ops.memsave.attention_int8_kv(*args)  # dispatches to the Triton kernel on CUDA
    assert calls and got.dtype == dtype and got.is_cuda
    want = attention_int8_kv_reference(*args)
    tol = {"atol": ATOL, "rtol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tol)
