"""memsave's C kernels (linear.c) as torch ops, offered to codegen's kernel registry.

One op per stored format, each the twin of its reference op: the same schema (taken from the
reference, not written again), so selecting it only changes a node's target:

    memsave::linear_affine  → memsave::linear_affine_native   (int2..int8, any group)
    memsave::linear_log     → memsave::linear_log_native
    memsave::linear_vq      → memsave::linear_vq_native
    memsave::linear_nm      → memsave::linear_nm_native       (2:4, 4:8, any n:m)
    memsave::linear_w8a8    → memsave::linear_w8a8_native     (exact int32 sums, like the reference)
    memsave::linear_bitmask → memsave::linear_bitmask_native  (+ each row's first value, a constant)

How they run (activations are computed in fp32, whatever their dtype, and the result is cast
back): up to FUSED_ROWS rows of activations (decode, small batches), each thread decodes one
weight row at a time into registers and multiplies it with every activation row — the weight
is read once, in its stored form. More rows (prefill): one parallel region in which each
thread decodes a tile of TILE_ROWS weight rows (fp32) and multiplies it
with all activations by torch's own BLAS sgemm (single-threaded inside the region), then the
next tile into the same buffer. No call holds more than one tile per thread of decoded weight.
"""

from __future__ import annotations

import ctypes
import functools
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

import memsave.ops  # noqa: F401  (registers the reference ops this module twins)
from memsave.codegen.kernels import Kernel, register_kernel
from memsave.codegen.native.build import library
from memsave.codegen.oplib import define_kernel_op, twin
from memsave.graph.meta import arg_val, hint_int
from memsave.graph.rewrite import GraphBuilder
from memsave.memory.estimate import WORKSPACE
from memsave.ops.pack import packed_length
from memsave.ops.sparse import index_bits

memsave_ops = torch.ops.memsave
FUSED_ROWS = 8  # activation rows up to which the fused kernel beats decode-then-GEMM (measured)
# Weight rows a thread decodes at a time on the GEMM path (its fp32 tile: 1 MiB at K = 2048).
# Fixed rows rather than fixed bytes: at K = 5632 a 512 KiB tile had 23 rows, and sgemm on such
# skinny tiles ran a 128-token prefill of a 2048 x 5632 int3 linear 10% slower than fp32; 128
# rows ran 5632 x 2048 at 16.8 ms vs 27.3 ms fp32, 2048 x 5632 at 16.8 vs 17.8 (2 threads).
TILE_ROWS = 128
# Weight rows per bf16 tile on the narrowed prefill path (one torch.mm per tile: bigger tiles,
# fewer calls; 512 rows ran a 5632 x 2048 int4 linear at 128 tokens in 10.6 ms vs 23 ms fp32).
NARROW_TILE_ROWS = 512
TILE_BYTES = 1 << 24  # the fallback's tile (one per call, decoded by all threads), fewer regions
AFFINE, LOG, VQ, NM, BITMASK = range(5)
_P = ctypes.c_void_p
_I = ctypes.c_int64


class WeightDesc(ctypes.Structure):
    """Mirror of ms_weight in linear.c."""

    _fields_ = [
        ("format", _I), ("out_features", _I), ("in_features", _I), ("bits", _I), ("group_size", _I),
        ("row_bytes", _I), ("codes", _P), ("param0", _P), ("param1", _P), ("values", _P),
        ("row_start", _P), ("codebook", _P), ("centroids", _I), ("dim", _I), ("n", _I), ("m", _I),
    ]


_TYPED: ctypes.CDLL | None = None


def use_library(lib: ctypes.CDLL | None) -> ctypes.CDLL | None:
    """Run the ops on `lib` (a build of linear.c; None: the default build, on next use).
    Returns the one used before. Tests swap in the portable build with it."""
    global _TYPED
    before, _TYPED = _TYPED, None
    if lib is not None:
        lib.ms_linear.argtypes = [ctypes.POINTER(WeightDesc), _P, _I, _P, _P, ctypes.c_int]
        lib.ms_decode.argtypes = [ctypes.POINTER(WeightDesc), _I, _I, _P]
        lib.ms_linear_w8a8.argtypes = [_P, _P, _I, _I, _P, _P, _I, _P, _P]
        lib.ms_linear_tiled.argtypes = [ctypes.POINTER(WeightDesc), _P, _I, _P, _P, _P, _I]
        lib.ms_decode_bf16.argtypes = [ctypes.POINTER(WeightDesc), _I, _I, _P]
        lib.ms_isa.restype = ctypes.c_int
        lib.ms_isa.argtypes = []
        _TYPED = lib
    return before


def _lib() -> ctypes.CDLL:
    if _TYPED is None:
        lib = library()
        if lib is None:
            raise RuntimeError("memsave native kernels are not available on this machine (see memsave.codegen.native.build)")
        use_library(lib)
    return _TYPED


@functools.cache
def _blas(symbol: str) -> int | None:
    """Address of a BLAS routine torch links (MKL's sgemm_ on x86 builds), or None."""
    import os

    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = os.path.join(os.path.dirname(torch.__file__), "lib", name)
        if os.path.exists(path):
            try:
                return ctypes.cast(getattr(ctypes.CDLL(path), symbol), ctypes.c_void_p).value
            except (OSError, AttributeError):
                return None
    return None


def _sgemm() -> int | None:
    return _blas("sgemm_")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _contiguous(*tensors):
    return tuple(t if t is None or t.is_contiguous() else t.contiguous() for t in tensors)


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None or (t.dtype == torch.float32 and t.is_contiguous()):
        return t
    return t.to(torch.float32).contiguous()


# Every call below is on the decode path of every linear: kept lean (a few µs of Python).
def _multiply(desc: WeightDesc, x: torch.Tensor, bias: torch.Tensor | None, keep: tuple, narrow: bool = False) -> torch.Tensor:
    """x (..., K) @ W^T + bias for the weight `desc` describes; `keep` holds the tensors its
    pointers point into, alive for the call. `narrow`: many-row products in bf16 (fp32 sums)."""
    lib, k, n = _lib(), desc.in_features, desc.out_features
    x2, b = _fp32(x.reshape(-1, k)), _fp32(bias)
    rows = x2.shape[0]
    y = torch.empty((rows, n), dtype=torch.float32)
    if rows <= FUSED_ROWS:
        if rows:
            lib.ms_linear(ctypes.byref(desc), x2.data_ptr(), rows, _ptr(b), y.data_ptr(), int(narrow))
    elif narrow:  # bf16 tiles, torch's bf16 GEMM (its threads), results rounded to bf16
        xb = x2.to(torch.bfloat16)
        step = min(n, NARROW_TILE_ROWS)
        tile = torch.empty((step, k), dtype=torch.bfloat16)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            lib.ms_decode_bf16(ctypes.byref(desc), r0, r1, tile.data_ptr())
            y[:, r0:r1] = torch.mm(xb, tile[: r1 - r0].t())
        if b is not None:
            y += b
        del tile
    elif _sgemm() is not None:
        lib.ms_linear_tiled(ctypes.byref(desc), x2.data_ptr(), rows, _ptr(b), y.data_ptr(), _sgemm(), TILE_ROWS)
    else:  # no BLAS symbol to call from C: the same tiles, looped here with torch's GEMM
        step = max(16, TILE_BYTES // (4 * k))
        tile = torch.empty((min(step, n), k), dtype=torch.float32)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            lib.ms_decode(ctypes.byref(desc), r0, r1, tile.data_ptr())
            part = tile[: r1 - r0]
            if b is None:
                y[:, r0:r1].copy_(x2 @ part.t())
            else:
                y[:, r0:r1].copy_(torch.addmm(b[r0:r1], x2, part.t()))
        del tile
    del keep
    if x.dtype != torch.float32:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)


# -- the ops ------------------------------------------------------------------------------


def _affine(x, packed, scale, offset, bias, bits, group_size, in_features, narrow=False):
    packed, scale, offset = _contiguous(packed, scale, offset)
    desc = WeightDesc(
        format=AFFINE, out_features=packed.shape[0], in_features=in_features, bits=bits,
        group_size=min(group_size, in_features), row_bytes=packed.stride(0), codes=packed.data_ptr(),
        param0=scale.data_ptr(), param1=_ptr(offset),
    )
    return _multiply(desc, x, bias, (packed, scale, offset), narrow)


def _log(x, packed, log_zmin, step, bias, bits, group_size, in_features, narrow=False):
    packed, log_zmin, step = _contiguous(packed, log_zmin, step)
    desc = WeightDesc(
        format=LOG, out_features=packed.shape[0], in_features=in_features, bits=bits,
        group_size=min(group_size, in_features), row_bytes=packed.stride(0), codes=packed.data_ptr(),
        param0=log_zmin.data_ptr(), param1=step.data_ptr(),
    )
    return _multiply(desc, x, bias, (packed, log_zmin, step), narrow)


def _vq(x, indices_packed, codebook, bias, index_bits, dim, in_features, narrow=False):
    indices_packed, codebook = _contiguous(indices_packed, codebook)
    desc = WeightDesc(
        format=VQ, out_features=indices_packed.shape[0], in_features=in_features, bits=index_bits,
        row_bytes=indices_packed.stride(0), codes=indices_packed.data_ptr(), codebook=codebook.data_ptr(),
        centroids=codebook.shape[0], dim=dim,
    )
    return _multiply(desc, x, bias, (indices_packed, codebook), narrow)


def _nm(x, values, indices, bias, n, m, in_features, narrow=False):
    values = _fp32(values.reshape(indices.shape[0], -1))
    (indices,) = _contiguous(indices)
    desc = WeightDesc(
        format=NM, out_features=indices.shape[0], in_features=in_features, bits=index_bits(m),
        row_bytes=indices.stride(0), codes=indices.data_ptr(), values=values.data_ptr(), n=n, m=m,
    )
    return _multiply(desc, x, bias, (values, indices), narrow)


def _bitmask(x, values, mask, row_start, bias, in_features, narrow=False):
    values = _fp32(values.reshape(-1))
    mask, row_start = _contiguous(mask, row_start)
    desc = WeightDesc(
        format=BITMASK, out_features=mask.shape[0], in_features=in_features, row_bytes=mask.stride(0),
        codes=mask.data_ptr(), values=values.data_ptr(), row_start=row_start.data_ptr(),
    )
    return _multiply(desc, x, bias, (values, mask, row_start), narrow)


def _w8a8(x, packed, scale, bias):
    k, n = x.shape[-1], packed.shape[0]
    if x.numel() // max(1, k) > FUSED_ROWS:
        # Many rows: oneDNN's integer GEMM (the reference's torch._int_mm) is faster than the
        # VNNI rows here (128 x 2048 x 5632: 8.7 vs 25 ms), and exactly as exact.
        return memsave_ops.linear_w8a8(x, packed, scale, bias)
    packed, scale = _contiguous(packed, scale)
    codes, x_scale = memsave_ops.quantize_per_token(x.reshape(-1, k))  # the reference's own rounding
    codes, x_scale = codes.contiguous(), x_scale.reshape(-1).contiguous()
    b = _fp32(bias)
    y = torch.empty((codes.shape[0], n), dtype=torch.float32)
    _lib().ms_linear_w8a8(
        codes.data_ptr(), x_scale.data_ptr(), codes.shape[0], k, packed.data_ptr(), scale.data_ptr(), n, _ptr(b), y.data_ptr()
    )
    return (y if x.dtype == torch.float32 else y.to(x.dtype)).view(*x.shape[:-1], n)


linear_affine_native = twin(memsave_ops.linear_affine.default, "linear_affine_native", _affine)
linear_log_native = twin(memsave_ops.linear_log.default, "linear_log_native", _log)
linear_vq_native = twin(memsave_ops.linear_vq.default, "linear_vq_native", _vq)
linear_nm_native = twin(memsave_ops.linear_nm.default, "linear_nm_native", _nm)
linear_w8a8_native = twin(memsave_ops.linear_w8a8.default, "linear_w8a8_native", _w8a8)
# The same kernels with bf16 products beyond FUSED_ROWS rows (prefill): chosen only where the
# config lets codegen narrow the activations (Kernel.narrows); decode-sized calls are the same
# exact fp32 kernel.
linear_affine_native_bf16 = twin(memsave_ops.linear_affine.default, "linear_affine_native_bf16", functools.partial(_affine, narrow=True))
linear_log_native_bf16 = twin(memsave_ops.linear_log.default, "linear_log_native_bf16", functools.partial(_log, narrow=True))
linear_vq_native_bf16 = twin(memsave_ops.linear_vq.default, "linear_vq_native_bf16", functools.partial(_vq, narrow=True))
linear_nm_native_bf16 = twin(memsave_ops.linear_nm.default, "linear_nm_native_bf16", functools.partial(_nm, narrow=True))


# linear_bitmask with each row's first value index (N + 1, int64) beside the mask.
_BITMASK_SCHEMA = "(Tensor x, Tensor values, Tensor mask, Tensor row_start, Tensor? bias, SymInt in_features) -> Tensor"


def _bitmask_fake(x, values, mask, row_start, bias, in_features):
    return memsave_ops.linear_bitmask(x, values, mask, bias, in_features)


linear_bitmask_native = define_kernel_op("linear_bitmask_native", _BITMASK_SCHEMA, _bitmask, _bitmask_fake)
linear_bitmask_native_bf16 = define_kernel_op(
    "linear_bitmask_native_bf16", _BITMASK_SCHEMA, functools.partial(_bitmask, narrow=True), _bitmask_fake
)


def _workspace(node: fx.Node, narrow: bool = False) -> int:
    """Temporary bytes of a native linear beyond its output (memory/estimate.py): an fp32 copy
    of narrower activations; on the tiled paths the tensors they allocate (the C path's
    per-thread tiles are not tensors)."""
    x, out = node.args[0].meta["val"], node.meta["val"]
    k, n = hint_int(x.shape[-1]), hint_int(out.shape[-1])
    return workspace_bytes(hint_int(x.numel()) // max(1, k), k, n, x.dtype != torch.float32, narrow)


def workspace_bytes(rows: int, k: int, n: int, converts_input: bool = False, narrow: bool = False) -> int:
    """_workspace for a product of `rows` activation rows with a K x N weight (also the budget
    planner's allowance for what a compiled linear holds beyond an eager one)."""
    copy = rows * k * 4 if converts_input else 0
    if narrow and rows > FUSED_ROWS:  # bf16 activations, one bf16 tile, one tile of bf16 products
        step = min(n, NARROW_TILE_ROWS)
        # + room for a second tile: torch's bf16 GEMM (oneDNN) allocates scratch of its own inside
        # the call, e.g. 83584 bytes beyond these three tensors at 96x128 @ 128x512 (measured
        # with memsave.MemoryTracker; invisible to the profiler's per-op counts).
        return copy + rows * k * 2 + 2 * step * k * 2 + rows * step * 2
    if rows <= FUSED_ROWS or _sgemm() is not None:
        return copy  # the C tiled path's per-thread tiles (TILE_ROWS x K fp32) are not tensors
    step = min(n, max(16, TILE_BYTES // (4 * k)))
    return copy + step * k * 4 + rows * step * 4


def bitmask_row_start(mask: torch.Tensor, in_features: int) -> torch.Tensor:
    """(N + 1,) int64: where each row's kept values start in the values array."""
    from memsave.ops.pack import unpack_bits

    counts = torch.zeros(mask.shape[0] + 1, dtype=torch.int64)
    step = max(1, (1 << 22) // max(1, in_features))
    for r0 in range(0, mask.shape[0], step):
        counts[1 + r0 : 1 + r0 + step] = unpack_bits(mask[r0 : r0 + step], 1, in_features).sum(-1, dtype=torch.int64)
    return counts.cumsum_(0)


# -- selection ---------------------------------------------------------------------------


def _dtype_is(arg, *dtypes) -> bool:
    v = arg_val(arg)
    return isinstance(v, torch.Tensor) and v.dtype in dtypes


def _activations_ok(node: fx.Node) -> bool:
    x = arg_val(node.args[0])
    return (
        isinstance(x, torch.Tensor) and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and library() is not None
    )


def _applies_affine(node: fx.Node) -> bool:
    x, packed, scale, offset, bias, bits, group, k = node.args
    return (
        _activations_ok(node) and 2 <= bits <= 8 and _dtype_is(packed, torch.uint8)
        and _dtype_is(scale, torch.float16) and (offset is None or _dtype_is(offset, torch.float16))
        and arg_val(packed).shape[1] == packed_length(-(-k // min(group, k)) * min(group, k), bits)
    )


def _applies_log(node: fx.Node) -> bool:
    x, packed, log_zmin, step, bias, bits, group, k = node.args
    return _activations_ok(node) and 2 <= bits <= 8 and _dtype_is(log_zmin, torch.float16) and _dtype_is(step, torch.float16)


def _applies_vq(node: fx.Node) -> bool:
    x, packed, codebook, bias, index_bits_, dim, k = node.args
    return _activations_ok(node) and dim in (1, 2, 4) and _dtype_is(codebook, torch.float16)


def _applies_nm(node: fx.Node) -> bool:
    return _activations_ok(node) and _dtype_is(node.args[1], torch.float32, torch.bfloat16, torch.float16)


def _applies_w8a8(node: fx.Node) -> bool:
    x, packed, scale, bias = node.args
    v = arg_val(packed)
    return (
        _activations_ok(node) and _dtype_is(scale, torch.float16) and v is not None
        and v.shape[1] == arg_val(x).shape[-1]  # rows unpadded: K a multiple of 8
    )


def _applies_bitmask(node: fx.Node) -> bool:
    mask = node.args[2]
    return (
        _activations_ok(node) and _dtype_is(node.args[1], torch.float32, torch.bfloat16, torch.float16)
        and isinstance(mask, fx.Node) and mask.op == "get_attr"
    )


def _lower_bitmask_to(op):
    def lower(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
        x, values, mask, bias, k = node.args
        with unset_fake_temporarily():  # kernels are selected under the compile's fake mode
            row_start = bitmask_row_start(getattr(gm, mask.target), k)
        builder = GraphBuilder(gm, "codegen:native-bitmask")
        start = builder.constant("memsave_bitmask_row_start", row_start, before=node)
        new = builder.call(op, (x, values, mask, start, bias, k), before=node)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        return new

    return lower


def _many_rows(node: fx.Node) -> bool:
    """More activation rows than the fused kernel takes (a prefill): where bf16 products pay."""
    x = arg_val(node.args[0])
    return hint_int(x.numel()) // max(1, hint_int(x.shape[-1])) > FUSED_ROWS


def has_bf16_products() -> bool:
    """Whether linear.c was built with its avx512_bf16 paths for this CPU (the narrowed decode)."""
    return _lib().ms_isa() >= 3


def _bf16_decode(node: fx.Node) -> bool:
    """Whether linear.c has a narrowed decode path for this node (bf16_path there), on a CPU with
    avx512_bf16: 2- and 4-bit affine or log codes in groups of whole 32-byte blocks, or 4-bit
    affine codes in blocks of 128 that groups of 32, 64 or a multiple of 128 tile."""
    if node.target not in (memsave_ops.linear_affine.default, memsave_ops.linear_log.default):
        return False
    bits, group, k = node.args[5], node.args[6], node.args[7]
    int4_blocks = (node.target == memsave_ops.linear_affine.default and bits == 4 and k % 128 == 0
                   and (group in (32, 64) or group % 128 == 0))
    whole_blocks = bits in (2, 4) and (group % (32 * 8 // bits) == 0 or group >= k)
    return (int4_blocks or whole_blocks) and has_bf16_products()


def _narrowed(applies, *, int8_stays_exact: bool = False):
    """`applies` for the bf16 variant: where it differs from the exact kernel (prefill-sized
    nodes; decode where a bf16 path exists). Affine int8 keeps fp32 products (the format
    chosen for fidelity: MiniLM's cosine 0.9997 is what int8 promises)."""

    def narrowed(node: fx.Node) -> bool:
        if int8_stays_exact and node.args[5] == 8:
            return False
        return applies(node) and (_many_rows(node) or _bf16_decode(node))

    return narrowed


def register() -> None:
    for op in (linear_affine_native, linear_log_native, linear_vq_native, linear_nm_native, linear_bitmask_native):
        WORKSPACE[op] = _workspace
    for op in (linear_affine_native_bf16, linear_log_native_bf16, linear_vq_native_bf16, linear_nm_native_bf16,
               linear_bitmask_native_bf16):
        WORKSPACE[op] = functools.partial(_workspace, narrow=True)
    # Narrowing variants first: select_kernels skips them unless the config allows narrowing.
    for reference, name, exact, bf16, applies, int8 in (
        (memsave_ops.linear_affine.default, "native-affine", linear_affine_native, linear_affine_native_bf16, _applies_affine, True),
        (memsave_ops.linear_log.default, "native-log", linear_log_native, linear_log_native_bf16, _applies_log, False),
        (memsave_ops.linear_vq.default, "native-vq", linear_vq_native, linear_vq_native_bf16, _applies_vq, False),
        (memsave_ops.linear_nm.default, "native-nm", linear_nm_native, linear_nm_native_bf16, _applies_nm, False),
    ):
        register_kernel(reference, Kernel.retarget(f"{name}-bf16", bf16, _narrowed(applies, int8_stays_exact=int8), narrows=True))
        register_kernel(reference, Kernel.retarget(name, exact, applies))
    bitmask = memsave_ops.linear_bitmask.default
    register_kernel(bitmask, Kernel("native-bitmask-bf16", _narrowed(_applies_bitmask), _lower_bitmask_to(linear_bitmask_native_bf16), narrows=True))
    register_kernel(bitmask, Kernel("native-bitmask", _applies_bitmask, _lower_bitmask_to(linear_bitmask_native)))
    register_kernel(memsave_ops.linear_w8a8.default, Kernel.retarget("native-w8a8", linear_w8a8_native, _applies_w8a8))
