"""Log quantization of weights: memsave::quantize_log / memsave::dequantize_log.

Magnitudes are quantized on a logarithmic grid, the sign is kept in its own bit. A weight
W (N, K) is cut along K into groups of `group_size` exactly as in affine quantization
(`ops/affine.py`: group_size = K is per row; the last group is zero-padded, the padding
dropped on dequantization). Each group has two fp16 parameters, log_zmin and step:

    b-bit code = sign << (b − 1) | m          sign = 1 for negative weights
    m = 0                                       → w = 0 (exact zero)
    m ∈ 1 .. L = 2^(b−1) − 1                    → |w| = exp(log_zmin + (m − 1)·step)

Quantization (nearest representable value):

    m = 0                                                   if |w| < exp(log_zmin) / 2
    m = clamp(round((log|w| − log_zmin) / step), 0, L − 1) + 1   otherwise

Zero and signs. Magnitude code 0 is reserved for exact zero, so zeros (pruned weights,
padding) come back exactly and every weight keeps its sign: a nonzero dequantized value has
the sign of its weight. The boundary between 0 and the smallest level exp(log_zmin) is their
linear midpoint — weights below half the smallest level flush to zero, which is the nearer
of the two — while between nonzero levels rounding is to the nearest level in log space. A
zero code always has sign bit 0 (the code "negative zero" is never produced, and would
decode to 0). So b bits give 2^b − 1 values {0, ±L levels}; b = 2 is ternary {0, ±z}.

`choose_logparams` spans each group's nonzero |w| range: exp(log_zmin) ≤ min nonzero |w| and
exp(log_zmin + (L − 1)·step) ≥ max |w| (log_zmin rounded down and step rounded up to fp16),
so every nonzero weight is within step/2 of its level in log space: |log|dq| − log|w|| ≤
step/2. With a single level (b = 2) the level is the geometric mean of min and max and step
is the width of that range (nominal: dequantization never multiplies it by anything but 0);
weights below half that level flush to zero, so this bound and "no nonzero weight becomes 0"
hold from 3 bits on. The
full range is often wide (a group's smallest weight can be 1e-5 of its largest), so
`choose_logparams_mse` also tries narrower ranges whose small weights flush to zero and
keeps, per group, the one with the least squared error.

Codes are packed along K with `pack_bits` at b bits. Storage: b bits per weight + 32 bits
per group (`log_bits_per_weight`).
"""

from __future__ import annotations

import math

import torch

from memsave.memory.estimate import WORKSPACE
from memsave.ops.affine import QPARAM_DTYPE, _grouped, by_row_blocks, check_qparams, num_groups
from memsave.ops.pack import pack_bits, packed_length, unpack_bits

LN2 = math.log(2.0)
MIN_STEP = 2.0**-14  # smallest normal fp16: steps are never 0 (codes would be undefined)
CHUNK_ELEMS = 1 << 18  # the dequantize reference works on ~256K weights at a time


def levels(bits: int) -> int:
    """Nonzero magnitude levels of a b-bit log code: 2^(b−1) − 1."""
    return 2 ** (bits - 1) - 1


def _round_down_fp16(t: torch.Tensor) -> torch.Tensor:
    r = t.to(QPARAM_DTYPE)
    return torch.where(r.float() > t, torch.nextafter(r, torch.full_like(r, -math.inf)), r)


def _round_up_fp16(t: torch.Tensor) -> torch.Tensor:
    r = t.to(QPARAM_DTYPE)
    return torch.where(r.float() < t, torch.nextafter(r, torch.full_like(r, math.inf)), r)


def _log_range(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, G, group) → log min nonzero |w|, log max |w|, and whether the group has a nonzero."""
    a = g.abs()
    hi = a.amax(-1)
    lo = torch.where(a > 0, a, torch.full_like(a, math.inf)).amin(-1)
    nonzero = hi > 0
    one = torch.ones_like(hi)
    return torch.where(nonzero, lo, one).log(), torch.where(nonzero, hi, one).log(), nonzero


def _params_for_width(
    lo: torch.Tensor, hi: torch.Tensor, nonzero: torch.Tensor, ratio: float, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid whose top is log max and whose width is ratio·(log max − log min), in fp16."""
    n_levels = levels(bits)
    width = (hi - lo) * ratio
    # fp16 parameters: log_zmin rounded down, then the step from it rounded up, so the stored
    # grid still covers [hi − width, hi] (smallest level ≤ min, largest level ≥ max).
    if n_levels == 1:
        log_zmin = _round_down_fp16(hi - width / 2)
        step = width
    else:
        log_zmin = _round_down_fp16(hi - width)
        step = (hi - log_zmin.float()) / (n_levels - 1)
    step = _round_up_fp16(step.clamp_min(MIN_STEP))
    # All-zero groups: any grid will do (every code is 0); keep it finite and tidy.
    log_zmin = torch.where(nonzero, log_zmin, torch.zeros_like(log_zmin))
    step = torch.where(nonzero, step, torch.ones_like(step))
    return log_zmin, step


def choose_logparams(w: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (N, G) fp16 log_zmin and step spanning the group's nonzero |w| range."""
    check_qparams(bits, group_size, w.shape[-1])
    lo, hi, nonzero = _log_range(_grouped(w.detach().float(), group_size))
    return _params_for_width(lo, hi, nonzero, 1.0, bits)


def choose_logparams_mse(
    w: torch.Tensor, bits: int, group_size: int, grid: int = 24, min_ratio: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """See _choose_logparams_mse; computed a block of rows at a time (affine.by_row_blocks)."""
    return by_row_blocks(_choose_logparams_mse, w, bits, group_size, grid, min_ratio)


def _choose_logparams_mse(
    w: torch.Tensor, bits: int, group_size: int, grid: int = 24, min_ratio: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group log_zmin and step minimizing the group's squared error over a grid of ranges.

    Candidates keep the top level at max |w| and narrow the log range from the full nonzero
    range (ratio 1, `choose_logparams`) down to `min_ratio` of it; weights below the smallest
    level then flush to zero or round up to it. Ratio 1 is a candidate, so the result is never
    worse than the full range on a group's squared error.
    """
    check_qparams(bits, group_size, w.shape[-1])
    g = _grouped(w.detach().float(), group_size)
    lo, hi, nonzero = _log_range(g)
    a = g.abs()  # signs are kept exactly: the error is that of the magnitudes (g may view w)
    la = a.log()
    best_err = best_lz = best_s = None
    for ratio in torch.linspace(1.0, min_ratio, grid).tolist():
        lz, s = _params_for_width(lo, hi, nonzero, ratio, bits)
        lz, s = lz.float().unsqueeze(-1), s.float().unsqueeze(-1)
        # As _codes/_decode compute it: the nearest level, or 0 below half the smallest one.
        mag = torch.clamp(torch.round((la - lz) / s), 0, levels(bits) - 1).mul_(s).add_(lz).exp_()
        mag.masked_fill_(la < lz - LN2, 0)
        err = mag.sub_(a).pow_(2).sum(-1)
        lz, s = lz.squeeze(-1).to(QPARAM_DTYPE), s.squeeze(-1).to(QPARAM_DTYPE)
        if best_err is None:
            best_err, best_lz, best_s = err, lz, s
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_lz = torch.where(better, lz, best_lz)
            best_s = torch.where(better, s, best_s)
    return best_lz, best_s


def _codes(g: torch.Tensor, log_zmin: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """(N, G, group) fp32 weights → (N, G, group) uint8 b-bit codes (sign bit on top)."""
    lz = log_zmin.float().unsqueeze(-1)
    s = step.float().clamp_min(1e-30).unsqueeze(-1)
    la = g.abs().log_()  # −inf for zeros
    m = torch.clamp(torch.round((la - lz) / s), 0, levels(bits) - 1).add_(1)
    m = torch.where(la < lz - LN2, torch.zeros_like(m), m).to(torch.uint8)
    neg = ((g < 0) & (m > 0)).to(torch.uint8)
    return m | (neg << (bits - 1))


def _decode(codes: torch.Tensor, log_zmin: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, G, group) uint8 codes → fp32 weights (one fp32 buffer, updated in place)."""
    m = codes & (2 ** (bits - 1) - 1)
    factor = (codes >> (bits - 1)).to(torch.int8).mul_(-2).add_(1).masked_fill_(m == 0, 0)  # −1, 0, +1
    v = m.to(torch.float32)
    del m
    v.sub_(1).mul_(step.float().unsqueeze(-1)).add_(log_zmin.float().unsqueeze(-1)).exp_()
    return v.mul_(factor)


@torch.library.custom_op("memsave::quantize_log", mutates_args=())
def quantize_log(
    w: torch.Tensor, log_zmin: torch.Tensor, step: torch.Tensor, bits: int, group_size: int
) -> torch.Tensor:
    """(N, K) float weight → (N, packed_length(G·group_size, bits)) uint8 sign+log codes."""
    check_qparams(bits, group_size, w.shape[-1])
    codes = _codes(_grouped(w.float(), group_size), log_zmin, step, bits)
    return pack_bits(codes.reshape(w.shape[0], -1), bits)


@quantize_log.register_fake
def _(w, log_zmin, step, bits, group_size):
    padded = num_groups(w.shape[-1], group_size) * group_size
    return w.new_empty((w.shape[0], packed_length(padded, bits)), dtype=torch.uint8)


@torch.library.custom_op("memsave::dequantize_log", mutates_args=())
def dequantize_log(
    packed: torch.Tensor,
    log_zmin: torch.Tensor,
    step: torch.Tensor,
    bits: int,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Packed codes → (N, in_features) weight in `dtype`: ±exp(log_zmin + (m − 1)·step), or 0.

    Computed in fp32 a block of rows at a time (~CHUNK_ELEMS weights), each block written
    straight into the output: the temporaries stay small whatever the weight's size.
    """
    check_qparams(bits, group_size, in_features)
    n = packed.shape[0]
    groups = num_groups(in_features, group_size)
    padded = groups * group_size
    out = torch.empty((n, in_features), dtype=dtype, device=packed.device)
    rows = max(1, CHUNK_ELEMS // padded)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        codes = unpack_bits(packed[r0:r1], bits, padded).reshape(r1 - r0, groups, group_size)
        v = _decode(codes, log_zmin[r0:r1], step[r0:r1], bits)
        del codes
        out[r0:r1] = v.reshape(r1 - r0, padded)[:, :in_features]
        del v  # before the next block's temporaries
    return out


@dequantize_log.register_fake
def _(packed, log_zmin, step, bits, group_size, in_features, dtype):
    return packed.new_empty((packed.shape[0], in_features), dtype=dtype)


@torch.library.custom_op("memsave::linear_log", mutates_args=())
def linear_log(
    x: torch.Tensor,
    packed: torch.Tensor,
    log_zmin: torch.Tensor,
    step: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """(..., K) activations × log-quantized (N, K) weight → (..., N) (cf. memsave::linear_affine)."""
    w = dequantize_log(packed, log_zmin, step, bits, group_size, in_features, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


@linear_log.register_fake
def _(x, packed, log_zmin, step, bias, bits, group_size, in_features):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def unpack_temporaries(bits: int) -> int:
    """Temporary bytes per code of `unpack_bits` (measured): byte shifts for widths that divide
    8, 64-bit words (and the padding of their chunks) otherwise."""
    return 0 if bits == 8 else 2 if 8 % bits == 0 else 18 + bits


def dequantize_workspace(rows: int, in_features: int, group_size: int, bits: int) -> int:
    """Temporary bytes of the dequantize reference (measured per block of rows): unpacking,
    then codes, magnitudes and the int8 sign factor (1 byte each) and fp32 values (4 bytes)."""
    padded = num_groups(in_features, group_size) * group_size
    block = min(rows, max(1, CHUNK_ELEMS // padded)) * padded
    return block * max(10, unpack_temporaries(bits))


def _dequantize_workspace(node) -> int:
    packed, _, _, bits, group_size, in_features = node.args[:6]
    return dequantize_workspace(int(packed.meta["val"].shape[0]), int(in_features), int(group_size), int(bits))


def _linear_workspace(node) -> int:
    # The reference materializes the whole (N, K) weight in the activations' dtype.
    x, packed = node.args[0].meta["val"], node.args[1].meta["val"]
    bits, group_size, in_features = int(node.args[5]), int(node.args[6]), int(node.args[7])
    n = int(packed.shape[0])
    return n * in_features * x.element_size() + dequantize_workspace(n, in_features, group_size, bits)


WORKSPACE[torch.ops.memsave.dequantize_log.default] = _dequantize_workspace
WORKSPACE[torch.ops.memsave.linear_log.default] = _linear_workspace


def quantize_weight_log(
    w: torch.Tensor, bits: int, group_size: int | None = None, mse: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log quantization of a (N, K) weight: (packed, log_zmin, step)."""
    group_size = w.shape[-1] if group_size is None else group_size
    choose = choose_logparams_mse if mse else choose_logparams
    log_zmin, step = choose(w, bits, group_size)
    return quantize_log(w, log_zmin, step, bits, group_size), log_zmin, step


def log_bits_per_weight(n: int, k: int, bits: int, group_size: int) -> float:
    """Stored bits per weight: packed b-bit codes + fp16 log_zmin and step per group."""
    groups = num_groups(k, group_size)
    stored = n * packed_length(groups * group_size, bits) * 8 + n * groups * 2 * 16
    return stored / (n * k)
