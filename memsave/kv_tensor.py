"""One buffer of HF's static cache, (B, H, L, D) as HF's code sees it, held in fewer bits.

`options={"kv_cache": ...}` (passes/dynamo/quantize_static_cache.py) makes the compiled prefill
allocate codes and scales where HF's `StaticLayer.lazy_initialization` allocated
`torch.zeros((B, H, L, D))`, and hands HF a `QuantizedKV` in the buffer's place, so the layer
holds `layer.keys` / `layer.values` as this object. HF's Python keeps working on it:

- `index_copy_(2, positions, states)` (HF's `update`) quantizes the states into the codes;
- `copy_(states)` (a sliding-window layer, once full) quantizes them into the whole buffer;
- `zero_()` (a reset) zeroes the inner tensors; `index_select(0, ...)` (beam reordering) selects
  the batch rows of each;
- any other op reads the buffer dequantized (correct, and as large as the fp buffer: memsave's
  compiled graphs never take this path, they read the codes; see the pass);
- any other in-place op is an error that names the ops a QuantizedKV takes.

It is a traceable wrapper subclass (`__tensor_flatten__`), so Dynamo traces HF's code over it and
guards on it; the memsave backend then replaces it by its inner tensors before AOTAutograd.

Layouts (`LAYOUTS`), the same bytes as memsave.QuantizedStaticCache's layers (kv_cache.py):

- "int8" (keys and values): codes (B, H, L, D) int8, one fp32 scale per token and head
  (ops/kv_cache.py); 0.27x the fp32 buffer at head size 64.
- "kivi-keys" / "kivi-values" (options "int4", "kivi2"): KIVI's layout (ops/kv_lowbit.py), keys
  per channel over groups of 32 tokens with the incomplete group in an fp16 window and the
  written length, values per token over groups of channels. Their tokens are padded to whole
  key groups (L rounded up to 32; a read is the first L); the padding is never attended to.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_map

import memsave.ops  # noqa: F401  (memsave's kv quantize / dequantize ops)
from memsave.ops.pack import packed_length

aten = torch.ops.aten
TOKENS_DIM = 2  # HF's static buffers: (batch, heads, tokens, head size)


# -- int8 --------------------------------------------------------------------------------------


def allocate_int8(shape: tuple[int, ...], device: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed codes and scales for a (B, H, L, D) buffer (what `torch.zeros` was for the fp one)."""
    return (torch.zeros(shape, dtype=torch.int8, device=device),
            torch.zeros(tuple(shape[:3]), dtype=torch.float32, device=device))


def write_int8(codes: torch.Tensor, scales: torch.Tensor, positions: torch.Tensor, states: torch.Tensor) -> None:
    """HF's `buffer.index_copy_(2, positions, states)` on the int8 layout."""
    new_codes, new_scales = torch.ops.memsave.quantize_kv_int8(states)
    codes.index_copy_(TOKENS_DIM, positions, new_codes)
    scales.index_copy_(TOKENS_DIM, positions, new_scales)


def write_int8_all(codes: torch.Tensor, scales: torch.Tensor, states: torch.Tensor) -> None:
    """HF's `buffer.copy_(states)` (a sliding-window layer's roll, or its last tokens kept)."""
    new_codes, new_scales = torch.ops.memsave.quantize_kv_int8(states.expand(codes.shape))
    codes.copy_(new_codes)
    scales.copy_(new_scales)


# -- KIVI (ops/kv_lowbit.py) ----------------------------------------------------------------------


def whole_groups(length: int, group: int) -> int:
    return -(-length // group) * group


def allocate_kivi_keys(shape: tuple[int, ...], bits: int, group: int, device: Any = None) -> tuple[torch.Tensor, ...]:
    """Codes, fp16 scales and minima per channel and key group, the fp16 window of the newest
    group, and the tokens written (a 0-d int64), for (B, H, L, D) keys."""
    b, h, length, d = shape
    padded, f16 = whole_groups(length, group), torch.float16
    return (torch.zeros((b, h, padded, packed_length(d, bits)), dtype=torch.uint8, device=device),
            torch.zeros((b, h, padded // group, d), dtype=f16, device=device),
            torch.zeros((b, h, padded // group, d), dtype=f16, device=device),
            torch.zeros((b, h, group, d), dtype=f16, device=device),
            torch.zeros((), dtype=torch.int64, device=device))


def write_kivi_keys(codes, scales, mins, window, length, positions, states, bits: int, group: int) -> None:
    """Keys `states` (B, H, n, D) at `positions` (n consecutive tokens, from the written length):
    one token joins the window; several must start at a group boundary, whole groups become
    codes and the rest the window. The incomplete group's codes are rewritten from the window
    (final once it fills), so a read of the codes alone is never stale."""
    ops, n, g = torch.ops.memsave, states.shape[-2], group
    start = positions[0]
    length.copy_(positions[-1] + 1)
    slots = torch.arange(g, device=codes.device)
    if n == 1:  # decode: the token joins the window; slots past it are an old group's
        slot = start % g
        fresh = torch.where((slots < slot).view(1, 1, g, 1), window, torch.zeros_like(window))
        fresh = fresh.index_copy(2, slot.view(1), states.to(torch.float16))
        group_start = start - slot
    else:  # whole groups to codes, the rest to the window
        start = ops.kv_group_start(start, g)
        full = n // g * g
        if full:
            k_packed, k_scale, k_min = ops.quantize_kv_channels(states[:, :, :full], bits, g)
            codes.index_copy_(2, positions[:full], k_packed)
            groups = torch.arange(full // g, device=codes.device) + torch.div(start, g, rounding_mode="floor")
            scales.index_copy_(2, groups, k_scale)
            mins.index_copy_(2, groups, k_min)
        rest = states[:, :, full:].to(torch.float16)
        fresh = torch.cat([rest, rest.new_zeros((*rest.shape[:2], g - rest.shape[2], rest.shape[3]))], dim=2)
        group_start = start + full
    window.copy_(fresh)
    if n == 1 or n % g:
        k_packed, k_scale, k_min = ops.quantize_kv_channels(fresh, bits, g)
        codes.index_copy_(2, group_start + slots, k_packed)
        which = torch.div(group_start, g, rounding_mode="floor").view(1)
        scales.index_copy_(2, which, k_scale)
        mins.index_copy_(2, which, k_min)


def write_kivi_keys_all(codes, scales, mins, window, length, states, bits: int, group: int) -> None:
    """`copy_(states)`: the whole buffer written again from token 0."""
    positions = torch.arange(states.shape[-2], device=codes.device)
    write_kivi_keys(codes, scales, mins, window, length, positions, states, bits, group)


def allocate_kivi_values(shape: tuple[int, ...], bits: int, group: int, pad_to: int,
                         device: Any = None) -> tuple[torch.Tensor, ...]:
    """Codes and fp16 scales and minima per token and group of `group` channels, for (B, H, L, D)
    values, L padded to a multiple of `pad_to` (the keys' group: both are read as one length)."""
    b, h, length, d = shape
    padded, f16 = whole_groups(length, pad_to), torch.float16
    return (torch.zeros((b, h, padded, packed_length(d, bits)), dtype=torch.uint8, device=device),
            torch.zeros((b, h, padded, d // group), dtype=f16, device=device),
            torch.zeros((b, h, padded, d // group), dtype=f16, device=device))


def write_kivi_values(codes, scales, mins, positions, states, bits: int, group: int) -> None:
    packed, scale, low = torch.ops.memsave.quantize_kv_tokens(states, bits, group)
    codes.index_copy_(TOKENS_DIM, positions, packed)
    scales.index_copy_(TOKENS_DIM, positions, scale)
    mins.index_copy_(TOKENS_DIM, positions, low)


def write_kivi_values_all(codes, scales, mins, states, bits: int, group: int) -> None:
    positions = torch.arange(states.shape[-2], device=codes.device)
    write_kivi_values(codes, scales, mins, positions, states, bits, group)


# -- layouts --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """How one buffer is held: its inner tensors, and the functions on them. `write(*inner,
    positions, states, *params)`, `write_all(*inner, states, *params)`, `read(*inner, *params,
    dtype)` (a memsave op, the one fuse_kv_attention recognizes: the padded tokens),
    `allocate(shape, *params, device)`."""

    name: str
    inner: tuple[str, ...]
    allocate: Callable
    write: Callable
    write_all: Callable
    read: Any


LAYOUTS = {
    "int8": Layout("int8", ("codes", "scales"), allocate_int8, write_int8, write_int8_all,
                   torch.ops.memsave.dequantize_kv_int8),
    "kivi-keys": Layout("kivi-keys", ("codes", "scales", "mins", "window", "length"), allocate_kivi_keys,
                        write_kivi_keys, write_kivi_keys_all, torch.ops.memsave.dequantize_kv_channels),
    "kivi-values": Layout("kivi-values", ("codes", "scales", "mins"), allocate_kivi_values, write_kivi_values,
                          write_kivi_values_all, torch.ops.memsave.dequantize_kv_tokens),
}
# options['kv_cache'] -> bits, the keys' group of tokens, the values' group of channels (ops/kv_lowbit.py)
LOWBIT = {"int4": (4, 32, 64), "kivi2": (2, 32, 64)}


def layout_for(scheme: str, role: str, head_size: int) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(layout, params of write / read, params of allocate) of a `role` ("keys" / "values")
    buffer under `scheme`."""
    if scheme == "int8":
        return "int8", (), ()
    bits, k_group, v_group = LOWBIT[scheme]
    if role == "keys":
        return "kivi-keys", (bits, k_group), (bits, k_group)
    group = min(v_group, head_size)
    if head_size % group:
        raise ValueError(f"memsave: head size {head_size} is not a multiple of the value group {group}")
    return "kivi-values", (bits, group), (bits, group, k_group)


class QuantizedKV(torch.Tensor):
    """A (B, H, L, D) cache buffer of `dtype`, held as `layout`'s inner tensors (`form` names the
    layout: a tensor's `layout` is torch's)."""

    @staticmethod
    def __new__(cls, layout: str, inner: tuple[torch.Tensor, ...], dtype: torch.dtype, shape: tuple[int, ...],
                params: tuple[int, ...] = ()):
        spec = LAYOUTS.get(layout)
        if spec is None or len(inner) != len(spec.inner) or len(shape) != 4:
            raise ValueError(f"memsave: QuantizedKV takes a layout of {', '.join(LAYOUTS)} with its inner tensors "
                             f"and a (B, H, L, D) shape, got {layout!r}, {len(inner)} tensors, shape {tuple(shape)}")
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=inner[0].device)

    def __init__(self, layout, inner, dtype, shape, params=()):
        self.form, self.params = layout, tuple(params)
        for name, t in zip(LAYOUTS[layout].inner, inner):
            setattr(self, name, t)

    # Dynamo traces HF's Python over the buffer; no torch-function layer to trace through.
    __torch_function__ = torch._C._disabled_torch_function_impl

    def __tensor_flatten__(self) -> tuple[list[str], Any]:
        return list(LAYOUTS[self.form].inner), (self.form, self.dtype, tuple(self.shape), self.params)

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], ctx: Any, outer_size: Any, outer_stride: Any):
        layout, dtype, shape, params = ctx
        return QuantizedKV(layout, tuple(inner[n] for n in LAYOUTS[layout].inner), dtype, shape, params)

    @property
    def inner(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, n) for n in LAYOUTS[self.form].inner)

    def __repr__(self) -> str:
        return f"QuantizedKV({self.form}{list(self.params)}, shape={tuple(self.shape)}, dtype={self.dtype})"

    def dequantize(self) -> torch.Tensor:
        whole = LAYOUTS[self.form].read(*self.inner, *self.params, self.dtype)
        return whole[:, :, : self.shape[TOKENS_DIM]]

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.inner)

    def _like(self, inner: tuple[torch.Tensor, ...]) -> QuantizedKV:
        return QuantizedKV(self.form, inner, self.dtype, tuple(self.shape), self.params)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        first = args[0] if args else None
        if func is aten.index_copy_.default and isinstance(first, QuantizedKV):
            _, dim, positions, states = args
            if dim % 4 != TOKENS_DIM or isinstance(states, QuantizedKV):
                raise NotImplementedError(f"memsave: QuantizedKV takes index_copy_ along the tokens (dim 2), got dim {dim}")
            LAYOUTS[first.form].write(*first.inner, positions, states, *first.params)
            return first
        if func is aten.copy_.default and isinstance(first, QuantizedKV):
            states = args[1]
            if isinstance(states, QuantizedKV) and states.form == first.form:
                for mine, theirs in zip(first.inner, states.inner):
                    mine.copy_(theirs)
            else:
                states = states.dequantize() if isinstance(states, QuantizedKV) else states
                LAYOUTS[first.form].write_all(*first.inner, states.expand(first.shape), *first.params)
            return first
        if func is aten.zero_.default and isinstance(first, QuantizedKV):
            for t in first.inner:
                t.zero_()
            return first
        if func in (aten.detach.default, aten.alias.default, aten.clone.default):
            return first._like(tuple(func(t) for t in first.inner))
        if func is aten.index_select.default and isinstance(first, QuantizedKV) and args[1] == 0:
            rows = args[2]  # beam search: the batch rows; the written length is one for all rows
            return first._like(tuple(t.index_select(0, rows) if t.dim() else t.clone() for t in first.inner))
        if _writes_a_buffer(func, args, kwargs):
            raise RuntimeError(
                f"memsave: {func} would write a QuantizedKV cache buffer in place; it takes index_copy_ along "
                "the tokens, copy_, zero_ and index_select of batch rows (any read is dequantized)")
        return func(*tree_map(_dequantized, args), **tree_map(_dequantized, kwargs))


def _dequantized(value: Any) -> Any:
    return value.dequantize() if isinstance(value, QuantizedKV) else value


def _writes_a_buffer(func, args: tuple, kwargs: dict) -> bool:
    """Whether `func` writes one of its QuantizedKV arguments (its schema marks the write)."""
    for i, arg in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if isinstance(value, QuantizedKV) and arg.alias_info is not None and arg.alias_info.is_write:
            return True
    return False
