"""Vector quantization of weights with a k-means codebook: memsave::quantize_vq / memsave::dequantize_vq.

Each row of a weight W (N, K) is cut into V = ceil(K / dim) vectors of `dim` consecutive
weights (the last one zero-padded when dim does not divide K). One codebook of C centroids,
(C, dim) in fp16, serves the whole matrix; each vector is stored as the index of its nearest
centroid, `index_bits` = ceil(log2 C) bits (1 ≤ C ≤ 256, so 1..8 bits), packed along the row
with `pack_bits`:

    indices_packed (N, packed_length(V, index_bits)) uint8      codebook (C, dim) fp16
    W[r, v·dim : (v+1)·dim] ≈ codebook[index[r, v]]             (padding dropped)

Bits per weight: index_bits / dim + 16·C·dim / (N·K) for the codebook — 256 × dim 4 is 2
bits per weight, 256 × dim 2 and 16 × dim 1 are 4, 16 × dim 2 is 2 (`vq_bits_per_weight`).

The codebook comes from `kmeans_codebook`: Lloyd's algorithm, vectorized in torch and chunked
(the distance matrix of a chunk of vectors is ~CHUNK_ELEMS floats at a time), deterministic
for a seed:
- training set: all vectors, or a seeded sample (with replacement) of
  `max_points_per_centroid`·C of them when there are more (faiss's rule, 256 per centroid:
  a codebook of 256 learns from 65,536 vectors, which costs the same whatever the matrix's
  size); every vector is then assigned to its nearest centroid;
- init: k-means++ with a seeded torch.Generator, on (a seeded subset of at most 16·C of)
  the training vectors;
- each iteration assigns every training vector to its nearest centroid (squared distance
  ‖c‖² − 2·x·c, ties to the lowest index) and moves each centroid to the mean of its
  vectors (sums in fp64); a centroid left with no vectors is re-seeded at the training
  vector farthest from its centroid (distinct vectors for distinct empty clusters, farthest
  first). Neither step can increase the training MSE (up to fp32 rounding), which
  `history` records once per assignment; iterations stop early once no assignment changes;
- the centroids are rounded to fp16 and the indices are those of the nearest fp16 centroid,
  i.e. exactly what `quantize_vq(w, codebook)` stores.

"Nearest" is by ‖c‖² − 2·x·c in fp32 (one matmul per chunk), which can break a near-tie
differently from ‖x − c‖² by the rounding of ‖x‖² and ‖c‖², nothing more. Padded vectors
(K not a multiple of dim) take part with their zero padding, both in training and in the
nearest-centroid search. One codebook per matrix: rows of very different scales share it
(a per-row scale, or a codebook per block of rows, would be the next refinement).
"""

from __future__ import annotations

import torch

from memsave.memory.estimate import WORKSPACE
from memsave.ops.log import unpack_temporaries
from memsave.ops.pack import pack_bits, packed_length, unpack_bits

CODEBOOK_DTYPE = torch.float16
CHUNK_ELEMS = 1 << 20  # elements of a chunk's (vectors × centroids) distance matrix
DEQUANT_CHUNK_ELEMS = 1 << 18  # weights per block in the dequantize reference
INIT_POINTS_PER_CENTROID = 16  # k-means++ seeds from at most this many training vectors per centroid


def index_bits_for(n_centroids: int) -> int:
    """Bits of a codebook index: ceil(log2 C), at least 1."""
    return max(1, (n_centroids - 1).bit_length())


def num_vectors(in_features: int, dim: int) -> int:
    return (in_features + dim - 1) // dim


def check_vq(dim: int, n_centroids: int, in_features: int) -> None:
    if dim <= 0:
        raise ValueError(f"vq: dim must be positive, got {dim}")
    if not 1 <= n_centroids <= 256:
        raise ValueError(f"vq: n_centroids must be in 1..256 (indices of at most 8 bits), got {n_centroids}")
    if in_features <= 0:
        raise ValueError(f"vq: in_features must be positive, got {in_features}")


def _vectors(w: torch.Tensor, dim: int) -> torch.Tensor:
    """(N, K) → (N·V, dim) fp32, zero-padded along K (a view when nothing needs converting)."""
    n, k = w.shape
    w = w.float()
    pad = num_vectors(k, dim) * dim - k
    if pad:
        w = torch.nn.functional.pad(w, (0, pad))
    return w.reshape(-1, dim)


def _chunk(n_centroids: int) -> int:
    return max(256, CHUNK_ELEMS // max(1, n_centroids))


# Vectors narrower than this are zero-padded to it for the distance matmul: MKL's addmm with an
# inner size of 2 took 16 ms for a (4096, 2) @ (2, 256) chunk, against 0.3 ms with 4 (the zeros
# add nothing to the products). A dim-2 codebook of a 5632 x 2048 weight took 27 s, most of it
# there.
MIN_MATMUL_DIM = 4


def _prepare(c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids as `_nearest` reads them: (‖c‖², −2·cᵀ contiguous, zero-padded to MIN_MATMUL_DIM rows)."""
    minus_2ct = (-2 * c).t()
    if minus_2ct.shape[0] < MIN_MATMUL_DIM:
        minus_2ct = torch.nn.functional.pad(minus_2ct, (0, 0, 0, MIN_MATMUL_DIM - minus_2ct.shape[0]))
    return c.pow(2).sum(1), minus_2ct.contiguous()


def _nearest(x: torch.Tensor, prepared: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Index (int64) of the nearest centroid of each row of x (a chunk)."""
    c_sq, minus_2ct = prepared
    if x.shape[1] < minus_2ct.shape[0]:
        x = torch.nn.functional.pad(x, (0, minus_2ct.shape[0] - x.shape[1]))
    # ‖c‖² − 2·x·c is ‖x − c‖² less ‖x‖², which does not change the argmin.
    return torch.addmm(c_sq, x, minus_2ct).argmin(1)


def nearest_centroids(vectors: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(M, dim) vectors, (C, dim) codebook → (M,) uint8 index of each vector's nearest centroid."""
    prepared = _prepare(codebook.float())
    out = torch.empty(vectors.shape[0], dtype=torch.uint8, device=vectors.device)
    step = _chunk(codebook.shape[0])
    for i in range(0, vectors.shape[0], step):
        out[i : i + step] = _nearest(vectors[i : i + step], prepared)
    return out


def _kmeans_pp(x: torch.Tensor, n_centroids: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each next centroid drawn with probability ∝ squared distance."""
    m = x.shape[0]
    c = torch.empty((n_centroids, x.shape[1]), dtype=x.dtype, device=x.device)
    c[0] = x[int(torch.randint(m, (1,), generator=gen))]
    dist = (x - c[0]).pow_(2).sum(1)
    for i in range(1, n_centroids):
        cdf = dist.cumsum(0, dtype=torch.float64)
        total = float(cdf[-1])
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        if total > 0:  # inverse-CDF draw: cheaper than torch.multinomial, same distribution
            target = torch.tensor([u * total], dtype=torch.float64, device=x.device)
            j = min(int(torch.searchsorted(cdf, target, right=True)), m - 1)
        else:  # fewer distinct vectors than centroids: the rest duplicate one
            j = min(int(u * m), m - 1)
        c[i] = x[j]
        torch.minimum(dist, (x - c[i]).pow_(2).sum(1), out=dist)
    return c


def kmeans_codebook(
    w: torch.Tensor,
    dim: int,
    n_centroids: int,
    iters: int = 25,
    seed: int = 0,
    *,
    max_points_per_centroid: int = 256,
    history: list[float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means codebook of a (N, K) weight: (codebook (C, dim) fp16, indices (N, V) uint8).

    `indices` are the nearest fp16 centroids: pack_bits(indices, index_bits_for(C)) equals
    quantize_vq(w, codebook). `history`, if given, receives the training MSE (per weight) of
    each assignment step, in order — non-increasing, up to fp32 rounding (~1e-7 of the mean
    squared weight: fp32 centroids, nearest by ‖c‖² − 2·x·c).
    """
    check_vq(dim, n_centroids, w.shape[-1])
    n = w.shape[0]
    vectors = _vectors(w.detach(), dim)
    m = vectors.shape[0]
    gen = torch.Generator().manual_seed(seed)  # on the CPU whatever w's device: same draws everywhere
    limit = max_points_per_centroid * n_centroids
    # A sample with replacement: randint costs `limit` indices, randperm would cost m.
    x = vectors if m <= limit else vectors[torch.randint(m, (limit,), generator=gen).to(vectors.device)]
    mt = x.shape[0]
    # k-means++ seeds from (at most) INIT_POINTS_PER_CENTROID·C of the training vectors: it
    # is sequential, C small passes, and an initialization needs no more.
    init = x if mt <= INIT_POINTS_PER_CENTROID * n_centroids else x[
        torch.randperm(mt, generator=gen)[: INIT_POINTS_PER_CENTROID * n_centroids].to(x.device)
    ]
    c = _kmeans_pp(init, n_centroids, gen)
    del init
    step = _chunk(n_centroids)
    assign = torch.empty(mt, dtype=torch.int64, device=x.device)
    previous = None
    for _ in range(iters):
        prepared = _prepare(c)
        for i in range(0, mt, step):  # only the distances need chunks; the rest is per training set
            assign[i : i + step] = _nearest(x[i : i + step], prepared)
        err = (x - c[assign]).pow_(2).sum(1)
        if history is not None:
            history.append(float(err.sum(dtype=torch.float64)) / x.numel())
        if previous is not None and torch.equal(previous, assign):
            break  # same assignment as the last step: the centroids are already its means
        previous = assign.clone()
        counts = torch.bincount(assign, minlength=n_centroids)
        sums = torch.zeros((n_centroids, dim), dtype=torch.float64, device=x.device).index_add_(0, assign, x.double())
        full = counts > 0
        new = torch.where(full.unsqueeze(1), sums / counts.clamp_min(1).unsqueeze(1), c.double())
        if not bool(full.all()):  # re-seed empty clusters at the farthest vectors, farthest first
            empty = (~full).nonzero().flatten()
            far = err.topk(min(empty.numel(), mt)).indices
            new[empty[: far.numel()]] = x[far].double()
        c = new.float()
    codebook = c.to(CODEBOOK_DTYPE)
    indices = nearest_centroids(vectors, codebook).reshape(n, -1)
    return codebook, indices


@torch.library.custom_op("memsave::quantize_vq", mutates_args=())
def quantize_vq(w: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """(N, K) weight, (C, dim) codebook → (N, packed_length(V, index_bits)) uint8 nearest-centroid indices."""
    n_centroids, dim = codebook.shape
    check_vq(dim, n_centroids, w.shape[-1])
    indices = nearest_centroids(_vectors(w, dim), codebook).reshape(w.shape[0], -1)
    return pack_bits(indices, index_bits_for(n_centroids))


@quantize_vq.register_fake
def _(w, codebook):
    n_centroids, dim = codebook.shape
    v = num_vectors(w.shape[-1], dim)
    return w.new_empty((w.shape[0], packed_length(v, index_bits_for(n_centroids))), dtype=torch.uint8)


@torch.library.custom_op("memsave::dequantize_vq", mutates_args=())
def dequantize_vq(
    indices_packed: torch.Tensor,
    codebook: torch.Tensor,
    index_bits: int,
    dim: int,
    in_features: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Packed indices → (N, in_features) weight in `dtype`: a gather of codebook rows.

    Works a block of rows at a time (~DEQUANT_CHUNK_ELEMS weights), each block written
    straight into the output.
    """
    check_vq(dim, codebook.shape[0], in_features)
    if codebook.shape[1] != dim:
        raise ValueError(f"dequantize_vq: codebook is {tuple(codebook.shape)}, expected (C, {dim})")
    n = indices_packed.shape[0]
    v = num_vectors(in_features, dim)
    cb = codebook.to(dtype)
    out = torch.empty((n, in_features), dtype=dtype, device=indices_packed.device)
    rows = max(1, DEQUANT_CHUNK_ELEMS // (v * dim))
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        idx = unpack_bits(indices_packed[r0:r1], index_bits, v).to(torch.int32)
        block = cb.index_select(0, idx.flatten()).reshape(r1 - r0, v * dim)
        del idx
        out[r0:r1] = block[:, :in_features]
        del block  # before the next block's temporaries
    return out


@dequantize_vq.register_fake
def _(indices_packed, codebook, index_bits, dim, in_features, dtype):
    return indices_packed.new_empty((indices_packed.shape[0], in_features), dtype=dtype)


@torch.library.custom_op("memsave::linear_vq", mutates_args=())
def linear_vq(
    x: torch.Tensor,
    indices_packed: torch.Tensor,
    codebook: torch.Tensor,
    bias: torch.Tensor | None,
    index_bits: int,
    dim: int,
    in_features: int,
) -> torch.Tensor:
    """(..., K) activations × vector-quantized (N, K) weight → (..., N) (cf. memsave::linear_affine)."""
    w = dequantize_vq(indices_packed, codebook, index_bits, dim, in_features, x.dtype)
    return torch.nn.functional.linear(x, w, bias)


@linear_vq.register_fake
def _(x, indices_packed, codebook, bias, index_bits, dim, in_features):
    return x.new_empty((*x.shape[:-1], indices_packed.shape[0]))


def dequantize_workspace(rows: int, in_features: int, dim: int, index_bits: int, dtype: torch.dtype) -> int:
    """Temporary bytes of the dequantize reference (measured per block of rows): unpacking,
    or the int32 indices (4 bytes per vector, +1 for the unpacked uint8) and the gathered
    block (dim values of `dtype` per vector); plus the codebook in `dtype`."""
    v = num_vectors(in_features, dim)
    vectors = min(rows, max(1, DEQUANT_CHUNK_ELEMS // (v * dim))) * v
    per_vector = max(5 + dim * dtype.itemsize, unpack_temporaries(index_bits))
    return vectors * per_vector + (1 << index_bits) * dim * dtype.itemsize + 4096


def _dequantize_workspace(node) -> int:
    packed, _, index_bits, dim, in_features, dtype = node.args[:6]
    rows = int(packed.meta["val"].shape[0])
    return dequantize_workspace(rows, int(in_features), int(dim), int(index_bits), dtype)


def _linear_workspace(node) -> int:
    # The reference materializes the whole (N, K) weight in the activations' dtype.
    x, packed = node.args[0].meta["val"], node.args[1].meta["val"]
    index_bits, dim, in_features = int(node.args[4]), int(node.args[5]), int(node.args[6])
    n = int(packed.shape[0])
    return n * in_features * x.element_size() + dequantize_workspace(n, in_features, dim, index_bits, x.dtype)


WORKSPACE[torch.ops.memsave.dequantize_vq.default] = _dequantize_workspace
WORKSPACE[torch.ops.memsave.linear_vq.default] = _linear_workspace


def quantize_weight_vq(
    w: torch.Tensor, dim: int, n_centroids: int, iters: int = 25, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Vector quantization of a (N, K) weight: (indices_packed, codebook)."""
    codebook, indices = kmeans_codebook(w, dim, n_centroids, iters, seed)
    return pack_bits(indices, index_bits_for(n_centroids)), codebook


def vq_bits_per_weight(n: int, k: int, dim: int, n_centroids: int) -> float:
    """Stored bits per weight: packed indices + the fp16 codebook, spread over the N·K weights."""
    stored = n * packed_length(num_vectors(k, dim), index_bits_for(n_centroids)) * 8 + n_centroids * dim * 16
    return stored / (n * k)
