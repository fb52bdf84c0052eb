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
  It dequantizes ATTENTION_TILE tokens at a time and folds them into an online softmax (running
  max and sum), so a decode step never holds the dequantized cache: its working memory is one
  tile. Tiles the mask hides entirely (a static cache's unused tail) are skipped.
  `attention_int8_kv_reference` is the plain computation it must equal: dequantize everything,
  repeat the heads, `F.scaled_dot_product_attention`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ATTENTION_TILE = 256  # tokens dequantized at once: (B, H_kv, 256, D) fp32, 64 KiB at D=64
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


def _grouped_mask(mask: torch.Tensor | None, b: int, h_kv: int, rep: int, t: int, l0: int, l1: int):
    """The mask's columns l0:l1 as (B, H_kv, rep·T, l1−l0), or None."""
    if mask is None:
        return None
    tile = mask[..., l0:l1]
    while tile.dim() < 4:
        tile = tile.unsqueeze(0)
    return tile.expand(b, h_kv * rep, t, l1 - l0).reshape(b, h_kv, rep * t, l1 - l0)


def _check(q, k_codes, k_scale, v_codes, v_scale):
    if q.dim() != 4 or k_codes.dim() != 4 or v_codes.dim() != 4:
        raise ValueError(f"memsave: attention_int8_kv takes 4-d q and codes (B, H, T|L, D); got q {tuple(q.shape)}, "
                         f"k_codes {tuple(k_codes.shape)}, v_codes {tuple(v_codes.shape)}")
    if q.shape[1] % k_codes.shape[1]:
        raise ValueError(f"memsave: {q.shape[1]} query heads are not a multiple of {k_codes.shape[1]} key/value heads")
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
    _check(q, k_codes, k_scale, v_codes, v_scale)
    b, hq, t, d = q.shape
    h_kv, length, dv = k_codes.shape[1], k_codes.shape[2], v_codes.shape[-1]
    rep = hq // h_kv
    qg = q.float().reshape(b, h_kv, rep * t, d) * scale  # q heads of one kv head side by side
    best = torch.full((b, h_kv, rep * t, 1), float("-inf"), device=q.device)
    total = torch.zeros((b, h_kv, rep * t, 1), device=q.device)
    acc = torch.zeros((b, h_kv, rep * t, dv), device=q.device)
    for l0 in range(0, length, ATTENTION_TILE):
        l1 = min(length, l0 + ATTENTION_TILE)
        mask = _grouped_mask(attn_mask, b, h_kv, rep, t, l0, l1)
        if mask is not None and mask.dtype == torch.bool and not bool(mask.any()):
            continue  # nothing here is attended to (a static cache's unused tail)
        k = k_codes[:, :, l0:l1].float() * k_scale[:, :, l0:l1].unsqueeze(-1)
        scores = qg @ k.transpose(-1, -2)
        del k
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
        new_best = torch.maximum(best, scores.amax(dim=-1, keepdim=True))
        shift = torch.where(torch.isinf(new_best), torch.zeros_like(new_best), new_best)  # rows nothing reached yet
        p = torch.exp(scores - shift)
        del scores
        correction = torch.exp(best - shift)
        v = v_codes[:, :, l0:l1].float() * v_scale[:, :, l0:l1].unsqueeze(-1)
        total = total * correction + p.sum(dim=-1, keepdim=True)
        acc = acc * correction + p @ v
        best = new_best
    out = acc / torch.where(total > 0, total, torch.ones_like(total))  # a row nothing reached: 0, as SDPA gives
    return out.reshape(b, hq, t, dv).to(q.dtype)


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
