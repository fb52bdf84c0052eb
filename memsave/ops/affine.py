"""Affine (linear) quantization of weights: memsave::quantize_affine / memsave::dequantize_affine.

A weight W (N, K) — N output rows, K input features — is cut along K into groups of
`group_size` (group_size = K: one group per row, "per channel"). Each group has a scale s and
an offset m; codes are unsigned `bits`-bit integers, packed along K (`ops/pack.py`):

    q = clip(round((w − m) / s), 0, 2^b − 1)        w ≈ q·s + m

Asymmetric quantization spans [min(group, 0), max(group, 0)] with s = range / (2^b − 1) and
m = −z·s for a whole number z, so 0.0 is exactly a code. Symmetric quantization centres the
codes: s = max|group| / (2^(b−1) − 0.5), m = −2^(b−1)·s, so it needs no stored offset (pass
offset=None). Scales and offsets are stored in fp16: at group 128 that
is 4 + 32/128 = 4.25 bits per 4-bit weight.

K need not be a multiple of group_size: the last group is padded with zeros (which only widen
its range) and the padding is dropped on dequantization.

Both are torch.library custom ops with a plain-torch reference implementation (the default
kernel, below) and a fake kernel, so Dynamo, AOTAutograd and Inductor trace through them;
fast kernels register against them in `codegen/kernels.py`.
"""

from __future__ import annotations

import torch

from memsave.ops.pack import pack_bits, packed_length, unpack_bits

QPARAM_DTYPE = torch.float16


def num_groups(in_features: int, group_size: int) -> int:
    return (in_features + group_size - 1) // group_size


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, K) → (N, G, group_size), zero-padded along K."""
    n, k = w.shape
    pad = num_groups(k, group_size) * group_size - k
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(n, -1, group_size)


def check_qparams(bits: int, group_size: int, in_features: int) -> None:
    if bits not in (2, 3, 4, 5, 6, 7, 8):
        raise ValueError(f"quantize: bits must be one of 2, 3, 4, 5, 6, 7, 8, got {bits!r}")
    if group_size <= 0:
        raise ValueError(f"quantize: group_size must be positive (use in_features for per-channel), got {group_size}")
    if in_features <= 0:
        raise ValueError(f"quantize: in_features must be positive, got {in_features}")


def _symmetric_scale(amax: torch.Tensor, bits: int) -> torch.Tensor:
    # max|w| / (2^(b−1) − 0.5): both ends land half a step inside the clip, so all 2^b codes
    # are used (−2^(b−1) included); dividing by 2^(b−1) − 1 leaves one code idle (7% coarser
    # steps at 4 bits).
    return amax / (2 ** (bits - 1) - 0.5)


def _zero_aligned_grid(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset of an asymmetric grid over [lo, hi] ∪ {0} on which 0 is a code.

    With offset = min the grid misses 0.0, and a group's many near-zero weights then all round
    the same way, so their errors add up instead of cancelling (measured on MiniLM: int4 g64
    cosine 0.963 → 0.968 from this alone). So the range always includes 0 and the offset is a
    whole number of steps below it: offset = −zero_point · scale.
    """
    qmax = 2**bits - 1
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / qmax).clamp_min(1e-12)
    zero_point = torch.round(-lo / scale).clamp(0, qmax)
    return scale, -zero_point * scale


def choose_qparams_affine(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest scales (and offsets) per group: (N, G) fp16 each; offset None if symmetric."""
    check_qparams(bits, group_size, w.shape[-1])
    g = _grouped(w.detach().float(), group_size)  # (N, G, group)
    if symmetric:
        scale = _symmetric_scale(g.abs().amax(-1), bits)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale.to(QPARAM_DTYPE), None
    scale, offset = _zero_aligned_grid(g.amin(-1), g.amax(-1), bits)
    scale = torch.where(scale > 1e-12, scale, torch.ones_like(scale))
    return scale.to(QPARAM_DTYPE), offset.to(QPARAM_DTYPE)


SEARCH_ROWS_ELEMS = 1 << 18  # weights per block of rows in the per-group searches (cache-sized)


def by_row_blocks(search, w: torch.Tensor, *args, **kwargs):
    """`search(w_block, ...)` over blocks of ~SEARCH_ROWS_ELEMS weights, results concatenated
    along rows. For per-group searches, whose groups never span rows: the same result as one
    call on the whole weight, about 8x faster on a 5632 x 2048 weight (2.8 s -> 0.35 s: each
    block's 20 candidates stay in cache) and with temporaries of one block instead of the
    weight's size several times over."""
    rows = max(1, SEARCH_ROWS_ELEMS // max(1, w.shape[-1]))
    if w.shape[0] <= rows:
        return search(w, *args, **kwargs)
    parts = [search(w[r : r + rows], *args, **kwargs) for r in range(0, w.shape[0], rows)]
    return tuple(None if p[0] is None else torch.cat(p) for p in zip(*parts))


def choose_qparams_mse(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, grid: int = 20, min_ratio: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """See _choose_qparams_mse; computed a block of rows at a time (by_row_blocks)."""
    return by_row_blocks(_choose_qparams_mse, w, bits, group_size, symmetric, grid, min_ratio)


def _choose_qparams_mse(
    w: torch.Tensor, bits: int, group_size: int, symmetric: bool, grid: int = 20, min_ratio: float = 0.5
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales (and offsets) that minimize each group's squared error over a grid of clip ranges.

    Round-to-nearest spends its codes on the full range; a few outliers then widen every step.
    Here each group tries shrinking its range towards zero by ratios from 1 down to
    `min_ratio` (symmetric: also the unclipped max|w| / (2^(b−1) − 1)) and keeps the ratio whose
    quantize→dequantize error is smallest. Ratio 1 is exactly round-to-nearest, so the result
    is never worse than it on the group's squared error.
    """
    check_qparams(bits, group_size, w.shape[-1])
    g = _grouped(w.detach().float(), group_size)  # (N, G, group)
    qmax = 2**bits - 1
    lo, hi, amax = g.amin(-1), g.amax(-1), g.abs().amax(-1)
    best_err = best_scale = best_offset = None
    # Symmetric: also try the unclipped scale max|w| / (2^(b−1) − 1), whose positive end is a
    # code instead of half a step past the last one.
    top = (2 ** (bits - 1) - 0.5) / (2 ** (bits - 1) - 1) if symmetric else 1.0
    ratios = torch.linspace(1.0, min_ratio, grid).tolist() + ([top] if symmetric else [])
    for ratio in ratios:
        if symmetric:
            scale = _symmetric_scale(amax * ratio, bits).clamp_min(1e-12)
            offset = -(2 ** (bits - 1)) * scale
        else:
            scale, offset = _zero_aligned_grid(lo * ratio, hi * ratio, bits)
        # Error of the values as they will be stored (fp16 scale/offset).
        s16, m16 = scale.to(QPARAM_DTYPE).float(), offset.to(QPARAM_DTYPE).float()
        q = torch.clamp(torch.round((g - m16.unsqueeze(-1)) / s16.unsqueeze(-1)), 0, qmax)
        err = (q * s16.unsqueeze(-1) + m16.unsqueeze(-1) - g).pow(2).sum(-1)  # (N, G)
        if best_err is None:
            best_err, best_scale, best_offset = err, scale, offset
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale, best_scale)
            best_offset = torch.where(better, offset, best_offset)
    best_scale = torch.where(best_scale > 1e-12, best_scale, torch.ones_like(best_scale))
    if symmetric:
        return best_scale.to(QPARAM_DTYPE), None
    return best_scale.to(QPARAM_DTYPE), best_offset.to(QPARAM_DTYPE)


def _offset(scale: torch.Tensor, offset: torch.Tensor | None, bits: int) -> torch.Tensor:
    return offset.float() if offset is not None else -(2 ** (bits - 1)) * scale.float()


@torch.library.custom_op("memsave::quantize_affine", mutates_args=())
def quantize_affine(
    w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int, group_size: int
) -> torch.Tensor:
    """(N, K) float weight → (N, packed_length(G·group_size, bits)) uint8 codes."""
    check_qparams(bits, group_size, w.shape[-1])
    g = _grouped(w.float(), group_size)  # (N, G, group)
    s = scale.float().unsqueeze(-1)
    m = _offset(scale, offset, bits).unsqueeze(-1)
    codes = torch.clamp(torch.round((g - m) / s), 0, 2**bits - 1).to(torch.uint8)
    return pack_bits(codes.reshape(w.shape[0], -1), bits)


@quantize_affine.register_fake
def _(w, scale, offset, bits, group_size):
    padded = num_groups(w.shape[-1], group_size) * group_size
    return w.new_empty((w.shape[0], packed_length(padded, bits)), dtype=torch.uint8)


@torch.library.custom_op("memsave::dequantize_affine", mutates_args=())
def dequantize_affine(
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Packed codes → (N, in_features) weight in `dtype`: w = q·s + m, computed in fp32."""
    n = packed.shape[0]
    groups = num_groups(in_features, group_size)
    codes = unpack_bits(packed, bits, groups * group_size).reshape(n, groups, group_size)
    # One fp32 buffer, scaled and shifted in place: the reference should not cost more than
    # the weight it produces.
    w = codes.to(torch.float32)
    del codes
    w.mul_(scale.float().unsqueeze(-1)).add_(_offset(scale, offset, bits).unsqueeze(-1))
    w = w.reshape(n, -1)
    if w.shape[1] != in_features:
        w = w[:, :in_features]
    # Contiguous, as the fake kernel says: a padded last group would otherwise leave a strided slice.
    return w.to(dtype).contiguous()


@dequantize_affine.register_fake
def _(packed, scale, offset, bits, group_size, in_features, dtype):
    return packed.new_empty((packed.shape[0], in_features), dtype=dtype)


def quantize_weight(
    w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Round-to-nearest quantization of a (N, K) weight: (packed, scale, offset)."""
    group_size = w.shape[-1] if group_size is None else group_size
    scale, offset = choose_qparams_affine(w, bits, group_size, symmetric)
    return quantize_affine(w, scale, offset, bits, group_size), scale, offset


def bits_per_weight(n: int, k: int, bits: int, group_size: int, symmetric: bool) -> float:
    """Stored bits per weight: packed codes + fp16 scales (+ fp16 offsets when asymmetric)."""
    groups = num_groups(k, group_size)
    stored = n * packed_length(groups * group_size, bits) * 8 + n * groups * 16 * (1 if symmetric else 2)
    return stored / (n * k)
