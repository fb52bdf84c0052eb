"""A key/value cache stored in int8, and attention that reads it tile by tile.

Layout (one cache layer): codes `(B, H_kv, L, D)` int8 and scales `(B, H_kv, L)` fp32, one
scale per token and head (symmetric absmax / 127): int8 per token, as torchao's int8 KV cache
and KIVI's value side. With D = 64 that is 1 + 4/64 bytes per element, 0.266x fp32.

- `memsave::quantize_kv_int8(x)` -> (codes, scale): new keys or values, (B, H_kv, T, D).
- `memsave::dequantize_kv_int8(codes, scale, dtype)`: the whole cache in `dtype`; what the
  cache layer returns to an attention that is not compiled by memsave (eager), and what the
  compile pass (passes/dynamo/fuse_kv_attention.py) folds into the attention op below.
- `memsave::attention_int8_kv(q, k_codes, k_scale, v_codes, v_scale, attn_mask, scale)`:
  scaled-dot-product attention of q (B, H_q, T, D) over the cache, H_q a multiple of H_kv
  (grouped-query attention: kv head j serves q heads j·r … j·r + r − 1, as HF's repeat_kv).
  It dequantizes a tile of tokens at a time (`tile_tokens`: its keys within 512 KiB, its scores
  within 2 MiB) and folds it into an online softmax (`online_attention`: running max and sum),
  so a step never holds the dequantized cache: its working memory is one tile. Tiles the mask
  hides entirely (a static cache's unused tail, a causal prefill's future) are skipped.
  `attention_int8_kv_reference` is the plain computation it must equal: dequantize everything,
  repeat the heads, `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

TILE_KEY_BYTES = 512 << 10  # a tile's dequantized keys: 512 KiB, (B·H_kv = 2, D = 64): 1024 tokens (fewer, larger tiles: a decode step is Python-bound)
TILE_SCORE_BYTES = 2 << 20  # a tile's scores: a 1024-token prefill chunk over 128 tokens at a time
_QMAX = 127.0


@torch.library.custom_op("memsave::quantize_kv_int8", mutates_args=())
def quantize_kv_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float().contiguous()  # outputs contiguous whatever x's strides (as the fake says)
    scale = xf.abs().amax(dim=-1) / _QMAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(xf / safe.unsqueeze(-1)).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return codes, scale


@quantize_kv_int8.register_fake
def _(x):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("memsave::dequantize_kv_int8", mutates_args=())
def dequantize_kv_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale.unsqueeze(-1)).to(dtype)


@dequantize_kv_int8.register_fake
def _(codes, scale, dtype):
    return codes.new_empty(codes.shape, dtype=dtype)


def tile_tokens(rows: int, d: int, heads: int, multiple: int = 1) -> int:
    """Tokens per tile: a tile's dequantized keys (heads·tile·d fp32) within TILE_KEY_BYTES and its
    scores (heads·rows·tile fp32, rows = query rows per kv head) within TILE_SCORE_BYTES, so a
    long prefill's tiles stay small; a multiple of `multiple` (KIVI's key groups), at least one."""
    by_keys = TILE_KEY_BYTES // (4 * heads * max(d, 1))
    by_scores = TILE_SCORE_BYTES // (4 * heads * max(rows, 1))
    return max(multiple, min(by_keys, by_scores) // multiple * multiple)


def _mask_5d(mask: torch.Tensor | None, h_kv: int, rep: int) -> torch.Tensor | None:
    """The mask as (B|1, H_kv|1, rep|1, T, L), a view: query head j·rep + r is (j, r)."""
    if mask is None:
        return None
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[1] == 1:
        return mask.unsqueeze(2)
    return mask.view(mask.shape[0], h_kv, rep, *mask.shape[2:])


def online_attention(q: torch.Tensor, h_kv: int, length: int, dv: int, attn_mask: torch.Tensor | None, scale: float,
                     read_tile, multiple: int = 1) -> torch.Tensor:
    """SDPA of q (B, H_q, T, D) over `length` cached tokens that `read_tile(l0, l1)` returns
    dequantized, (B, H_kv, l1 − l0, D) keys and (…, Dv) values, a tile at a time into an online
    softmax (running max and sum). Tiles the mask hides entirely are never read; a row no key
    reaches gives 0, as SDPA does."""
    b, hq, t, d = q.shape
    rep = hq // h_kv
    qg = q.float().reshape(b, h_kv, rep * t, d) * scale  # the q heads of one kv head, side by side
    mask5 = _mask_5d(attn_mask, h_kv, rep)
    best = torch.full((b, h_kv, rep * t, 1), float("-inf"), device=q.device)
    total = torch.zeros((b, h_kv, rep * t, 1), device=q.device)
    acc = torch.zeros((b, h_kv, rep * t, dv), device=q.device)
    step = tile_tokens(rep * t, d, b * h_kv, multiple)
    # One buffer for every tile's scores and one for its p·v: the same memory reused across
    # tiles (a prefill's tiles are MiBs each; fresh ones would scatter the C heap).
    score_buf = torch.empty(b * h_kv * rep * t * min(step, max(length, 1)), device=q.device)
    pv = torch.empty_like(acc)
    for l0 in range(0, length, step):
        l1 = min(length, l0 + step)
        mask = None if mask5 is None else mask5[..., l0:l1]
        if mask is not None and mask.dtype == torch.bool and not bool(mask.any()):
            continue  # nothing here is attended to (a static cache's unused tail, a causal prefill)
        k, v = read_tile(l0, l1)
        scores = score_buf[: b * h_kv * rep * t * (l1 - l0)].view(b, h_kv, rep * t, l1 - l0)
        torch.matmul(qg, k.transpose(-1, -2), out=scores)
        del k
        if mask is not None:  # broadcast over (B, H_kv, rep, T, tile): no copy of the mask
            s5 = scores.view(b, h_kv, rep, t, l1 - l0)
            if mask.dtype == torch.bool:
                s5.masked_fill_(mask.logical_not(), float("-inf"))
            else:
                s5.add_(mask.float())
        new_best = torch.maximum(best, scores.amax(dim=-1, keepdim=True))
        shift = torch.where(torch.isinf(new_best), torch.zeros_like(new_best), new_best)  # rows nothing reached yet
        scores.sub_(shift).exp_()  # p, in place
        correction = torch.exp(best - shift)
        total.mul_(correction).add_(scores.sum(dim=-1, keepdim=True))
        torch.matmul(scores, v, out=pv)
        acc.mul_(correction).add_(pv)
        del v
        best = new_best
    out = acc.div_(torch.where(total > 0, total, torch.ones_like(total)))  # a row nothing reached: 0, as SDPA gives
    return out.reshape(b, hq, t, dv).to(q.dtype)


def check_heads(hq: int, h_kv: int) -> None:
    if hq % h_kv:
        raise ValueError(f"memsave: {hq} query heads are not a multiple of {h_kv} key/value heads")


def _check(q, k_codes, k_scale, v_codes, v_scale):
    if q.dim() != 4 or k_codes.dim() != 4 or v_codes.dim() != 4:
        raise ValueError(f"memsave: attention_int8_kv takes 4-d q and codes (B, H, T|L, D); got q {tuple(q.shape)}, "
                         f"k_codes {tuple(k_codes.shape)}, v_codes {tuple(v_codes.shape)}")
    check_heads(q.shape[1], k_codes.shape[1])
    if k_scale.shape != k_codes.shape[:-1] or v_scale.shape != v_codes.shape[:-1]:
        raise ValueError("memsave: a cache's scales must have its codes' shape without the last dimension")


@torch.library.custom_op("memsave::attention_int8_kv", mutates_args=())
def attention_int8_kv(
    q: torch.Tensor,
    k_codes: torch.Tensor,
    k_scale: torch.Tensor,
    v_codes: torch.Tensor,
    v_scale: torch.Tensor,
    attn_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    return attention_int8_kv_tiles(q, k_codes, k_scale, v_codes, v_scale, attn_mask, scale)


def attention_int8_kv_tiles(q, k_codes, k_scale, v_codes, v_scale, attn_mask, scale) -> torch.Tensor:
    """The op's torch implementation, any device (also the CUDA kernel's fallback where Triton
    is missing: codegen/triton/kv_attention.py)."""
    _check(q, k_codes, k_scale, v_codes, v_scale)

    def read_tile(l0: int, l1: int):
        return (k_codes[:, :, l0:l1].float().mul_(k_scale[:, :, l0:l1].unsqueeze(-1)),
                v_codes[:, :, l0:l1].float().mul_(v_scale[:, :, l0:l1].unsqueeze(-1)))

    return online_attention(q, k_codes.shape[1], k_codes.shape[2], v_codes.shape[-1], attn_mask, scale, read_tile)


@attention_int8_kv.register_fake
def _(q, k_codes, k_scale, v_codes, v_scale, attn_mask, scale):
    return q.new_empty((*q.shape[:-1], v_codes.shape[-1]))


def attention_int8_kv_reference(q, k_codes, k_scale, v_codes, v_scale, attn_mask, scale):
    """What attention_int8_kv computes, written plainly (the whole cache dequantized at once)."""
    rep = q.shape[1] // k_codes.shape[1]
    k = dequantize_kv_int8(k_codes, k_scale, torch.float32).repeat_interleave(rep, dim=1)
    v = dequantize_kv_int8(v_codes, v_scale, torch.float32).repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=attn_mask, scale=scale).to(q.dtype)


def kv_int8_bytes(shape: tuple[int, ...]) -> int:
    """Bytes of one int8 cache tensor of `shape` (B, H_kv, L, D) with its fp32 scales."""
    b, h, length, d = shape
    return b * h * length * (d + 4)
