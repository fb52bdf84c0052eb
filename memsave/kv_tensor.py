"""One buffer of HF's static cache, (B, H, L, D) as HF's code sees it, held in int8.

`options={"kv_cache": "int8"}` (passes/dynamo/quantize_static_cache.py) makes the compiled
prefill allocate codes and scales where HF's `StaticLayer.lazy_initialization` allocated
`torch.zeros((B, H, L, D))`, and hands HF a `QuantizedKV` in the buffer's place, so the layer
holds `layer.keys` / `layer.values` as this object. HF's Python keeps working on it:

- `index_copy_(2, positions, states)` (HF's `update`) quantizes the states into the codes;
- `copy_(states)` (a sliding-window layer, once full) quantizes them into the whole buffer;
- `zero_()` (a reset) zeroes codes and scales; `index_select(0, ...)` (beam reordering) selects
  the batch rows of both;
- any other op reads the buffer dequantized (correct, and as large as the fp buffer: memsave's
  compiled graphs never take this path, they read the codes; see the pass);
- any other in-place op is an error that names the ops a QuantizedKV takes.

It is a traceable wrapper subclass (`__tensor_flatten__`), so Dynamo traces HF's code over it and
guards on it; the memsave backend then replaces it by its two inner tensors before AOTAutograd.
The bytes are `ops/kv_cache.py`'s int8 layout: codes (B, H, L, D) int8 and one fp32 scale per
token and head (B, H, L), 0.27x the fp32 buffer at head size 64.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_map

import memsave.ops  # noqa: F401  (memsave::quantize_kv_int8 / dequantize_kv_int8)

aten = torch.ops.aten
INNER = ("codes", "scales")
_TOKENS = 2  # HF's static buffers: (batch, heads, tokens, head size)


def allocate_int8(shape: tuple[int, ...], device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zeroed codes and scales for a (B, H, L, D) buffer (what `torch.zeros` was for the fp one)."""
    return (torch.zeros(shape, dtype=torch.int8, device=device),
            torch.zeros(tuple(shape[:3]), dtype=torch.float32, device=device))


def write_int8(codes: torch.Tensor, scales: torch.Tensor, positions: torch.Tensor, states: torch.Tensor) -> None:
    """HF's `buffer.index_copy_(2, positions, states)` on the int8 layout."""
    new_codes, new_scales = torch.ops.memsave.quantize_kv_int8(states)
    codes.index_copy_(_TOKENS, positions, new_codes)
    scales.index_copy_(_TOKENS, positions, new_scales)


def write_int8_all(codes: torch.Tensor, scales: torch.Tensor, states: torch.Tensor) -> None:
    """HF's `buffer.copy_(states)` (a sliding-window layer's roll, or its last tokens kept)."""
    new_codes, new_scales = torch.ops.memsave.quantize_kv_int8(states.expand(codes.shape))
    codes.copy_(new_codes)
    scales.copy_(new_scales)


def read_int8(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.ops.memsave.dequantize_kv_int8(codes, scales, dtype)


class QuantizedKV(torch.Tensor):
    """A (B, H, L, D) cache buffer of `dtype`, held as int8 codes and per-token scales."""

    codes: torch.Tensor
    scales: torch.Tensor

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        if codes.dim() != 4 or codes.dtype != torch.int8 or scales.shape != codes.shape[:3]:
            raise ValueError(f"memsave: QuantizedKV takes int8 codes (B, H, L, D) and scales (B, H, L), got "
                             f"{codes.dtype} {tuple(codes.shape)} and {tuple(scales.shape)}")
        return torch.Tensor._make_wrapper_subclass(cls, codes.shape, dtype=dtype, device=codes.device)

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        self.codes, self.scales = codes, scales

    # Dynamo traces HF's Python over the buffer; no torch-function layer to trace through.
    __torch_function__ = torch._C._disabled_torch_function_impl

    def __tensor_flatten__(self) -> tuple[list[str], Any]:
        return list(INNER), self.dtype

    @staticmethod
    def __tensor_unflatten__(inner: dict[str, torch.Tensor], dtype: Any, outer_size: Any, outer_stride: Any):
        return QuantizedKV(inner["codes"], inner["scales"], dtype)

    def __repr__(self) -> str:
        return f"QuantizedKV(int8, shape={tuple(self.shape)}, dtype={self.dtype})"

    def dequantize(self) -> torch.Tensor:
        return read_int8(self.codes, self.scales, self.dtype)

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales))

    def _like(self, codes: torch.Tensor, scales: torch.Tensor) -> QuantizedKV:
        return QuantizedKV(codes, scales, self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten.index_copy_.default:
            buffer, dim, positions, states = args
            if not isinstance(buffer, QuantizedKV) or dim % 4 != _TOKENS or isinstance(states, QuantizedKV):
                raise NotImplementedError(f"memsave: QuantizedKV takes index_copy_ along the tokens (dim 2), got dim {dim}")
            write_int8(buffer.codes, buffer.scales, positions, states)
            return buffer
        if func is aten.copy_.default and isinstance(args[0], QuantizedKV):
            buffer, states = args[0], args[1]
            if isinstance(states, QuantizedKV):
                buffer.codes.copy_(states.codes)
                buffer.scales.copy_(states.scales)
            else:
                write_int8_all(buffer.codes, buffer.scales, states)
            return buffer
        if func is aten.zero_.default:
            for t in (args[0].codes, args[0].scales):
                t.zero_()
            return args[0]
        if func in (aten.detach.default, aten.alias.default, aten.clone.default):
            buffer = args[0]
            return buffer._like(func(buffer.codes), func(buffer.scales))
        if func is aten.index_select.default and isinstance(args[0], QuantizedKV) and args[1] == 0:
            buffer, _, rows = args
            return buffer._like(buffer.codes.index_select(0, rows), buffer.scales.index_select(0, rows))
        if _writes_a_buffer(func, args, kwargs):
            raise RuntimeError(
                f"memsave: {func} would write a QuantizedKV cache buffer in place; it takes index_copy_ along "
                "the tokens, copy_, zero_ and index_select of batch rows (any read is dequantized)")
        return func(*tree_map(lambda a: a.dequantize() if isinstance(a, QuantizedKV) else a, args),
                    **tree_map(lambda a: a.dequantize() if isinstance(a, QuantizedKV) else a, kwargs))


def _writes_a_buffer(func, args: tuple, kwargs: dict) -> bool:
    """Whether `func` writes one of its QuantizedKV arguments (its schema marks the write)."""
    for i, arg in enumerate(func._schema.arguments):
        value = args[i] if i < len(args) else kwargs.get(arg.name)
        if isinstance(value, QuantizedKV) and arg.alias_info is not None and arg.alias_info.is_write:
            return True
    return False
