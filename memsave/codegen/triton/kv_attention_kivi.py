"""Triton kernel for memsave::attention_kivi: attention that reads a KIVI-layout 4- or 2-bit cache.

The layout is ops/kv_lowbit.py's: keys packed per token (`8 / bits` codes per byte, low bits
first) with an fp16 scale and minimum per (group of K_GROUP tokens, channel), the newest,
incomplete key group in an fp16 window; values packed the same way with an fp16 scale and
minimum per (token, group of V_GROUP channels). The kernel is kv_attention.py's int8 kernel with
another tile read: one program per (batch, query head, BLOCK_T query rows) loops over the cache
in BLOCK_L tokens, loads the tile's bytes, scales and minima, unpacks and dequantizes them in
registers (code · scale + minimum, fp32), takes the tokens of the incomplete group from the
window instead, and folds the scores into an online softmax. Nothing dequantized is written to
memory. Grouped-query heads, strided inputs, masks, the unread tail a mask hides and the empty
row (0) are handled as in the int8 kernel, whose block choice it shares.

`length` (the tokens written, which places the window) is read from device memory by the
kernel: no host sync inside a decode step.

Registration as kv_attention.py's: the twin `memsave::attention_kivi_triton` (every device, so
it runs on CPU tensors under TRITON_INTERPRET=1), offered to codegen for CUDA nodes, and the
CUDA kernel of memsave::attention_kivi itself. Tested on CPU under TRITON_INTERPRET=1 only
(tests/test_kv_attention_kivi_triton.py), and compiled for sm_90 without a GPU
(tests/test_triton_compile_sm90.py); not run or timed on a GPU yet.
"""

from __future__ import annotations

import torch
from torch import fx

import memsave.ops  # noqa: F401  (defines memsave::attention_kivi, which the twin copies)
from memsave.codegen.oplib import TRITON_DISPATCH, twin
from memsave.codegen.triton import source
from memsave.codegen.triton.kv_attention import (
    SUPPORTED_DTYPES,
    TILE_HELPERS,
    _mask_4d,
    cache_kernel_applies,
    check_launch,
    choose_blocks,
    query_and_output,
    register_cache_kernel,
    triton_cdiv,
)

KERNEL_NAME = "triton-attention-kivi"

_SOURCE = TILE_HELPERS + '''
@triton.jit
def attention_kivi(
    q_ptr, kp_ptr, ks_ptr, km_ptr, kw_ptr, len_ptr, vp_ptr, vs_ptr, vm_ptr, m_ptr, o_ptr,
    H_Q, REP, T, L, D, DV, scale,
    sq_b, sq_h, sq_t, sq_d,
    skp_b, skp_h, skp_l, skp_d,
    sks_b, sks_h, sks_g, sks_d,
    skw_b, skw_h, skw_l, skw_d,
    svp_b, svp_h, svp_l, svp_d,
    svs_b, svs_h, svs_l, svs_g,
    sm_b, sm_h, sm_t, sm_l,
    so_b, so_h, so_t, so_d,
    BITS: tl.constexpr, K_GROUP: tl.constexpr, V_GROUP: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    PER_BYTE: tl.constexpr = 8 // BITS
    CODE_MASK: tl.constexpr = (1 << BITS) - 1
    b, h, hk, rows, row_ok, ds, d_ok, dvs, dv_ok = _program(H_Q, REP, T, D, DV, BLOCK_T, BLOCK_D, BLOCK_DV)
    k_shift = (ds % PER_BYTE) * BITS  # where channel d's code sits in its byte
    v_shift = (dvs % PER_BYTE) * BITS
    current = tl.load(len_ptr) // K_GROUP * K_GROUP  # the window's first token

    q = _load_q(q_ptr + b * sq_b + h * sq_h, rows, row_ok, ds, d_ok, sq_t, sq_d, scale)
    kp_base = kp_ptr + b * skp_b + hk * skp_h
    ks_base = ks_ptr + b * sks_b + hk * sks_h  # the keys' minima share the scales' strides
    km_base = km_ptr + b * sks_b + hk * sks_h
    kw_base = kw_ptr + b * skw_b + hk * skw_h
    vp_base = vp_ptr + b * svp_b + hk * svp_h
    vs_base = vs_ptr + b * svs_b + hk * svs_h  # the values' minima too
    vm_base = vm_ptr + b * svs_b + hk * svs_h
    m_base = m_ptr + b * sm_b + h * sm_h

    run_max = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    run_sum = tl.full((BLOCK_T,), 0.0, tl.float32)
    acc = tl.full((BLOCK_T, BLOCK_DV), 0.0, tl.float32)
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        col_ok = cols < L
        bias = 0.0
        col_live = col_ok
        if HAS_MASK:
            bias, col_live = _tile_mask(m_base, rows, cols, sm_t, sm_l, row_ok[:, None] & col_ok[None, :], MASK_BOOL)
        k_live = col_live[:, None] & d_ok[None, :]
        kb = tl.load(kp_base + cols[:, None] * skp_l + (ds // PER_BYTE)[None, :] * skp_d, mask=k_live, other=0)
        kcode = (kb.to(tl.int32) >> k_shift[None, :]) & CODE_MASK
        k_at = (cols // K_GROUP)[:, None] * sks_g + ds[None, :] * sks_d
        ksc = tl.load(ks_base + k_at, mask=k_live, other=0.0).to(tl.float32)
        kmn = tl.load(km_base + k_at, mask=k_live, other=0.0).to(tl.float32)
        k = kcode.to(tl.float32) * ksc + kmn  # (BL, BD) dequantized, in registers only
        in_window = (cols >= current) & (cols < current + K_GROUP)
        kw = tl.load(kw_base + (cols - current)[:, None] * skw_l + ds[None, :] * skw_d,
                     mask=k_live & in_window[:, None], other=0.0).to(tl.float32)
        k = tl.where(in_window[:, None], kw, k)
        scores = _tile_scores(q, k, bias, col_ok, HAS_MASK, USE_DOT)
        v_live = col_live[:, None] & dv_ok[None, :]
        vb = tl.load(vp_base + cols[:, None] * svp_l + (dvs // PER_BYTE)[None, :] * svp_d, mask=v_live, other=0)
        vcode = (vb.to(tl.int32) >> v_shift[None, :]) & CODE_MASK
        v_at = cols[:, None] * svs_l + (dvs // V_GROUP)[None, :] * svs_g
        vsc = tl.load(vs_base + v_at, mask=v_live, other=0.0).to(tl.float32)
        vmn = tl.load(vm_base + v_at, mask=v_live, other=0.0).to(tl.float32)
        v = vcode.to(tl.float32) * vsc + vmn  # (BL, BDV)
        run_max, run_sum, acc = _fold(scores, v, run_max, run_sum, acc, USE_DOT)
    _store_rows(o_ptr + b * so_b + h * so_h, acc, run_sum, rows, row_ok, dvs, dv_ok, so_t, so_d)
'''


def _kernels(interpret: bool):
    return source.load_kernels("KIVI-KV attention", _SOURCE, interpret)


def attention_kivi_triton(q, k_packed, k_scale, k_min, k_window, length, v_packed, v_scale, v_min, attn_mask, scale,
                          bits, k_group, v_group, *, blocks=None):
    """memsave::attention_kivi on Triton: on CUDA tensors, or any device under TRITON_INTERPRET=1.

    `blocks` (tests only) overrides kv_attention.choose_blocks."""
    from memsave.ops.kv_cache import check_heads
    from memsave.ops.kv_lowbit import LOWBIT_BITS

    interpret = check_launch(q, "attention_kivi")
    if bits not in LOWBIT_BITS:
        raise ValueError(f"triton attention_kivi: bits must be one of {LOWBIT_BITS}, got {bits!r}")
    b, hq, t, d = q.shape
    h_kv, length_cap = k_packed.shape[1], k_packed.shape[2]
    check_heads(hq, h_kv)
    dv = v_scale.shape[-1] * v_group
    if k_scale.shape != k_min.shape or v_scale.shape != v_min.shape or k_scale.shape[-1] != d:
        raise ValueError(f"memsave: attention_kivi shapes do not agree: q {tuple(q.shape)}, k_scale "
                         f"{tuple(k_scale.shape)}, k_min {tuple(k_min.shape)}, v_scale {tuple(v_scale.shape)}, "
                         f"v_min {tuple(v_min.shape)}")
    # Minima are read through their scales' strides: contiguous both (the cache's own layout: no copy).
    k_scale, k_min, v_scale, v_min = (x.contiguous() for x in (k_scale, k_min, v_scale, v_min))
    if interpret:  # fp16 arithmetic is wrong there (FIELD-NOTES): the fp16 parts in fp32
        k_scale, k_min, v_scale, v_min, k_window = (x.float() for x in (k_scale, k_min, v_scale, v_min, k_window))
    qk, out = query_and_output(q, dv, interpret)
    mask = _mask_4d(attn_mask, (b, hq, t, length_cap))
    if out.numel():
        cfg = dict(blocks) if blocks is not None else choose_blocks(t, d, dv, interpret)
        m_arg, m_strides = (mask, mask.stride()) if mask is not None else (k_scale, (0, 0, 0, 0))
        grid = (b * hq, triton_cdiv(t, cfg["BLOCK_T"]))
        _kernels(interpret).attention_kivi[grid](
            qk, k_packed, k_scale, k_min, k_window, length.reshape(1), v_packed, v_scale, v_min, m_arg, out,
            hq, hq // h_kv, t, length_cap, d, dv, float(scale),
            *qk.stride(), *k_packed.stride(), *k_scale.stride(), *k_window.stride(), *v_packed.stride(),
            *v_scale.stride(), *m_strides, *out.stride(),
            BITS=bits, K_GROUP=k_group, V_GROUP=v_group,
            HAS_MASK=mask is not None, MASK_BOOL=mask is not None and mask.dtype == torch.uint8, **cfg,
        )
    return out.to(q.dtype)


attention_kivi_triton_op = twin(
    torch.ops.memsave.attention_kivi.default, "attention_kivi_triton", attention_kivi_triton,
    dispatch_key=TRITON_DISPATCH,
)


def _cuda_kernel(q, k_packed, k_scale, k_min, k_window, length, v_packed, v_scale, v_min, attn_mask, scale, bits,
                 k_group, v_group):
    """memsave::attention_kivi's CUDA kernel: the Triton kernel (the op's torch tile loop where
    Triton is not installed or q's dtype is not one the kernel takes)."""
    from memsave.codegen.triton import triton_available
    from memsave.ops.kv_lowbit import attention_kivi_tiles

    args = (q, k_packed, k_scale, k_min, k_window, length, v_packed, v_scale, v_min, attn_mask, scale, bits, k_group,
            v_group)
    if not triton_available() or q.dtype not in SUPPORTED_DTYPES:
        return attention_kivi_tiles(*args)
    return attention_kivi_triton(*args)


torch.library.register_kernel("memsave::attention_kivi", "cuda", _cuda_kernel)


def applies(node: fx.Node) -> bool:
    """CUDA inputs: q of a supported dtype, uint8 codes on the same device."""
    return cache_kernel_applies(node, ("k_packed", "v_packed"), torch.uint8)


def register() -> None:
    """Offer the kernel for memsave::attention_kivi nodes to codegen (idempotent)."""
    register_cache_kernel(torch.ops.memsave.attention_kivi.default, KERNEL_NAME,
                          torch.ops.memsave.attention_kivi_triton.default, applies)
