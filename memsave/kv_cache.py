"""A static key/value cache for HF transformers models that holds int8 (or 4 / 2 bits), and compiles.

    cache = memsave.QuantizedStaticCache(model.config, max_cache_len=4096)   # "int8", "int4", "kivi2"
    model.forward = torch.compile(model.forward, backend="memsave")
    out = model.generate(ids, cache=cache, max_new_tokens=128)

With "int8" each attention layer's cache is an `Int8StaticLayer`: HF's `StaticLayer` (fixed buffers written
in place at `cache_position`, the addresses static, so compiled graphs are reused across decode
steps) whose buffers are int8 codes (B, H_kv, L, D) plus one fp32 scale per token and head
(memsave/ops/kv_cache.py), 0.27x the fp32 cache at head size 64. `update` quantizes the new
tokens into the buffers and returns `memsave::dequantize_kv_int8` of the whole cache: that is
what an attention memsave does not compile reads (eager: the dequantized layer exists while its
attention runs). Compiled by memsave, the pass `fuse_kv_attention` (passes/dynamo) replaces the
dequantize and the attention that reads it with `memsave::attention_int8_kv`, which reads the
codes tile by tile: no dequantized cache exists at any time. "int4" and "kivi2" are a
`LowBitStaticLayer` in KIVI's layout (ops/kv_lowbit.py: keys per channel with the newest key
group in an fp16 window, values per token), fused the same way into `memsave::attention_kivi`.

The class beside `options={"kv_cache": ...}` (passes/dynamo/quantize_static_cache.py, which holds
HF's own static cache in these layouts when the compiled prefill allocates it): a cache made
before the compiled graph runs (HF's `early_initialization`, which `prefill_chunk_size` calls, a
cache kept across calls) allocates its fp buffers itself, so a compiler cannot take their memory
away; this class never has them. The two share the layouts and their writes (kv_tensor.py).
Layers that are not full attention (sliding-window layers) keep HF's own static layer, fp, and
the cache says which (`unquantized`).
"""

from __future__ import annotations

import functools

import torch

from memsave.kv_tensor import (
    LOWBIT,
    QuantizedKV,
    allocate_int8,
    allocate_kivi_keys,
    allocate_kivi_values,
    layout_for,
    whole_groups,
    write_int8,
    write_kivi_keys,
    write_kivi_values,
)

KV_CACHE_SCHEMES = ("int8", "int4", "kivi2")


def _hf():
    try:
        from transformers import cache_utils
    except ImportError as error:  # pragma: no cover - transformers is a dev/bench dependency
        raise ImportError("memsave: QuantizedStaticCache needs HF transformers (pip install transformers)") from error
    return cache_utils


def _compiling() -> bool:
    return torch.compiler.is_compiling()


class _QuantizedLayerMixin:
    """What both layouts share, over their buffers (`BUFFERS`, attribute names; `keys`/`values`
    hold the codes, so HF's generic code — get_seq_length, the masks — sees them)."""

    BUFFERS: tuple[str, ...] = ()

    def _buffers(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, name) for name in self.BUFFERS)

    def _finish_initialization(self) -> None:
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not _compiling():  # as HF's StaticLayer: fixed addresses, so graphs are reused
            for t in (*self._buffers(), self.cumulative_length):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def reset(self) -> None:
        super().reset()  # the codes and the length
        if self.is_initialized:
            for t in self._buffers():
                t.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.get_seq_length() > 0:
            index = beam_idx.to(self.keys.device)
            for name in self.BUFFERS:
                setattr(self, name, getattr(self, name).index_select(0, index))

    def offload(self):
        raise NotImplementedError(f"memsave: a {self.scheme} cache layer is not offloaded")

    def held_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buffers()) if self.is_initialized else 0


class _Int8StaticLayerMixin(_QuantizedLayerMixin):
    """The int8 behaviour, mixed into HF's StaticLayer (defined lazily: transformers is optional)."""

    scheme = "int8"
    BUFFERS = ("keys", "values", "key_scales", "value_scales")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        rows = (self.batch_size, self.num_heads, self.max_cache_len)
        self.keys, self.key_scales = allocate_int8((*rows, self.k_head_dim), self.device)
        self.values, self.value_scales = allocate_int8((*rows, self.v_head_dim), self.device)
        self._finish_initialization()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = key_states.shape[-2]
        position = torch.arange(length, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(length)
        write_int8(self.keys, self.key_scales, position, key_states)
        write_int8(self.values, self.value_scales, position, value_states)
        return (
            torch.ops.memsave.dequantize_kv_int8(self.keys, self.key_scales, self.dtype),
            torch.ops.memsave.dequantize_kv_int8(self.values, self.value_scales, self.dtype),
        )


class _LowBitStaticLayerMixin(_QuantizedLayerMixin):
    """KIVI's layout (ops/kv_lowbit.py): keys per channel over groups of `k_group` tokens with the
    newest, incomplete group in a window; values per token over groups of `v_group` channels."""

    BUFFERS = ("keys", "key_scales", "key_mins", "key_window", "values", "value_scales", "value_mins")

    def __init__(self, max_cache_len: int, scheme: str):
        self.scheme = scheme
        self.bits, self.k_group, self.v_group = LOWBIT[scheme]
        # Whole key groups (HF's masks follow max_cache_len, so the layer says the rounded length).
        super().__init__(max_cache_len=whole_groups(max_cache_len, self.k_group))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.batch_size, self.num_heads = key_states.shape[:2]
        self.k_head_dim, self.v_head_dim = key_states.shape[-1], value_states.shape[-1]
        # A new attribute, not v_group changed: Dynamo would make an int that changed a graph input.
        _, (_, self.value_group), _ = layout_for(self.scheme, "values", self.v_head_dim)
        shape = (self.batch_size, self.num_heads, self.max_cache_len)
        # The written length is HF's cumulative_length (the fifth tensor allocate_kivi_keys makes).
        self.keys, self.key_scales, self.key_mins, self.key_window, _ = allocate_kivi_keys(
            (*shape, self.k_head_dim), self.bits, self.k_group, self.device)
        self.values, self.value_scales, self.value_mins = allocate_kivi_values(
            (*shape, self.v_head_dim), self.bits, self.value_group, self.k_group, self.device)
        self._finish_initialization()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        ops, bits, g = torch.ops.memsave, self.bits, self.k_group
        position = torch.arange(key_states.shape[-2], device=self.device) + self.cumulative_length
        write_kivi_values(self.values, self.value_scales, self.value_mins, position, value_states, bits, self.value_group)
        # Sets cumulative_length to the tokens written.
        write_kivi_keys(self.keys, self.key_scales, self.key_mins, self.key_window, self.cumulative_length, position,
                        key_states, bits, g)
        return (
            ops.dequantize_kv_channels(self.keys, self.key_scales, self.key_mins, self.key_window, self.cumulative_length,
                                       bits, g, self.dtype),
            ops.dequantize_kv_tokens(self.values, self.value_scales, self.value_mins, bits, self.value_group, self.dtype),
        )


@functools.cache
def _layer_class(mixin: type) -> type:
    """`mixin` on transformers' StaticLayer (made on first use: transformers is optional)."""
    return type(mixin.__name__.strip("_").replace("Mixin", ""), (mixin, _hf().StaticLayer), {})


def QuantizedStaticCache(config, max_cache_len: int, scheme: str = "int8", **kwargs):
    """An HF `StaticCache` whose full-attention layers hold `scheme` ("int8"); see the module doc.
    `cache.unquantized` lists (layer index, layer type) of the layers left as HF made them."""
    if scheme not in KV_CACHE_SCHEMES:
        raise ValueError(f"memsave: unknown kv cache scheme {scheme!r}; valid choices: {', '.join(KV_CACHE_SCHEMES)}")
    cache_utils = _hf()
    cache = cache_utils.StaticCache(config=config, max_cache_len=max_cache_len, **kwargs)
    unquantized = []
    for i, layer in enumerate(cache.layers):
        if type(layer) is cache_utils.StaticLayer:
            if scheme == "int8":
                cache.layers[i] = _layer_class(_Int8StaticLayerMixin)(max_cache_len=max_cache_len)
            else:
                cache.layers[i] = _layer_class(_LowBitStaticLayerMixin)(max_cache_len=max_cache_len, scheme=scheme)
        else:
            unquantized.append((i, type(layer).__name__))
    cache.unquantized = unquantized
    cache.kv_scheme = scheme
    return cache


def cache_bytes(cache) -> int:
    """Bytes the cache's layers hold now (codes and scales, or an fp layer's buffers): a
    QuantizedStaticCache, or HF's StaticCache under options['kv_cache']."""
    total = 0
    for layer in cache.layers:
        if hasattr(layer, "held_bytes"):
            total += layer.held_bytes()
        elif getattr(layer, "is_initialized", False):  # HF's layer: fp, or int8 under options['kv_cache']
            total += sum(t.held_bytes() if isinstance(t, QuantizedKV) else t.numel() * t.element_size()
                         for t in (layer.keys, layer.values))
    return total
