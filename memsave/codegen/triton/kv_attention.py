"""Triton kernel for memsave::attention_int8_kv: attention that reads an int8 KV cache tile by tile.

One program per (batch, query head, BLOCK_T query rows): it loops over the cache in BLOCK_L
tokens, loads the int8 codes and fp32 per-token scales of that tile, dequantizes them in
registers, forms the (BLOCK_T, BLOCK_L) scores and folds them into an online softmax (running
max and sum) and an fp32 accumulator. No dequantized key or value is ever written to memory,
not even one tile. Query head h reads kv head h // (H_q / H_kv) (grouped-query attention, as
HF's repeat_kv). Every tensor is read through its strides: a slice of a static cache, or a
mask broadcast to (B, H_q, T, L) by `expand`, is never copied. With a mask, the codes of tokens
it hides from every row of the block (a static cache's unused tail) are not read (masked loads).

Scores and p·v: tl.dot (IEEE fp32) for several query rows, padded to BLOCK_T >= 16 (tl.dot needs
every dim >= 16); for decode (T = 1) a broadcast multiply-and-sum over (1, BLOCK_L, D) instead.
Everything is fp32 (q is upcast, as the reference op does); the output is cast to q's dtype.

Same semantics as the op in memsave/ops/kv_cache.py, including its edge case: a query row that
sees no key at all (all masked, or L = 0) gives 0, as the op and F.scaled_dot_product_attention do.

Registration, as chunked_ce.py does: `memsave::attention_int8_kv_triton`, a twin of the op
(same schema and fake) whose kernel is for every device (TRITON_DISPATCH, so it also runs on CPU
tensors under TRITON_INTERPRET=1), offered to codegen by `register()` for CUDA nodes; and, when
this module is imported, the Triton implementation as the CUDA kernel of memsave::attention_int8_kv
itself, so that the eager op on CUDA tensors runs the kernel (the CPU kernel stays plain torch).
Tested on CPU under TRITON_INTERPRET=1 (tests/test_kv_attention_triton.py).
"""

from __future__ import annotations

import torch
from torch import fx

import memsave.ops  # noqa: F401  (defines memsave::attention_int8_kv, which the twin copies)
from memsave.codegen.oplib import TRITON_DISPATCH, twin
from memsave.codegen.triton import source
from memsave.codegen.triton.launcher import interpreting

KERNEL_NAME = "triton-attention-int8-kv"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DOT_MIN = 16  # tl.dot needs every dim >= 16
# Untuned (no GPU at hand when written): fp32 tiles, so BLOCK_L is kept small; decode uses BLOCK_T = 1.
GPU_BLOCKS = {"BLOCK_T": 64, "BLOCK_L": 32, "num_warps": 4}
INTERPRET_BLOCKS = {"BLOCK_T": 16, "BLOCK_L": 16}

# The kernels; source.load_kernels puts source.REDUCE_PREAMBLE (imports, _add, _max) before them.
# What both cache kernels share (this one and kv_attention_kivi.py's): the mask's bias for a
# tile and which of its tokens any row reads, the scores, the online-softmax fold and the final
# store. Small @triton.jit functions, inlined by the compiler.
TILE_HELPERS = '''
@triton.jit
def _tile_mask(m_base, rows, cols, sm_t, sm_l, tile_ok, MASK_BOOL: tl.constexpr):
    """(additive bias, the columns some row attends to) of one tile of a mask."""
    mvals = tl.load(m_base + rows[:, None] * sm_t + cols[None, :] * sm_l, mask=tile_ok, other=0)
    if MASK_BOOL:
        allowed = tile_ok & (mvals != 0)
        bias = tl.where(allowed, 0.0, float("-inf"))
    else:
        bias = tl.where(tile_ok, mvals.to(tl.float32), float("-inf"))
        allowed = bias > float("-inf")
    # A token no row of the block attends to (a static cache's unused tail) is not read:
    # masked loads, no branch (a branch around the tile makes ptxas spill the fp32 dots).
    return bias, tl.reduce(allowed.to(tl.int32), 0, _max) > 0


@triton.jit
def _tile_scores(q, k, bias, col_ok, HAS_MASK: tl.constexpr, USE_DOT: tl.constexpr):
    if USE_DOT:
        scores = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BT, BL)
    else:
        scores = tl.reduce(q[:, None, :] * k[None, :, :], 2, _add)  # (BT, BL)
    if HAS_MASK:
        return scores + bias
    return tl.where(col_ok[None, :], scores, float("-inf"))


@triton.jit
def _fold(scores, v, run_max, run_sum, acc, USE_DOT: tl.constexpr):
    """One tile folded into the running max, sum and accumulator (online softmax)."""
    new_max = tl.maximum(run_max, tl.reduce(scores, 1, _max))
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows nothing reached yet
    p = tl.exp(scores - shift[:, None])  # 0 where masked, so unread tokens add nothing
    correction = tl.exp(run_max - shift)
    run_sum = run_sum * correction + tl.reduce(p, 1, _add)
    if USE_DOT:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.reduce(p[:, :, None] * v[None, :, :], 1, _add)
    return new_max, run_sum, acc * correction[:, None] + pv


@triton.jit
def _store_rows(o_ptr, acc, run_sum, rows, row_ok, dvs, dv_ok, so_t, so_d):
    # A row nothing reached has acc = 0 and sum = 0: 0, as the op and SDPA give (so do padding rows).
    out = acc / tl.where(row_ok & (run_sum > 0), run_sum, 1.0)[:, None]
    tl.store(o_ptr + rows[:, None] * so_t + dvs[None, :] * so_d, out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit
def _program(H_Q, REP, T, D, DV, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """This program's batch, query head, kv head (grouped-query: h // REP), query rows and
    head-dimension ranges, with their bounds."""
    bh = tl.program_id(0)
    b = (bh // H_Q).to(tl.int64)
    h = bh % H_Q
    hk = (h // REP).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    ds = tl.arange(0, BLOCK_D)
    dvs = tl.arange(0, BLOCK_DV)
    return b, h.to(tl.int64), hk, rows, rows < T, ds, ds < D, dvs, dvs < DV


@triton.jit
def _load_q(q_ptr, rows, row_ok, ds, d_ok, sq_t, sq_d, scale):
    q = tl.load(q_ptr + rows[:, None] * sq_t + ds[None, :] * sq_d, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    return q.to(tl.float32) * scale  # (BT, BD), as the ops: q.float() * scale
'''

_SOURCE = TILE_HELPERS + '''
@triton.jit
def attention_int8_kv(
    q_ptr, kc_ptr, ks_ptr, vc_ptr, vs_ptr, m_ptr, o_ptr,
    H_Q, REP, T, L, D, DV, scale,
    sq_b, sq_h, sq_t, sq_d,
    skc_b, skc_h, skc_l, skc_d,
    sks_b, sks_h, sks_l,
    svc_b, svc_h, svc_l, svc_d,
    svs_b, svs_h, svs_l,
    sm_b, sm_h, sm_t, sm_l,
    so_b, so_h, so_t, so_d,
    HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, USE_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b, h, hk, rows, row_ok, ds, d_ok, dvs, dv_ok = _program(H_Q, REP, T, D, DV, BLOCK_T, BLOCK_D, BLOCK_DV)
    q = _load_q(q_ptr + b * sq_b + h * sq_h, rows, row_ok, ds, d_ok, sq_t, sq_d, scale)
    kc_base = kc_ptr + b * skc_b + hk * skc_h
    ks_base = ks_ptr + b * sks_b + hk * sks_h
    vc_base = vc_ptr + b * svc_b + hk * svc_h
    vs_base = vs_ptr + b * svs_b + hk * svs_h
    m_base = m_ptr + b * sm_b + h * sm_h

    run_max = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    run_sum = tl.full((BLOCK_T,), 0.0, tl.float32)
    acc = tl.full((BLOCK_T, BLOCK_DV), 0.0, tl.float32)
    for l0 in range(0, L, BLOCK_L):
        cols = l0 + tl.arange(0, BLOCK_L)
        col_ok = cols < L
        bias = 0.0  # (a jit function cannot return a scalar here and a tile with a mask)
        col_live = col_ok  # the columns whose codes are read
        if HAS_MASK:
            bias, col_live = _tile_mask(m_base, rows, cols, sm_t, sm_l, row_ok[:, None] & col_ok[None, :], MASK_BOOL)
        kc = tl.load(kc_base + cols[:, None] * skc_l + ds[None, :] * skc_d,
                     mask=col_live[:, None] & d_ok[None, :], other=0)
        ksc = tl.load(ks_base + cols * sks_l, mask=col_live, other=0.0)
        k = kc.to(tl.float32) * ksc[:, None]  # (BL, BD) dequantized, in registers only
        scores = _tile_scores(q, k, bias, col_ok, HAS_MASK, USE_DOT)
        vc = tl.load(vc_base + cols[:, None] * svc_l + dvs[None, :] * svc_d,
                     mask=col_live[:, None] & dv_ok[None, :], other=0)
        vsc = tl.load(vs_base + cols * svs_l, mask=col_live, other=0.0)
        v = vc.to(tl.float32) * vsc[:, None]  # (BL, BDV)
        run_max, run_sum, acc = _fold(scores, v, run_max, run_sum, acc, USE_DOT)
    _store_rows(o_ptr + b * so_b + h * so_h, acc, run_sum, rows, row_ok, dvs, dv_ok, so_t, so_d)
'''


def _kernels(interpret: bool):
    return source.load_kernels("int8-KV attention", _SOURCE, interpret)


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def choose_blocks(t: int, d: int, dv: int, interpret: bool) -> dict:
    """Block sizes and the score path for T query rows of head dims d (keys) and dv (values).

    Decode (T = 1): a broadcast multiply-and-sum over (1, BLOCK_L, D), no padding of the row.
    Several rows: tl.dot, the rows padded to at least 16 (tl.dot needs every dim >= 16). The
    same choice under the interpreter (where the dot is also the fast path: tl.reduce with a
    combine function runs element by element there).
    """
    blocks = dict(INTERPRET_BLOCKS if interpret else GPU_BLOCKS)
    block_d, block_dv = _pow2(d), _pow2(dv)
    use_dot = t > 1
    if use_dot:
        blocks["BLOCK_T"] = min(blocks["BLOCK_T"], max(DOT_MIN, _pow2(t)))
        block_d, block_dv = max(DOT_MIN, block_d), max(DOT_MIN, block_dv)
    else:
        blocks["BLOCK_T"] = 1
    if not interpret and max(block_d, block_dv) > 64:
        blocks["num_warps"] = 8  # (BLOCK_T, D) and (BLOCK_L, D) fp32 tiles in registers
    if not interpret and max(block_d, block_dv) > 128:
        blocks["BLOCK_L"] = 16
    return dict(blocks, BLOCK_D=block_d, BLOCK_DV=block_dv, USE_DOT=use_dot)


def _mask_4d(attn_mask: torch.Tensor | None, shape: tuple[int, int, int, int]):
    """The mask as a (B, H_q, T, L) view (broadcast dims stride 0, never copied), or None."""
    if attn_mask is None:
        return None
    m = attn_mask if attn_mask.dtype in (torch.bool, torch.float32) else attn_mask.float()  # before expanding
    if m.dim() > 4:
        raise ValueError(f"memsave: attn_mask of shape {tuple(m.shape)} does not broadcast to {shape}")
    while m.dim() < 4:
        m = m.unsqueeze(0)
    try:
        m = m.expand(shape)
    except RuntimeError as e:
        raise ValueError(f"memsave: attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to {shape}") from e
    if m.dtype == torch.bool:
        m = m.view(torch.uint8)  # same bytes; Triton loads it as 0 / 1
    return m


def attention_int8_kv_triton(q, k_codes, k_scale, v_codes, v_scale, attn_mask, scale, *, blocks=None):
    """memsave::attention_int8_kv on Triton: on CUDA tensors, or any device under TRITON_INTERPRET=1.

    `blocks` (tests only) overrides `choose_blocks`: BLOCK_T, BLOCK_L, BLOCK_D, BLOCK_DV, USE_DOT.
    """
    from memsave.ops.kv_cache import _check

    _check(q, k_codes, k_scale, v_codes, v_scale)
    interpret = check_launch(q, "attention_int8_kv")
    if k_codes.dtype != torch.int8 or v_codes.dtype != torch.int8:
        raise TypeError(f"triton attention_int8_kv: codes must be int8, got {k_codes.dtype}, {v_codes.dtype}")
    b, hq, t, d = q.shape
    h_kv, length, dv = k_codes.shape[1], k_codes.shape[2], v_codes.shape[-1]
    if (k_codes.shape[0], k_codes.shape[-1]) != (b, d) or v_codes.shape[:3] != k_codes.shape[:3]:
        raise ValueError(f"memsave: attention_int8_kv shapes do not agree: q {tuple(q.shape)}, "
                         f"k_codes {tuple(k_codes.shape)}, v_codes {tuple(v_codes.shape)}")
    mask = _mask_4d(attn_mask, (b, hq, t, length))
    k_scale, v_scale = k_scale.float(), v_scale.float()  # no copy when fp32 already (the op's layout)
    qk, out = query_and_output(q, dv, interpret)
    if out.numel():
        cfg = dict(blocks) if blocks is not None else choose_blocks(t, d, dv, interpret)
        m_arg, m_strides = (mask, mask.stride()) if mask is not None else (k_scale, (0, 0, 0, 0))
        grid = (b * hq, triton_cdiv(t, cfg["BLOCK_T"]))
        _kernels(interpret).attention_int8_kv[grid](
            qk, k_codes, k_scale, v_codes, v_scale, m_arg, out,
            hq, hq // h_kv, t, length, d, dv, float(scale),
            *qk.stride(), *k_codes.stride(), *k_scale.stride(), *v_codes.stride(), *v_scale.stride(),
            *m_strides, *out.stride(),
            HAS_MASK=mask is not None, MASK_BOOL=mask is not None and mask.dtype == torch.uint8, **cfg,
        )
    return out.to(q.dtype)


def check_launch(q: torch.Tensor, who: str) -> bool:
    """Whether the kernel runs interpreted; a clear error where it cannot run at all."""
    interpret = interpreting()
    if q.device.type != "cuda" and not interpret:
        raise RuntimeError(f"triton {who}: inputs are on {q.device}; the kernel runs on CUDA (or under TRITON_INTERPRET=1)")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton {who}: q must be one of {SUPPORTED_DTYPES}, got {q.dtype}")
    return interpret


def query_and_output(q: torch.Tensor, dv: int, interpret: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(q as the kernel reads it, the (B, H_q, T, Dv) output it writes)."""
    b, hq, t, _ = q.shape
    if interpret:  # under the interpreter bf16/fp16 arithmetic is wrong (FIELD-NOTES): fp32 in and out
        return q.float(), torch.empty((b, hq, t, dv), dtype=torch.float32, device=q.device)
    return q, torch.empty((b, hq, t, dv), dtype=q.dtype, device=q.device)


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# The twin of the reference op (codegen/oplib.py): its schema and fake kernel, every device.
attention_int8_kv_triton_op = twin(
    torch.ops.memsave.attention_int8_kv.default, "attention_int8_kv_triton", attention_int8_kv_triton,
    dispatch_key=TRITON_DISPATCH,
)


def _cuda_kernel(q, k_codes, k_scale, v_codes, v_scale, attn_mask, scale):
    """memsave::attention_int8_kv's CUDA kernel: the Triton kernel (the op's own tile loop where
    Triton is not installed or q's dtype is not one the kernel takes)."""
    from memsave.codegen.triton import triton_available
    from memsave.ops.kv_cache import attention_int8_kv_tiles

    if not triton_available() or q.dtype not in SUPPORTED_DTYPES:
        return attention_int8_kv_tiles(q, k_codes, k_scale, v_codes, v_scale, attn_mask, scale)
    return attention_int8_kv_triton(q, k_codes, k_scale, v_codes, v_scale, attn_mask, scale)


# The Triton kernel is the op's CUDA kernel from this module's (one) import on.
torch.library.register_kernel("memsave::attention_int8_kv", "cuda", _cuda_kernel)


def applies(node: fx.Node) -> bool:
    """CUDA inputs: q of a supported dtype, int8 codes on the same device."""
    return cache_kernel_applies(node, ("k_codes", "v_codes"), torch.int8)


def cache_kernel_applies(node: fx.Node, codes: tuple[str, ...], code_dtype: torch.dtype) -> bool:
    """Whether a cache-attention node's inputs suit a Triton kernel here: q on CUDA, of a
    supported dtype, the `codes` arguments of `code_dtype` on the same device, Triton present."""
    from memsave.codegen.triton import triton_available
    from memsave.graph.meta import arg_val, op_arg

    q, *stored = (arg_val(op_arg(node, name)) for name in ("q", *codes))
    if not all(isinstance(x, torch.Tensor) for x in (q, *stored)):
        return False
    if q.device.type != "cuda" or q.dtype not in SUPPORTED_DTYPES:
        return False
    if any(x.device != q.device or x.dtype != code_dtype for x in stored):
        return False
    return triton_available()


def register() -> None:
    """Offer the kernel for memsave::attention_int8_kv nodes to codegen (idempotent)."""
    register_cache_kernel(torch.ops.memsave.attention_int8_kv.default, KERNEL_NAME,
                          torch.ops.memsave.attention_int8_kv_triton.default, applies)


def register_cache_kernel(op, name: str, twin_op, applies_to) -> None:
    from memsave.codegen.kernels import Kernel, register_kernel

    register_kernel(op, Kernel.retarget(name, twin_op, applies_to))
