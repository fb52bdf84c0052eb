"""Triton kernels for memsave::linear_cross_entropy(_backward): the LM-head loss with no logits in memory.

Forward (one program per BLOCK_M tokens): sweep the vocabulary in BLOCK_N tiles, compute each
tile of logits h·Wᵀ in registers (K loop over the hidden size), and fold it into an online
log-sum-exp (running max and sum) and the target's logit. Only lse (N,) and the per-token loss
(N,) are written: no (N, V) buffer at all, not even one chunk (Cut Cross-Entropy's approach).

Backward (one program per (BLOCK_M tokens, BLOCK_N vocab) tile): recompute the logits tile,
form d = scale · (softmax − onehot), and add d·W into grad_hidden and dᵀ·h into grad_weight
with fp32 atomics (the tiles of one row or one vocab entry come from different programs).

Same schemas as the reference ops (memsave/ops/chunked_ce.py), so codegen swaps them by
retargeting the node (`register()`); chunk_size is ignored (nothing is chunk-sized here).
Logits are rounded to the inputs' dtype, as F.linear returns them, before the fp32 softmax.
fp32 inputs use IEEE fp32 dots (not TF32), so results match the reference to fp32 rounding.
Tested on CPU under TRITON_INTERPRET=1 (tests/test_chunk_triton.py); used only on CUDA.
"""

from __future__ import annotations

import torch
import torch.fx as fx

import memsave.ops  # noqa: F401  (the reference ops the twins copy)
from memsave.codegen.oplib import TRITON_DISPATCH, twin
from memsave.codegen.triton import source
from memsave.codegen.triton.launcher import interpreting

KERNEL_NAME = "triton-linear-cross-entropy"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GPU_BLOCKS = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, num_warps=4)
INTERPRET_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)  # tl.dot needs every dim >= 16

# The kernels; source.load_kernels puts source.REDUCE_PREAMBLE (imports, _add, _max) before them.
_SOURCE = '''
@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                 HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # (BM, BN) logits, in registers
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        a = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * stride_w + ks[:, None], mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if IEEE:
            acc += tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(a, b)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    # Round as F.linear's output would be rounded, then do the softmax in fp32.
    return acc.to(h_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def lce_forward(h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, loss_ptr, M, V, H, stride_h, stride_w, ignore_index,
                HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=ignore_index)
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sum = tl.full((BLOCK_M,), 0.0, tl.float32)
    picked = tl.full((BLOCK_M,), 0.0, tl.float32)
    for n0 in range(0, V, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < V
        logits = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                              HAS_BIAS, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.reduce(logits, 1, _max))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.reduce(tl.exp(logits - new_max[:, None]), 1, _add)
        run_max = new_max
        picked += tl.reduce(tl.where(cols[None, :] == labels[:, None], logits, 0.0), 1, _add)
    lse = run_max + tl.log(run_sum)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(loss_ptr + rows, tl.where(labels != ignore_index, lse - picked, 0.0), mask=row_ok)


@triton.jit
def lce_backward(h_ptr, w_ptr, b_ptr, labels_ptr, lse_ptr, scale_ptr, gh_ptr, gw_ptr, gb_ptr,
                 M, V, H, stride_h, stride_w,
                 HAS_BIAS: tl.constexpr, NEED_H: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                 IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < V
    logits = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, stride_h, stride_w,
                          HAS_BIAS, IEEE, BLOCK_M, BLOCK_N, BLOCK_K)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)  # 0 on ignored tokens
    d = tl.exp(logits - lse[:, None]) - (cols[None, :] == labels[:, None]).to(tl.float32)
    d = tl.where(row_ok[:, None] & col_ok[None, :], d * scale[:, None], 0.0)  # (BM, BN) d loss / d logits
    d = d.to(h_ptr.dtype.element_ty)  # the reference's gradient of the logits is in the inputs' dtype
    if NEED_B:
        tl.atomic_add(gb_ptr + cols, tl.reduce(d.to(tl.float32), 0, _add), mask=col_ok)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        if NEED_H:
            w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE:
                part = tl.dot(d.to(tl.float32), w.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(d, w)
            tl.atomic_add(gh_ptr + rows[:, None] * H + ks[None, :], part, mask=row_ok[:, None] & k_ok[None, :])
        if NEED_W:
            h = tl.load(h_ptr + rows[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if IEEE:
                part = tl.dot(tl.trans(d.to(tl.float32)), h.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(tl.trans(d), h)
            tl.atomic_add(gw_ptr + cols[:, None] * H + ks[None, :], part, mask=col_ok[:, None] & k_ok[None, :])
'''


def _kernels(interpret: bool):
    return source.load_kernels("fused linear cross-entropy", _SOURCE, interpret)


def _setup(hidden: torch.Tensor, weight: torch.Tensor, who: str):
    interpret = interpreting()
    if hidden.device.type != "cuda" and not interpret:
        raise RuntimeError(f"triton {who}: inputs are on {hidden.device}; the kernel runs on CUDA (or under TRITON_INTERPRET=1)")
    if hidden.dtype not in SUPPORTED_DTYPES or weight.dtype != hidden.dtype:
        raise TypeError(f"triton {who}: hidden and weight must share one of {SUPPORTED_DTYPES}, got {hidden.dtype}, {weight.dtype}")
    # Under the interpreter bf16 arithmetic is wrong (FIELD-NOTES): dots in fp32 there.
    ieee = hidden.dtype == torch.float32 or interpret
    blocks = INTERPRET_BLOCKS if interpret else GPU_BLOCKS
    return _kernels(interpret), hidden.contiguous(), weight.contiguous(), ieee, blocks


def forward(hidden, weight, bias, labels, ignore_index, reduction, chunk_size, upcast):
    """memsave::linear_cross_entropy on Triton (chunk_size is not needed: no logits are stored)."""
    from memsave.ops.chunked_ce import _acc_dtype, _out_dtype, _reduce

    module, h, w, ieee, blocks = _setup(hidden, weight, "linear_cross_entropy")
    n, hid = h.shape
    vocab = w.shape[0]
    lse = torch.empty(n, dtype=torch.float32, device=h.device)  # (N,)
    rows = torch.empty(n, dtype=torch.float32, device=h.device)  # (N,) per-token loss
    if n:
        grid = (triton_cdiv(n, blocks["BLOCK_M"]),)
        module.lce_forward[grid](
            h, w, bias if bias is not None else h, labels.contiguous(), lse, rows, n, vocab, hid,
            h.stride(0), w.stride(0), ignore_index, HAS_BIAS=bias is not None, IEEE=ieee, **blocks,
        )
    loss = _reduce(rows, labels != ignore_index, reduction).to(_out_dtype(hidden, upcast))
    return loss, lse.to(_acc_dtype(hidden))


def backward(grad_loss, hidden, weight, bias, labels, lse, ignore_index, reduction, chunk_size, needs):
    """memsave::linear_cross_entropy_backward on Triton."""
    from memsave.ops.chunked_ce import _row_scale

    module, h, w, ieee, blocks = _setup(hidden, weight, "linear_cross_entropy_backward")
    need_h, need_w, need_b = needs
    n, hid = h.shape
    vocab = w.shape[0]
    scale = _row_scale(grad_loss, labels != ignore_index, reduction).float().contiguous()  # (N,)
    # fp32 accumulators for the atomics; cast to the inputs' dtypes at the end.
    gh = torch.zeros((n, hid) if need_h else (1, 1), dtype=torch.float32, device=h.device)
    gw = torch.zeros((vocab, hid) if need_w else (1, 1), dtype=torch.float32, device=h.device)
    gb = torch.zeros(vocab if need_b else 1, dtype=torch.float32, device=h.device)
    if n and (need_h or need_w or need_b):
        grid = (triton_cdiv(n, blocks["BLOCK_M"]), triton_cdiv(vocab, blocks["BLOCK_N"]))
        module.lce_backward[grid](
            h, w, bias if bias is not None else h, labels.contiguous(), lse.float().contiguous(), scale, gh, gw, gb,
            n, vocab, hid, h.stride(0), w.stride(0), HAS_BIAS=bias is not None, NEED_H=need_h, NEED_W=need_w,
            NEED_B=need_b, IEEE=ieee, **blocks,
        )
    return (
        gh.to(hidden.dtype) if need_h else hidden.new_empty(0),
        gw.to(weight.dtype) if need_w else hidden.new_empty(0),
        gb.to(bias.dtype) if need_b else hidden.new_empty(0),
    )


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


# Twins of the reference ops (codegen/oplib.py): their schemas and fake kernels.
linear_cross_entropy_triton = twin(
    torch.ops.memsave.linear_cross_entropy.default, "linear_cross_entropy_triton", forward, dispatch_key=TRITON_DISPATCH
)
linear_cross_entropy_backward_triton = twin(
    torch.ops.memsave.linear_cross_entropy_backward.default, "linear_cross_entropy_backward_triton", backward,
    dispatch_key=TRITON_DISPATCH,
)


def applies(node: fx.Node) -> bool:
    """CUDA inputs of a supported dtype (bf16 dots need sm80+)."""
    from memsave.codegen.triton import _has_bf16_dot, triton_available

    forward_op = node.target is torch.ops.memsave.linear_cross_entropy.default
    hidden, weight = (node.args[0], node.args[1]) if forward_op else (node.args[1], node.args[2])
    h, w = hidden.meta.get("val"), weight.meta.get("val")
    if not (isinstance(h, torch.Tensor) and isinstance(w, torch.Tensor)):
        return False
    if h.device.type != "cuda" or w.device != h.device or h.dtype not in SUPPORTED_DTYPES or w.dtype != h.dtype:
        return False
    if h.dtype == torch.bfloat16 and not _has_bf16_dot(h.device):
        return False
    return triton_available()


def register() -> None:
    """Offer the kernels for memsave::linear_cross_entropy and its backward (idempotent)."""
    from memsave.codegen.kernels import Kernel, register_kernel

    register_kernel(
        torch.ops.memsave.linear_cross_entropy.default,
        Kernel.retarget(KERNEL_NAME, torch.ops.memsave.linear_cross_entropy_triton.default, applies),
    )
    register_kernel(
        torch.ops.memsave.linear_cross_entropy_backward.default,
        Kernel.retarget(KERNEL_NAME + "-backward", torch.ops.memsave.linear_cross_entropy_backward_triton.default, applies),
    )
