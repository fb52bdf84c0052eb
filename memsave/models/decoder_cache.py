"""A static key/value cache for memsave's own decoder, and greedy generation with it.

    cache = DecoderCache(model.config.n_layers, max_len=prompt + new)
    logits = model(ids, cache=cache)            # the prefill: writes positions 0 .. T-1
    logits = model(next_ids, cache=cache)       # each step: one more position
    tokens = generate(model, ids, max_new_tokens=32)   # the same, greedy (a fresh cache, or cache=)
    memsave.cache_bytes(cache)                  # the bytes its buffers hold (quantized or not)

Each layer's buffers are (B, KV heads, max_len, head size), allocated at the first write, as HF's
`StaticLayer` allocates them: inside the compiled prefill when the model is compiled, so
`options={"kv_cache": "int8" | "int4" | "kivi2"}` (passes/dynamo/quantize_static_cache.py) holds
them in fewer bits and the fp buffers never exist. Writes are `index_copy_` at the new positions;
the attention reads the whole buffer under a (T, max_len) mask, or, in a prefill into a fresh
cache, its own T tokens causally (HF's pattern too: then memsave's prefill attends to the states).
"""

from __future__ import annotations

import torch


class DecoderCacheLayer:
    """One layer's keys and values; None until the first write."""

    def __init__(self, max_len: int) -> None:
        self.max_len = max_len
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    @property
    def is_initialized(self) -> bool:
        return self.keys is not None

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, KV, T, D) at `positions` (T,); the whole buffers back."""
        if self.keys is None:
            b, kv, _, d = k.shape
            self.keys = torch.zeros((b, kv, self.max_len, d), dtype=k.dtype, device=k.device)
            self.values = torch.zeros((b, kv, self.max_len, d), dtype=v.dtype, device=v.device)
        self.keys.index_copy_(2, positions, k)
        self.values.index_copy_(2, positions, v)
        return self.keys, self.values


class DecoderCache:
    """The layers' caches and the tokens written so far (a 0-d tensor, so a compiled decode step
    is one graph for every position)."""

    def __init__(self, n_layers: int, max_len: int) -> None:
        if n_layers <= 0 or max_len <= 0:
            raise ValueError(f"DecoderCache needs n_layers > 0 and max_len > 0, got {n_layers}, {max_len}")
        self.max_len = max_len
        self.layers = [DecoderCacheLayer(max_len) for _ in range(n_layers)]
        self.length = torch.zeros((), dtype=torch.int64)


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, max_new_tokens: int, *, cache: DecoderCache | None = None) -> torch.Tensor:
    """Greedy tokens (B, max_new_tokens) after `input_ids` (B, T), through `cache` (a fresh one;
    default: a new DecoderCache of T + max_new_tokens positions). `model`: a Decoder, or one compiled."""
    config = model.config  # a compiled module passes attributes through
    t = input_ids.shape[1]
    cache = cache if cache is not None else DecoderCache(config.n_layers, t + max_new_tokens)
    if cache.layers[0].is_initialized:
        raise ValueError("generate: the cache holds an earlier generation; give a fresh DecoderCache")
    if t + max_new_tokens > min(cache.max_len, config.max_seq_len):
        raise ValueError(f"generate: {t} + {max_new_tokens} tokens exceed the cache ({cache.max_len}) or "
                         f"max_seq_len ({config.max_seq_len})")
    token = model(input_ids, cache=cache)[:, -1].argmax(-1, keepdim=True)
    out = [token]
    for _ in range(max_new_tokens - 1):
        token = model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
        out.append(token)
    return torch.cat(out, dim=1)
