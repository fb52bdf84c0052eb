"""Sparse weight storage: unstructured (bitmask + values) and N:M semi-structured.

A pruned weight W (N, K) — N output rows, K input features — keeps some of its entries and
stores only those, plus where they were:

- bitmask (any pattern): `values` (nnz,) the kept weights in row-major order, and `mask`
  uint8 (N, ceil(K/8)): bit j % 8 of byte j // 8 of row i is keep[i, j] (little-endian bit
  order, `ops/pack.py` with 1-bit codes). Stored: nnz·element_size + N·ceil(K/8) bytes.
- N:M (n of every m consecutive weights along K kept; m ∈ {4, 8}, 1 ≤ n < m; 2:4 is what
  sparse tensor cores run): `values` (N, K/m·n) the kept weights in order, and `indices`
  uint8: each kept value's position inside its group (0..m−1) in ceil(log2 m) bits, one
  little-endian bit stream per row (`ops/pack.py` layout: rows padded to a multiple of 8
  codes). 2:4 in fp16: 2 + 0.25 bytes per 4 weights, 56% of dense.

    W = [[a 0 b 0 | 0 c 0 d]]   2:4 →   values  = [[a b c d]]
                                        indices = positions [[0 2 1 3]], 2 bits each

Ops (torch.library custom ops with a plain-torch reference and a fake kernel, like
`ops/affine.py`): memsave::densify_bitmask / densify_nm rebuild the dense weight;
memsave::linear_bitmask / linear_nm are `F.linear(x, densify(...), bias)` as one op, so a
fast kernel can read the compressed form directly (`codegen/triton/sparse_nm.py`). `values`
is any float tensor of the right size: the quantize pass may put memsave::dequantize_affine
in front of it, so nothing here assumes it is a stored constant.

The references densify a block of rows at a time into the output (a scatter by column for
N:M, a gather by running count for bitmask), so their temporaries stay small and they never
read a number back from the device; the linear references then hold the whole dense weight
for the call (registered in WORKSPACE for the memory estimate).
"""

from __future__ import annotations

import torch

from memsave.graph.meta import call_arg
from memsave.memory.estimate import WORKSPACE
from memsave.ops.pack import pack_bits, packed_length, unpack_bits

NM_GROUP_SIZES = (4, 8)
CHUNK_ELEMS = 1 << 18  # the densify references work on ~256K weights at a time


# --------------------------------------------------------------------------- checks


def _check_weight_and_keep(what: str, w: torch.Tensor, keep: torch.Tensor) -> None:
    if w.dim() != 2 or not w.dtype.is_floating_point:
        raise ValueError(f"{what}: w must be a 2-D float (N, K) weight, got {w.dtype} {tuple(w.shape)}")
    if keep.dtype != torch.bool or keep.shape != w.shape:
        raise ValueError(
            f"{what}: keep must be a bool tensor shaped like w {tuple(w.shape)}, got {keep.dtype} {tuple(keep.shape)}"
        )


def check_nm(n: int, m: int, in_features: int | None = None) -> None:
    """n:m is a supported pattern (and divides in_features, if given); ValueError otherwise."""
    if m not in NM_GROUP_SIZES:
        raise ValueError(f"N:M sparsity: m must be one of {NM_GROUP_SIZES}, got m={m!r}")
    if not 1 <= n < m:
        raise ValueError(f"N:M sparsity: n must satisfy 1 <= n < m={m}, got n={n!r}")
    if in_features is not None and in_features % m:
        raise ValueError(
            f"N:M sparsity: m={m} must divide K (in_features), got K={in_features} (K % m = {in_features % m})"
        )


def index_bits(m: int) -> int:
    """Bits per stored position inside a group of m: ceil(log2 m)."""
    return (m - 1).bit_length()


def compressed_features(in_features: int, n: int, m: int) -> int:
    """Stored values per row of an n:m weight: K/m·n."""
    return in_features // m * n


def _check_x(what: str, x: torch.Tensor, values: torch.Tensor, in_features: int) -> None:
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"{what}: x must be (..., in_features={in_features}), got {tuple(x.shape)}")
    if values.dtype != x.dtype:
        raise TypeError(
            f"{what}: values must have the activations' dtype {x.dtype}, got {values.dtype} "
            "(dequantize or cast the values to the activation dtype first)"
        )


def _check_bitmask(what: str, values: torch.Tensor, mask: torch.Tensor, in_features: int) -> None:
    if in_features <= 0:
        raise ValueError(f"{what}: in_features must be positive, got {in_features}")
    width = packed_length(in_features, 1)
    if mask.dtype != torch.uint8 or mask.dim() != 2 or mask.shape[1] != width:
        raise ValueError(
            f"{what}: mask must be uint8 (N, ceil(K/8)) = (N, {width}) for K={in_features}, "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )
    if values.numel() > mask.shape[0] * in_features:
        raise ValueError(f"{what}: {values.numel()} values for a ({mask.shape[0]}, {in_features}) weight")


def _check_nm_parts(what: str, values: torch.Tensor, indices: torch.Tensor, n: int, m: int, in_features: int) -> None:
    check_nm(n, m, in_features)
    kc = compressed_features(in_features, n, m)
    width = packed_length(kc, index_bits(m))
    if indices.dtype != torch.uint8 or indices.dim() != 2 or indices.shape[1] != width:
        raise ValueError(
            f"{what}: indices must be uint8 (N, {width}) for {n}:{m} sparsity of K={in_features}, "
            f"got {indices.dtype} {tuple(indices.shape)}"
        )
    if values.numel() != indices.shape[0] * kc:
        raise ValueError(
            f"{what}: values must hold N·K/m·n = {indices.shape[0]}·{kc} kept weights, got {tuple(values.shape)}"
        )


# --------------------------------------------------------------------------- unstructured: bitmask + values


def pack_bitmask(w: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight, (N, K) bool keep → (values (nnz,) in w.dtype, mask uint8 (N, ceil(K/8)))."""
    _check_weight_and_keep("pack_bitmask", w, keep)
    values = w[keep]  # row-major order
    mask = pack_bits(keep.to(torch.uint8), 1)  # (N, ceil(K/8))
    return values, mask


def unpack_bitmask(values: torch.Tensor, mask: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of pack_bitmask: (N, K) dense in `dtype`, zeros where not kept.

    A block of rows at a time: the kept weights of a block are numbered by a running count
    (cumsum of its keep bits, plus the count before it, a 0-d tensor), and each weight takes
    value[number] where kept. No Python int is read from the device, so it runs on a GPU
    without syncs (and inside CUDA-graph capture); the exact count is checked on the CPU only.
    """
    _check_bitmask("unpack_bitmask", values, mask, in_features)
    n = mask.shape[0]
    flat = values.reshape(-1)
    out = torch.zeros((n, in_features), dtype=dtype, device=mask.device)
    if flat.numel() == 0:
        counted = int(unpack_bits(mask, 1, in_features).sum()) if mask.device.type == "cpu" else 0
    else:
        seen = torch.zeros((), dtype=torch.int64, device=mask.device)  # kept weights in earlier blocks
        zero = torch.zeros((), dtype=dtype, device=mask.device)
        rows = max(1, CHUNK_ELEMS // in_features)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            keep = unpack_bits(mask[r0:r1], 1, in_features)  # (rows, K) 0/1
            # (rows·K,) int64: 1 + index of each kept weight in the block (cumsum_ in place: cumsum
            # of uint8 would allocate a second int64 buffer).
            number = keep.reshape(-1).to(torch.int64).cumsum_(0)
            block_count = number[-1].clone()
            number.add_(seen - 1).clamp_(0, flat.numel() - 1)
            taken = flat.take(number).reshape(r1 - r0, in_features)
            del number
            torch.where(keep.view(torch.bool), taken.to(dtype), zero, out=out[r0:r1])  # 0/1 bytes are valid bools
            del keep, taken
            seen += block_count
        counted = int(seen) if mask.device.type == "cpu" else flat.numel()
    if counted != flat.numel():
        raise ValueError(f"unpack_bitmask: the mask keeps {counted} weights but {flat.numel()} values were given")
    return out


def bitmask_bytes(out_features: int, in_features: int, nnz: int, element_size: int) -> int:
    """Stored bytes of the bitmask format: the values plus one bit per weight (rows byte-padded)."""
    return nnz * element_size + out_features * packed_length(in_features, 1)


@torch.library.custom_op("memsave::densify_bitmask", mutates_args=())
def densify_bitmask(values: torch.Tensor, mask: torch.Tensor, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    """(nnz,) values + (N, ceil(K/8)) mask → (N, K) weight in `dtype`."""
    return unpack_bitmask(values, mask, in_features, dtype)


@densify_bitmask.register_fake
def _(values, mask, in_features, dtype):
    _check_bitmask("densify_bitmask", values, mask, in_features)
    return mask.new_empty((mask.shape[0], in_features), dtype=dtype)


@torch.library.custom_op("memsave::linear_bitmask", mutates_args=())
def linear_bitmask(
    x: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None, in_features: int
) -> torch.Tensor:
    """(..., K) activations × bitmask-sparse (N, K) weight → (..., N)."""
    _check_x("linear_bitmask", x, values, in_features)
    w = unpack_bitmask(values, mask, in_features, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


@linear_bitmask.register_fake
def _(x, values, mask, bias, in_features):
    _check_x("linear_bitmask", x, values, in_features)
    _check_bitmask("linear_bitmask", values, mask, in_features)
    return x.new_empty((*x.shape[:-1], mask.shape[0]))


# --------------------------------------------------------------------------- N:M semi-structured


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """bool (N, K): in every group of m consecutive weights along K, the n with the largest
    score (ties broken by lower index)."""
    if scores.dim() != 2:
        raise ValueError(f"nm_keep_mask: scores must be 2-D (N, K), got {tuple(scores.shape)}")
    rows, k = scores.shape
    check_nm(n, m, k)
    if scores.dtype == torch.bool:
        scores = scores.to(torch.uint8)
    groups = scores.reshape(rows, k // m, m)
    # A stable descending sort keeps equal scores in index order: lower index wins ties.
    top = torch.sort(groups, dim=-1, descending=True, stable=True).indices[..., :n]  # (N, G, n)
    keep = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    return keep.scatter_(-1, top, True).reshape(rows, k)


def pack_nm(w: torch.Tensor, keep: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) weight, (N, K) bool keep with exactly n per group of m →
    (values (N, K/m·n) in w.dtype, indices uint8 (N, packed_length(K/m·n, ceil(log2 m))))."""
    _check_weight_and_keep("pack_nm", w, keep)
    rows, k = w.shape
    check_nm(n, m, k)
    groups = keep.reshape(rows, k // m, m)
    counts = groups.sum(-1)  # (N, G)
    bad = (counts != n).nonzero()
    if bad.numel():
        r, g = (int(i) for i in bad[0])
        raise ValueError(
            f"pack_nm: keep must have exactly n={n} weights in every group of m={m}; row {r}, group {g} "
            f"(columns {g * m}..{g * m + m - 1}) keeps {int(counts[r, g])} ({bad.shape[0]} bad groups in all)"
        )
    values = w[keep].reshape(rows, -1)  # (N, Kc), kept weights in order
    slots = torch.arange(m, device=w.device, dtype=torch.uint8).expand(groups.shape)
    positions = slots[groups].reshape(rows, -1)  # (N, Kc) position of each value in its group
    return values, pack_bits(positions, index_bits(m))


def unpack_nm(
    values: torch.Tensor, indices: torch.Tensor, n: int, m: int, in_features: int, dtype: torch.dtype
) -> torch.Tensor:
    """Inverse of pack_nm: (N, K) dense in `dtype`, zeros where not kept."""
    _check_nm_parts("unpack_nm", values, indices, n, m, in_features)
    rows_total, kc = indices.shape[0], compressed_features(in_features, n, m)
    values = values.reshape(rows_total, kc)
    out = torch.zeros((rows_total, in_features), dtype=dtype, device=indices.device)
    # Column of stored value c with position p: (c // n)·m + p.
    base = torch.arange(kc, device=indices.device, dtype=torch.int64).div_(n, rounding_mode="floor").mul_(m)  # (Kc,)
    out_bits = _as_bits(out)
    rows = max(1, CHUNK_ELEMS // max(1, kc))
    for r0 in range(0, rows_total, rows):
        r1 = min(rows_total, r0 + rows)
        cols = unpack_bits(indices[r0:r1], index_bits(m), kc).to(torch.int64).add_(base)  # (rows, Kc)
        # Scattered as raw bits: CPU scatter_ of fp16/bf16 allocates 8 bytes per value, of ints nothing.
        out_bits[r0:r1].scatter_(1, cols, _as_bits(values[r0:r1].to(dtype)))
        del cols
    return out


_BITS_DTYPES = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory as integers of the same width (a view; exact for copies)."""
    return t.view(_BITS_DTYPES[t.element_size()])


def nm_from_dense(dense: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """pack_nm of a weight that is already n:m sparse (at most n nonzeros per group of m): the
    nonzeros are kept, padded with zeros of the lowest positions. ValueError if a group has more."""
    keep = nm_keep_mask(dense != 0, n, m)
    dropped = (dense.masked_fill(keep, 0) != 0).nonzero()
    if dropped.numel():
        r, c = (int(i) for i in dropped[0])
        raise ValueError(
            f"nm_from_dense: the weight is not {n}:{m} sparse: row {r}, group {c // m} (columns "
            f"{c // m * m}..{c // m * m + m - 1}) has more than {n} nonzeros"
        )
    return pack_nm(dense, keep, n, m)


def nm_bytes(out_features: int, in_features: int, n: int, m: int, element_size: int) -> int:
    """Stored bytes of the n:m format: K/m·n values per row plus their packed positions."""
    check_nm(n, m, in_features)
    kc = compressed_features(in_features, n, m)
    return out_features * (kc * element_size + packed_length(kc, index_bits(m)))


@torch.library.custom_op("memsave::densify_nm", mutates_args=())
def densify_nm(
    values: torch.Tensor, indices: torch.Tensor, n: int, m: int, in_features: int, dtype: torch.dtype
) -> torch.Tensor:
    """(N, K/m·n) values + packed positions → (N, K) weight in `dtype`."""
    return unpack_nm(values, indices, n, m, in_features, dtype)


@densify_nm.register_fake
def _(values, indices, n, m, in_features, dtype):
    _check_nm_parts("densify_nm", values, indices, n, m, in_features)
    return indices.new_empty((indices.shape[0], in_features), dtype=dtype)


@torch.library.custom_op("memsave::linear_nm", mutates_args=())
def linear_nm(
    x: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor,
    bias: torch.Tensor | None,
    n: int,
    m: int,
    in_features: int,
) -> torch.Tensor:
    """(..., K) activations × n:m-sparse (N, K) weight → (..., N)."""
    _check_x("linear_nm", x, values, in_features)
    w = unpack_nm(values, indices, n, m, in_features, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


@linear_nm.register_fake
def _(x, values, indices, bias, n, m, in_features):
    _check_x("linear_nm", x, values, in_features)
    _check_nm_parts("linear_nm", values, indices, n, m, in_features)
    return x.new_empty((*x.shape[:-1], indices.shape[0]))


# --------------------------------------------------------------------------- memory estimate


def bitmask_workspace(rows: int, in_features: int, values_element_size: int) -> int:
    """Temporary bytes of unpack_bitmask beyond its output (measured): per weight of a block of
    rows, its keep byte, its int64 number and the value taken for it (a cast to the output
    dtype comes after the numbers are freed, so it never adds to that); plus a few scalars."""
    block = min(rows, max(1, CHUNK_ELEMS // in_features)) * packed_length(in_features, 1) * 8
    return block * (1 + 8 + values_element_size) + 64


def nm_workspace(rows: int, in_features: int, n: int, m: int, cast_element_size: int = 0) -> int:
    """Temporary bytes of unpack_nm beyond its output (measured): per stored value of a block of
    rows, unpack_bits' temporaries, then the position byte and its int64 column (plus the value
    cast to the output dtype, `cast_element_size`, when the dtypes differ); plus the (Kc,)
    int64 column bases."""
    kc = compressed_features(in_features, n, m)
    block = min(rows, max(1, CHUNK_ELEMS // max(1, kc))) * kc
    bits = index_bits(m)
    unpack = 2 if 8 % bits == 0 else 18 + bits  # bytes per code, as measured in ops/log.py
    return block * max(unpack, 1 + 8 + cast_element_size) + kc * 8


def _densify_bitmask_workspace(node) -> int:
    values, mask = call_arg(node, 0, "values").meta["val"], call_arg(node, 1, "mask").meta["val"]
    return bitmask_workspace(int(mask.shape[0]), int(call_arg(node, 2, "in_features")), values.element_size())


def _linear_bitmask_workspace(node) -> int:
    # The reference materializes the whole (N, K) weight in the activations' dtype.
    x, mask, k = call_arg(node, 0, "x").meta["val"], call_arg(node, 2, "mask").meta["val"], int(call_arg(node, 4, "in_features"))
    rows = int(mask.shape[0])
    return rows * k * x.element_size() + bitmask_workspace(rows, k, x.element_size())


def _densify_nm_workspace(node) -> int:
    values, indices, dtype = call_arg(node, 0, "values").meta["val"], call_arg(node, 1, "indices").meta["val"], call_arg(node, 5, "dtype")
    n, m, k = int(call_arg(node, 2, "n")), int(call_arg(node, 3, "m")), int(call_arg(node, 4, "in_features"))
    return nm_workspace(int(indices.shape[0]), k, n, m, dtype.itemsize if dtype != values.dtype else 0)


def _linear_nm_workspace(node) -> int:
    x, indices = call_arg(node, 0, "x").meta["val"], call_arg(node, 2, "indices").meta["val"]
    n, m, k = int(call_arg(node, 4, "n")), int(call_arg(node, 5, "m")), int(call_arg(node, 6, "in_features"))
    rows = int(indices.shape[0])
    return rows * k * x.element_size() + nm_workspace(rows, k, n, m)  # values are in x.dtype


WORKSPACE[torch.ops.memsave.densify_bitmask.default] = _densify_bitmask_workspace
WORKSPACE[torch.ops.memsave.linear_bitmask.default] = _linear_bitmask_workspace
WORKSPACE[torch.ops.memsave.densify_nm.default] = _densify_nm_workspace
WORKSPACE[torch.ops.memsave.linear_nm.default] = _linear_nm_workspace
