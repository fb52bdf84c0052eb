"""NF4 quantization of weights (QLoRA's 4-bit NormalFloat): memsave::quantize_nf4 /
dequantize_nf4 / linear_nf4.

A weight W (N, K) is cut along K into blocks of `group_size` (64 in QLoRA) exactly as in affine
quantization (`ops/affine.py`: the last block zero-padded, the padding dropped on
dequantization). Each block stores its absolute maximum; each weight the index of the nearest of
16 fixed levels of w / absmax:

    NF4_LEVELS = quantiles of a standard normal, scaled to [-1, 1], with an exact 0 (index 7)
    w ≈ NF4_LEVELS[code] · absmax(block)

Double quantization (QLoRA §"Double Quantization"): the (N, G) absmax values are stored in 8
bits too. Their mean is subtracted, the rest is cut (flattened, row-major) into blocks of
`SCALE_BLOCK` = 256, and each block stores int8 codes and one fp32 scale (its absmax / 127):

    absmax ≈ code8 · scale8[block] + mean

Codes are chosen against the stored (double-quantized) absmax, not the exact one, so rounding
is to the nearest level of what dequantization will use; w / absmax is clamped to [-1, 1]. A
block whose stored absmax is not positive (all zeros, or a tiny block rounded down) gets the
zero code. Storage: 4 bits per weight + 8 bits per block + 32 bits per 256 blocks + 32 bits
(`nf4_bits_per_weight`: 4.127 at group 64).
"""

from __future__ import annotations

import torch

from memsave.memory.estimate import WORKSPACE
from memsave.ops.affine import _grouped, num_groups
from memsave.ops.pack import pack_bits, packed_length, unpack_bits

# QLoRA's NF4 levels (Dettmers et al., 2023, Appendix E), as bitsandbytes and torchao store them.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982813835144, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
ZERO_CODE = 7
SCALE_BLOCK = 256
NF4_GROUPS = (32, 64, 128, 256)
CHUNK_ELEMS = 1 << 18  # the dequantize reference works on ~256K weights at a time


def _levels(device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


def _check(group_size: int, in_features: int) -> None:
    if group_size not in NF4_GROUPS:
        raise ValueError(f"nf4: group_size must be one of {NF4_GROUPS}, got {group_size}")
    if in_features < 1:
        raise ValueError(f"nf4: in_features must be positive, got {in_features}")


def choose_nf4params(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double-quantized block absmax: (int8 codes (N, G), fp32 scale per 256 blocks, fp32 mean ())."""
    _check(group_size, w.shape[-1])
    absmax = _grouped(w.detach().float(), group_size).abs().amax(-1)  # (N, G)
    mean = absmax.mean()
    flat = (absmax - mean).reshape(-1)
    blocks = -(-flat.numel() // SCALE_BLOCK)
    padded = torch.zeros(blocks * SCALE_BLOCK, dtype=torch.float32, device=w.device)
    padded[: flat.numel()] = flat
    scale = padded.reshape(blocks, SCALE_BLOCK).abs().amax(-1) / 127
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = torch.round(padded.reshape(blocks, SCALE_BLOCK) / safe.unsqueeze(-1)).clamp_(-127, 127)
    codes = codes.reshape(-1)[: flat.numel()].to(torch.int8).reshape(absmax.shape)
    return codes, scale, mean


def block_absmax(absmax_codes: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """The stored (N, G) absmax: int8 codes · their block's scale + mean."""
    flat = absmax_codes.reshape(-1).float()
    per = scale.float().repeat_interleave(SCALE_BLOCK)[: flat.numel()]
    return (flat * per + mean.float()).reshape(absmax_codes.shape)


def _codes(g: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """(R, G, group) fp32 weights, (R, G) stored absmax → (R, G, group) uint8 level indices."""
    positive = absmax > 0
    x = (g / torch.where(positive, absmax, torch.ones_like(absmax)).unsqueeze(-1)).clamp_(-1.0, 1.0)
    levels = _levels(g.device)
    # Nearest level: the midpoints between consecutive levels split [-1, 1] into 16 bins.
    codes = torch.bucketize(x, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)
    return torch.where(positive.unsqueeze(-1), codes, torch.full_like(codes, ZERO_CODE))


@torch.library.custom_op("memsave::quantize_nf4", mutates_args=())
def quantize_nf4(
    w: torch.Tensor, absmax_codes: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor, group_size: int
) -> torch.Tensor:
    """(N, K) float weight → (N, packed_length(G·group_size, 4)) uint8 NF4 codes."""
    _check(group_size, w.shape[-1])
    n = w.shape[0]
    absmax = block_absmax(absmax_codes, scale, mean)
    groups = num_groups(w.shape[-1], group_size)
    out = []
    rows = max(1, CHUNK_ELEMS // (groups * group_size))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        codes = _codes(_grouped(w[r0:r1].float(), group_size), absmax[r0:r1])
        out.append(pack_bits(codes.reshape(r1 - r0, -1), 4))
    return torch.cat(out) if len(out) > 1 else out[0]


@quantize_nf4.register_fake
def _(w, absmax_codes, scale, mean, group_size):
    padded = num_groups(w.shape[-1], group_size) * group_size
    return w.new_empty((w.shape[0], packed_length(padded, 4)), dtype=torch.uint8)


@torch.library.custom_op("memsave::dequantize_nf4", mutates_args=())
def dequantize_nf4(
    packed: torch.Tensor,
    absmax_codes: torch.Tensor,
    scale: torch.Tensor,
    mean: torch.Tensor,
    group_size: int,
    in_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Packed codes → (N, in_features) weight in `dtype`: NF4_LEVELS[code] · stored absmax.
    A block of rows at a time (~CHUNK_ELEMS weights), each written straight into the output."""
    _check(group_size, in_features)
    n = packed.shape[0]
    groups = num_groups(in_features, group_size)
    padded = groups * group_size
    absmax = block_absmax(absmax_codes, scale, mean)
    levels = _levels(packed.device)
    out = torch.empty((n, in_features), dtype=dtype, device=packed.device)
    rows = max(1, CHUNK_ELEMS // padded)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        codes = unpack_bits(packed[r0:r1], 4, padded).reshape(r1 - r0, groups, group_size)
        v = levels[codes.long()].mul_(absmax[r0:r1].unsqueeze(-1))
        del codes
        out[r0:r1] = v.reshape(r1 - r0, padded)[:, :in_features]
        del v
    return out


@dequantize_nf4.register_fake
def _(packed, absmax_codes, scale, mean, group_size, in_features, dtype):
    return packed.new_empty((packed.shape[0], in_features), dtype=dtype)


@torch.library.custom_op("memsave::linear_nf4", mutates_args=())
def linear_nf4(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax_codes: torch.Tensor,
    scale: torch.Tensor,
    mean: torch.Tensor,
    bias: torch.Tensor | None,
    group_size: int,
    in_features: int,
) -> torch.Tensor:
    """(..., K) activations × NF4 (N, K) weight → (..., N) (cf. memsave::linear_affine)."""
    w = dequantize_nf4(packed, absmax_codes, scale, mean, group_size, in_features, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


@linear_nf4.register_fake
def _(x, packed, absmax_codes, scale, mean, bias, group_size, in_features):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))


def dequantize_workspace(rows: int, in_features: int, group_size: int) -> int:
    """Temporary bytes of the dequantize reference per block of rows: unpacked codes (1 byte),
    their int64 indices (8) and fp32 values (4), plus the stored absmax (4 per block)."""
    padded = num_groups(in_features, group_size) * group_size
    block = min(rows, max(1, CHUNK_ELEMS // padded)) * padded
    return block * 13 + rows * (padded // group_size) * 4


def _dequantize_workspace(node) -> int:
    packed, group_size, in_features = node.args[0], node.args[4], node.args[5]
    return dequantize_workspace(int(packed.meta["val"].shape[0]), int(in_features), int(group_size))


def _linear_workspace(node) -> int:
    # The reference materializes the whole (N, K) weight in the activations' dtype.
    x, packed = node.args[0].meta["val"], node.args[1].meta["val"]
    group_size, in_features = int(node.args[6]), int(node.args[7])
    n = int(packed.shape[0])
    return n * in_features * x.element_size() + dequantize_workspace(n, in_features, group_size)


WORKSPACE[torch.ops.memsave.dequantize_nf4.default] = _dequantize_workspace
WORKSPACE[torch.ops.memsave.linear_nf4.default] = _linear_workspace


def quantize_weight_nf4(w: torch.Tensor, group_size: int = 64) -> tuple[torch.Tensor, ...]:
    """NF4 of a (N, K) weight: (packed, absmax_codes, scale, mean)."""
    params = choose_nf4params(w, group_size)
    return (quantize_nf4(w, *params, group_size), *params)


def nf4_bits_per_weight(n: int, k: int, group_size: int = 64) -> float:
    """Stored bits per weight: 4-bit codes, an int8 absmax per block, an fp32 scale per 256
    blocks and one fp32 mean."""
    groups = num_groups(k, group_size)
    stored = n * packed_length(groups * group_size, 4) * 8 + n * groups * 8 + -(-n * groups // SCALE_BLOCK) * 32 + 32
    return stored / (n * k)
