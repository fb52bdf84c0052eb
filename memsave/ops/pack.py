"""Bit packing of integer codes along the last dimension, for any width from 1 to 8 bits.

Layout: the last dimension is cut into chunks of 8 codes; each chunk of 8 codes × b bits is
stored in b bytes as a little-endian bit stream (code i occupies bits [i·b, (i+1)·b) of the
chunk). For b = 4 that is the usual "two codes per byte, low nibble first"; for b = 8 one code
per byte; for b = 2 four per byte; for b = 3 eight codes in three bytes. The last dimension is
padded with zeros to a multiple of 8; `unpack_bits` takes the true length back.
"""

from __future__ import annotations

import torch

BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def packed_length(n: int, bits: int) -> int:
    """Bytes that `n` codes of `bits` bits take along the packed dimension."""
    return (n + 7) // 8 * bits


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) integer codes in [0, 2**bits) → (..., packed_length(n, bits)) uint8."""
    _check_bits(bits)
    if codes.dtype.is_floating_point:
        raise TypeError(f"pack_bits: codes must be integers, got {codes.dtype}")
    n = codes.shape[-1]
    pad = (-n) % 8
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*c.shape[:-1], -1, 8)  # (..., chunks, 8)
    # One 64-bit word per chunk: 8 codes × ≤8 bits fit in 64 bits.
    shifts = torch.arange(8, device=c.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1)  # (..., chunks)
    byte_shifts = torch.arange(bits, device=c.device, dtype=torch.int64) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF  # (..., chunks, bits)
    return out.reshape(*codes.shape[:-1], -1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of pack_bits: (..., packed_length(n, bits)) uint8 → (..., n) uint8 codes.

    Widths that divide 8 (1, 2, 4, 8) never straddle a byte and unpack with byte shifts, one
    byte per code of temporary memory; other widths go through 64-bit words, a few rows at a
    time so the temporaries stay small.
    """
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_bits: packed must be uint8, got {packed.dtype}")
    if bits == 8:
        return packed[..., :n]
    if 8 % bits == 0:
        per_byte = 8 // bits
        shifts = torch.arange(per_byte, device=packed.device, dtype=torch.uint8) * bits
        codes = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (..., bytes, per_byte)
        return codes.reshape(*packed.shape[:-1], -1)[..., :n]
    flat = packed.reshape(-1, packed.shape[-1])
    rows = max(1, (1 << 20) // max(1, flat.shape[-1]))  # ~8 MiB of 64-bit temporaries at most
    out = torch.cat([_unpack_words(flat[i : i + rows], bits, n) for i in range(0, flat.shape[0], rows)])
    return out.reshape(*packed.shape[:-1], n)


def _unpack_words(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    p = packed.to(torch.int64).reshape(packed.shape[0], -1, bits)  # (rows, chunks, bits)
    byte_shifts = torch.arange(bits, device=p.device, dtype=torch.int64) * 8
    word = (p << byte_shifts).sum(-1)  # (rows, chunks)
    shifts = torch.arange(8, device=p.device, dtype=torch.int64) * bits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # (rows, chunks, 8)
    return codes.reshape(packed.shape[0], -1)[:, :n].to(torch.uint8)


def _check_bits(bits: int) -> None:
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits!r}")
