"""The KIVI-layout attention Triton kernel (memsave/codegen/triton/kv_attention_kivi.py) against
memsave::attention_kivi's plain reference, under TRITON_INTERPRET=1 at small awkward shapes:
4 and 2 bits, the window's group partly written or empty, decode and several rows, grouped-query
heads, no mask / a bool mask hiding a static cache's tail / a float additive mask, a strided
slice of a longer cache. GPU tests (marked gpu) run the compiled kernel through the op's CUDA
dispatch."""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")  # imported before TRITON_INTERPRET is set

import torch

import memsave.ops  # noqa: F401
from memsave.codegen.triton import kv_attention_kivi
from memsave.ops.kv_lowbit import attention_kivi_reference

pytestmark = pytest.mark.usefixtures("triton_env")
ATOL = 1e-5
K_GROUP, V_GROUP = 8, 8  # small groups: several groups and a window in a short cache


def _problem(b=2, h_kv=1, rep=1, t=1, length=40, written=29, d=16, bits=4, *, mask=None, device="cpu",
             dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, h_kv * rep, t, d, generator=g).to(device, dtype)
    k = torch.randn(b, h_kv, length, d, generator=g) * torch.linspace(0.2, 3, d)  # outlier-ish channels
    v = torch.randn(b, h_kv, length, d, generator=g)
    k_packed, k_scale, k_min = torch.ops.memsave.quantize_kv_channels(k, bits, K_GROUP)
    v_packed, v_scale, v_min = torch.ops.memsave.quantize_kv_tokens(v, bits, V_GROUP)
    current = written // K_GROUP * K_GROUP
    window = torch.zeros(b, h_kv, K_GROUP, d, dtype=torch.float16)
    window[:, :, : written - current] = k[:, :, current:written].half()
    if mask == "bool":  # causal over the last t written positions, the unwritten tail hidden
        pos = torch.arange(length)
        attn_mask = pos[None, :] <= (written - t + torch.arange(t))[:, None]  # (T, L)
    elif mask == "float":
        attn_mask = torch.randn(b, 1, t, length, generator=g)
        attn_mask[..., ::5] = float("-inf")
    else:
        attn_mask = None
    cache = [k_packed, k_scale, k_min, window, torch.tensor(written), v_packed, v_scale, v_min]
    cache = [x.to(device) for x in cache]
    return (q, *cache, None if attn_mask is None else attn_mask.to(device), d**-0.5, bits, K_GROUP, V_GROUP)


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
@pytest.mark.parametrize("h_kv, rep, t, d, written", [(2, 1, 1, 16, 29), (1, 4, 1, 32, 32), (1, 4, 5, 16, 37),
                                                      (2, 1, 5, 32, 21)])
def test_matches_the_reference(h_kv, rep, t, d, written, mask, bits):
    args = _problem(h_kv=h_kv, rep=rep, t=t, d=d, written=written, bits=bits, mask=mask)
    got = kv_attention_kivi.attention_kivi_triton(*args)
    torch.testing.assert_close(got, attention_kivi_reference(*args), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(got, torch.ops.memsave.attention_kivi(*args), atol=ATOL, rtol=1e-5)


def test_the_window_is_read_not_the_codes():
    """Tokens of the incomplete group come from the fp16 window: change the window, the output
    follows the reference; the codes under it are stale by design (rewritten each step)."""
    args = list(_problem(rep=2, t=1, written=30, mask="bool"))
    args[4] = args[4] + 1.5  # the window's keys (a different fp16 value for tokens 24..29)
    got = kv_attention_kivi.attention_kivi_triton(*args)
    torch.testing.assert_close(got, attention_kivi_reference(*args), atol=ATOL, rtol=1e-5)
    before = kv_attention_kivi.attention_kivi_triton(*_problem(rep=2, t=1, written=30, mask="bool"))
    assert (got - before).abs().max() > 1e-3


@pytest.mark.parametrize("mask", [None, "bool"])
def test_both_score_paths_and_several_row_blocks(mask):
    args = _problem(b=1, h_kv=1, rep=2, t=5, length=24, written=19, d=16, mask=mask)
    want = attention_kivi_reference(*args)
    blocks = {"BLOCK_T": 8, "BLOCK_L": 8, "BLOCK_D": 16, "BLOCK_DV": 16, "USE_DOT": False}
    torch.testing.assert_close(kv_attention_kivi.attention_kivi_triton(*args, blocks=blocks), want, atol=ATOL,
                               rtol=1e-5)
    args = _problem(b=1, h_kv=1, rep=1, t=18, length=32, written=27, d=16, mask=mask)  # T = 18 > BLOCK_T = 16
    torch.testing.assert_close(kv_attention_kivi.attention_kivi_triton(*args), attention_kivi_reference(*args),
                               atol=ATOL, rtol=1e-5)


def test_strided_cache_slice_and_dtype():
    q, kp, ks, km, kw, n, vp, vs, vm, _, scale, bits, kg, vg = _problem(b=2, h_kv=2, rep=2, t=2, length=48, written=21)
    sliced = (kp[:, :, :24], ks[:, :, :3], km[:, :, :3], kw, n, vp[:, :, :24], vs[:, :, :24], vm[:, :, :24])
    assert not sliced[0].is_contiguous()
    args = (q, *sliced, (torch.arange(24) < 21)[None], scale, bits, kg, vg)
    torch.testing.assert_close(kv_attention_kivi.attention_kivi_triton(*args), attention_kivi_reference(*args),
                               atol=ATOL, rtol=1e-5)
    args16 = (q.to(torch.bfloat16), *args[1:])
    got = kv_attention_kivi.attention_kivi_triton(*args16)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, attention_kivi_reference(*args16))


def test_op_schema_cpu_dispatch_and_registration(monkeypatch):
    from memsave.codegen.kernels import _KERNELS

    ref = torch.ops.memsave.attention_kivi.default._schema.arguments
    tri = torch.ops.memsave.attention_kivi_triton.default._schema.arguments
    assert [(a.name, str(a.type)) for a in ref] == [(a.name, str(a.type)) for a in tri]
    torch.library.opcheck(torch.ops.memsave.attention_kivi_triton.default, _problem(rep=2, mask="bool"))
    calls = []
    original = kv_attention_kivi.attention_kivi_triton
    monkeypatch.setattr(kv_attention_kivi, "attention_kivi_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.ops.memsave.attention_kivi(*_problem())  # on CPU the op runs its torch tile loop
    assert not calls
    assert torch._C._dispatch_has_kernel_for_dispatch_key("memsave::attention_kivi", "CUDA")
    kv_attention_kivi.register()
    kv_attention_kivi.register()
    names = [k.name for k in _KERNELS[torch.ops.memsave.attention_kivi.default]]
    assert names.count(kv_attention_kivi.KERNEL_NAME) == 1


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t, d, mask", [(1, 64, "bool"), (1, 128, None), (5, 64, "float"), (70, 128, "bool")])
def test_gpu_op_runs_the_kernel_and_matches(monkeypatch, bits, dtype, t, d, mask):
    calls = []
    original = kv_attention_kivi.attention_kivi_triton
    monkeypatch.setattr(kv_attention_kivi, "attention_kivi_triton", lambda *a, **k: calls.append(1) or original(*a, **k))
    args = _problem(b=2, h_kv=2, rep=4, t=t, length=320, written=300, d=d, bits=bits, mask=mask, device="cuda",
                    dtype=dtype)
    got = torch.ops.memsave.attention_kivi(*args)
    assert calls and got.dtype == dtype and got.is_cuda
    tol = {"atol": ATOL, "rtol": 1e-5} if dtype == torch.float32 else {}
    torch.testing.assert_close(got, attention_kivi_reference(*args), **tol)
