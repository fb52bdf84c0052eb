"""A key/value cache in 4 or 2 bits, KIVI's way: keys per channel, values per token.

KIVI (Liu et al., 2024) found that keys have outlier *channels* and values do not: keys are
quantized per channel over a group of `k_group` tokens, values per token over groups of
`v_group` channels, both asymmetric (code · scale + minimum). A channel's range is only known
once its group of tokens is complete, so the keys of the newest, incomplete group stay in a
full-precision window (fp16 here) and attention reads them from there; the group's codes are
rewritten at each step from the window and are final when it fills.

Layout (one layer; B batch, H kv heads, L tokens (a multiple of k_group), D head size):

    k_packed (B, H, L, packed(D))    k_scale, k_min (B, H, L / k_group, D) fp16
    k_window (B, H, k_group, D) fp16: the current group's keys (slots past the newest are 0)
    v_packed (B, H, L, packed(D))    v_scale, v_min (B, H, L, D / v_group) fp16

`packed(D)` = D·bits/8 bytes (ops/pack.py). At bits 4, k_group 32, v_group 64 and D 64 that is
0.625 bytes per element (0.156x fp32) plus the window; at bits 2, 0.375 (0.094x).

Ops (each with a fake kernel; the attention's plain reference is `attention_kivi_reference`):
- `quantize_kv_tokens(x, bits, group)`: values, per token.
- `quantize_kv_channels(x, bits, group)`: keys, per channel over groups of `group` tokens
  (x's token count is a multiple of `group`).
- `dequantize_kv_tokens` / `dequantize_kv_channels`: back to `dtype`; the keys' version puts
  the window over the incomplete group (from `length // k_group · k_group`, `length` the tokens
  written).
- `attention_kivi(q, k…, length, v…, attn_mask, scale, bits, k_group, v_group)`: SDPA over the
  cache, dequantizing whole key groups a tile at a time into an online softmax (ops/kv_cache.py's
  `online_attention`); what `passes/dynamo/fuse_kv_attention.py` puts in place of dequantize + SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memsave.ops.kv_cache import check_heads, online_attention
from memsave.ops.pack import pack_bits, packed_length

LOWBIT_BITS = (2, 4)


def _ranges(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 (scale, minimum) for ranges [lo, hi]; a constant range gets scale 1 (codes all 0)."""
    levels = (1 << bits) - 1
    scale = ((hi - lo) / levels).to(torch.float16)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return scale, lo.to(torch.float16)


def _codes(x: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int) -> torch.Tensor:
    q = torch.round((x - low.float()) / scale.float()).clamp_(0, (1 << bits) - 1)
    return pack_bits(q.to(torch.uint8), bits)


def _check_lowbit(bits: int, group: int, n: int, what: str) -> None:
    if bits not in LOWBIT_BITS:
        raise ValueError(f"memsave: kv cache bits must be one of {LOWBIT_BITS}, got {bits!r}")
    if group <= 0 or n % group:
        raise ValueError(f"memsave: {what} ({n}) is not a multiple of the group size {group}")


@torch.library.custom_op("memsave::quantize_kv_tokens", mutates_args=())
def quantize_kv_tokens(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_lowbit(bits, group, x.shape[-1], "the head size")
    g = x.float().reshape(*x.shape[:-1], x.shape[-1] // group, group)
    scale, low = _ranges(g.amin(-1), g.amax(-1), bits)
    packed = _codes(g, scale.unsqueeze(-1), low.unsqueeze(-1), bits).reshape(*x.shape[:-1], -1)
    return packed.contiguous(), scale.contiguous(), low.contiguous()


@quantize_kv_tokens.register_fake
def _(x, bits, group):
    groups = (*x.shape[:-1], x.shape[-1] // group)
    return (x.new_empty((*x.shape[:-1], packed_length(x.shape[-1], bits)), dtype=torch.uint8),
            x.new_empty(groups, dtype=torch.float16), x.new_empty(groups, dtype=torch.float16))


@torch.library.custom_op("memsave::quantize_kv_channels", mutates_args=())
def quantize_kv_channels(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _check_lowbit(bits, group, x.shape[-2], "the token count")
    b, h, n, d = x.shape
    g = x.float().reshape(b, h, n // group, group, d)
    scale, low = _ranges(g.amin(-2), g.amax(-2), bits)  # (B, H, n / group, D)
    packed = _codes(g, scale.unsqueeze(-2), low.unsqueeze(-2), bits).reshape(b, h, n, -1)
    return packed.contiguous(), scale.contiguous(), low.contiguous()


@quantize_kv_channels.register_fake
def _(x, bits, group):
    b, h, n, d = x.shape
    return (x.new_empty((b, h, n, packed_length(d, bits)), dtype=torch.uint8),
            x.new_empty((b, h, n // group, d), dtype=torch.float16), x.new_empty((b, h, n // group, d), dtype=torch.float16))


def _codes_float(packed: torch.Tensor, bits: int, d: int) -> torch.Tensor:
    """The codes of `packed` as fp32, (..., d): each byte's 8 / bits codes, low bits first
    (ops/pack.py's layout), as whole-tensor uint8 shifts and masks stacked (2x faster than
    unpack_bits' broadcast shift, 7x faster than a byte-table gather, measured here)."""
    mask = (1 << bits) - 1
    parts = [(packed >> (i * bits)) & mask if i else packed & mask for i in range(8 // bits)]
    return torch.stack(parts, dim=-1).reshape(*packed.shape[:-1], -1)[..., :d].float()


def _tokens_back(packed, scale, low, bits: int, group: int, d: int) -> torch.Tensor:
    codes = _codes_float(packed, bits, d)
    g = codes.reshape(*codes.shape[:-1], d // group, group)
    return g.mul_(scale.float().unsqueeze(-1)).add_(low.float().unsqueeze(-1)).reshape(codes.shape)


def _channels_back(packed, scale, low, bits: int, group: int, d: int) -> torch.Tensor:
    codes = _codes_float(packed, bits, d)  # (B, H, n, D), n a multiple of group
    b, h, n, _ = codes.shape
    g = codes.reshape(b, h, n // group, group, d)
    return g.mul_(scale.float().unsqueeze(-2)).add_(low.float().unsqueeze(-2)).reshape(b, h, n, d)


def _put_window(k: torch.Tensor, window: torch.Tensor, length: torch.Tensor, start: int, group: int) -> torch.Tensor:
    """Keys k (tokens start … start + n, fp32) with the window written over the tokens of the
    incomplete group, in place. That group starts at the last whole group's end (nothing of it
    when `length` is a multiple of the group: the positions the window then covers are past
    `length`, masked)."""
    current = int(length) // group * group
    a, z = max(current, start), min(current + group, start + k.shape[2])
    if a < z:
        k[:, :, a - start : z - start] = window[:, :, a - current : z - current].float()
    return k


@torch.library.custom_op("memsave::dequantize_kv_tokens", mutates_args=())
def dequantize_kv_tokens(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, bits: int, group: int,
                         dtype: torch.dtype) -> torch.Tensor:
    d = scale.shape[-1] * group
    return _tokens_back(packed, scale, low, bits, group, d).to(dtype)


@dequantize_kv_tokens.register_fake
def _(packed, scale, low, bits, group, dtype):
    return packed.new_empty((*packed.shape[:-1], scale.shape[-1] * group), dtype=dtype)


@torch.library.custom_op("memsave::dequantize_kv_channels", mutates_args=())
def dequantize_kv_channels(packed: torch.Tensor, scale: torch.Tensor, low: torch.Tensor, window: torch.Tensor,
                           length: torch.Tensor, bits: int, group: int, dtype: torch.dtype) -> torch.Tensor:
    k = _channels_back(packed, scale, low, bits, group, scale.shape[-1])
    return _put_window(k, window, length, 0, group).to(dtype)


@dequantize_kv_channels.register_fake
def _(packed, scale, low, window, length, bits, group, dtype):
    return packed.new_empty((*packed.shape[:-1], scale.shape[-1]), dtype=dtype)


@torch.library.custom_op("memsave::attention_kivi", mutates_args=())
def attention_kivi(
    q: torch.Tensor,
    k_packed: torch.Tensor, k_scale: torch.Tensor, k_min: torch.Tensor, k_window: torch.Tensor, length: torch.Tensor,
    v_packed: torch.Tensor, v_scale: torch.Tensor, v_min: torch.Tensor,
    attn_mask: torch.Tensor | None, scale: float, bits: int, k_group: int, v_group: int,
) -> torch.Tensor:
    return attention_kivi_tiles(q, k_packed, k_scale, k_min, k_window, length, v_packed, v_scale, v_min, attn_mask,
                                scale, bits, k_group, v_group)


def attention_kivi_tiles(q, k_packed, k_scale, k_min, k_window, length, v_packed, v_scale, v_min, attn_mask, scale,
                         bits, k_group, v_group):
    """The op's kernel in torch ops, any device (the CPU's; CUDA's where Triton is missing)."""
    d, h_kv = q.shape[-1], k_packed.shape[1]
    check_heads(q.shape[1], h_kv)

    def read_tile(l0: int, l1: int):
        groups = slice(l0 // k_group, -(-l1 // k_group))
        k = _channels_back(k_packed[:, :, l0:l1], k_scale[:, :, groups], k_min[:, :, groups], bits, k_group, d)
        v = _tokens_back(v_packed[:, :, l0:l1], v_scale[:, :, l0:l1], v_min[:, :, l0:l1], bits, v_group, v_scale.shape[-1] * v_group)
        return _put_window(k, k_window, length, l0, k_group), v

    return online_attention(q, h_kv, k_packed.shape[2], v_scale.shape[-1] * v_group, attn_mask, scale, read_tile,
                            multiple=k_group)


@attention_kivi.register_fake
def _(q, k_packed, k_scale, k_min, k_window, length, v_packed, v_scale, v_min, attn_mask, scale, bits, k_group, v_group):
    return q.new_empty((*q.shape[:-1], v_scale.shape[-1] * v_group))


def attention_kivi_reference(q, k_packed, k_scale, k_min, k_window, length, v_packed, v_scale, v_min, attn_mask, scale,
                             bits, k_group, v_group):
    """What attention_kivi computes, plainly: dequantize all, repeat the heads, SDPA."""
    rep = q.shape[1] // k_packed.shape[1]
    k = dequantize_kv_channels(k_packed, k_scale, k_min, k_window, length, bits, k_group, torch.float32)
    v = dequantize_kv_tokens(v_packed, v_scale, v_min, bits, v_group, torch.float32)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q.float(), k, v, attn_mask=attn_mask, scale=scale).to(q.dtype)


def kv_lowbit_bytes(b: int, h: int, length: int, d: int, bits: int, k_group: int, v_group: int) -> int:
    """Bytes one layer's keys and values take (codes, fp16 scales and minima, the key window)."""
    packed = b * h * length * packed_length(d, bits)
    keys = packed + 2 * 2 * b * h * (length // k_group) * d + 2 * b * h * k_group * d
    values = packed + 2 * 2 * b * h * length * (d // v_group)
    return keys + values


@torch.library.custom_op("memsave::kv_group_start", mutates_args=())
def kv_group_start(start: torch.Tensor, group: int) -> torch.Tensor:
    """`start`, after checking it is a multiple of `group`: several tokens are appended to a
    KIVI cache a whole key group at a time (a prefill, or prefill chunks of a multiple of it)."""
    if int(start) % group:
        raise ValueError(f"memsave: a kivi/int4 kv cache takes several tokens at once only from a position that is a "
                         f"multiple of its key group ({group}); this append starts at {int(start)} (prefill chunks "
                         f"must be multiples of {group} tokens)")
    return start.clone()


@kv_group_start.register_fake
def _(start, group):
    return torch.empty_like(start)
