"""CPU fast paths for memsave::linear_affine, on ATen's packed-weight kernels.

- 4-bit, groups of 32/64/128/256 with K a multiple of the group, N a multiple of 64:
  `torch._weight_int4pack_mm_for_cpu`, weight in ATen's CPU int4 layout.
- 8-bit per-channel symmetric: `torch._weight_int8pack_mm`.

Both are exact only for bf16 activations (then they compute what the reference computes, up
to bf16 rounding: the reference rounds the dequantized weight to bf16, the kernels keep scales
in bf16). With fp32 activations ATen takes slow generic loops, so they serve only graphs whose
activations are bf16: quantize's compute_dtype="bfloat16" (casts in the graph) or a bf16 model.
An fp32 model with the default options runs memsave's own kernels (codegen/native), which read
fp32 activations directly and are faster here than these on a bf16 copy.

One copy of each weight: when a kernel with its own layout is chosen, the weight cache
converts memsave's packed codes (and scales) into that layout and keeps only the converted
copy; the generic form is rebuilt from it, exactly for the codes, when a later compile
(a recompile, a new shape) asks for it. The layout conversions are checked against torch's
own converter at first use; if this torch packs differently, the int4 kernel is not used.
"""

from __future__ import annotations

import functools

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

import memsave.ops  # noqa: F401  (registers memsave::linear_affine)
import memsave.weight_keys as weight_keys
from memsave.codegen.kernels import Kernel, register_kernel
from memsave.codegen.oplib import define_kernel_op
from memsave.graph.rewrite import GraphBuilder
from memsave.ops.pack import pack_bits, unpack_bits
from memsave.weights import WEIGHTS

memsave_ops = torch.ops.memsave
INT4_GROUPS = (32, 64, 128, 256)
INT4_BLOCK_N = 64  # ATen's CPU int4 layout packs rows in blocks of 64


# -- layouts --------------------------------------------------------------------------------


def to_int4pack(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """memsave 4-bit codes (N, K/2) → ATen CPU int4 layout (N, K/2).

    Within each block of 64 rows, byte (k, d) holds row d in its low nibble and row d + 32 in
    its high nibble; blocks are stored one after another, k-major.
    """
    codes = unpack_bits(packed, 4, k).reshape(n // INT4_BLOCK_N, 2, INT4_BLOCK_N // 2, k)  # (nb, half, d, K)
    byte = codes[:, 0] | (codes[:, 1] << 4)  # (nb, d, K)
    return byte.transpose(1, 2).contiguous().reshape(n, k // 2)


def from_int4pack(weight: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The exact inverse of to_int4pack."""
    byte = weight.reshape(n // INT4_BLOCK_N, k, INT4_BLOCK_N // 2).transpose(1, 2)  # (nb, d, K)
    codes = torch.stack([byte & 0xF, byte >> 4], dim=1)  # (nb, half, d, K)
    return pack_bits(codes.reshape(n, k), 4)


@functools.cache
def int4_layout_matches_torch() -> bool:
    """Does this torch pack CPU int4 weights the way to_int4pack does?"""
    if not hasattr(torch, "_convert_weight_to_int4pack_for_cpu"):
        return False
    with unset_fake_temporarily():  # called during compilation, under the fake mode
        g = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 16, (128, 64), generator=g, dtype=torch.int32)
        theirs = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        ours = to_int4pack(pack_bits(codes.to(torch.uint8), 4), 128, 64)
        return theirs.shape == ours.shape and torch.equal(theirs, ours)


def int4_scales_zeros(scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """(N, G) scale/offset → (G, N, 2) bf16 [scale, zero] for ATen: w = (q − 8)·scale + zero."""
    s = scale.float()
    m = offset.float() if offset is not None else -8 * s
    return torch.stack([s, m + 8 * s], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)


def qparams_from_int4(scales_zeros: torch.Tensor, symmetric: bool):
    s = scales_zeros[..., 0].float().transpose(0, 1)
    m = scales_zeros[..., 1].float().transpose(0, 1) - 8 * s
    return s.to(torch.float16).contiguous(), (None if symmetric else m.to(torch.float16).contiguous())


# -- kernels as ops ---------------------------------------------------------------------------
# The kernels take bf16 activations. Given wider ones (fp32), they run on a bf16 copy and return
# the activations' dtype: that is the "narrowed" use, chosen only when the quantize config lets
# codegen pick the fastest kernel (compute_dtype None, the default); its error shows in the report.


def _in_bf16(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.dtype == torch.bfloat16 else x2.to(torch.bfloat16)


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, out_features: int) -> torch.Tensor:
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], out_features)


def _int4(x, weight, scales_zeros, bias, group_size, out_features):
    return _finish(torch._weight_int4pack_mm_for_cpu(_in_bf16(x), weight, group_size, scales_zeros), x, bias, out_features)


def _int8(x, weight, scales, bias):
    return _finish(torch._weight_int8pack_mm(_in_bf16(x), weight, scales), x, bias, weight.shape[0])


linear_int4_cpu = define_kernel_op(
    "linear_int4_cpu",
    "(Tensor x, Tensor weight, Tensor scales_zeros, Tensor? bias, SymInt group_size, SymInt out_features) -> Tensor",
    _int4,
    lambda x, weight, scales_zeros, bias, group_size, out_features: x.new_empty((*x.shape[:-1], out_features)),
)
linear_int8_cpu = define_kernel_op(
    "linear_int8_cpu",
    "(Tensor x, Tensor weight, Tensor scales, Tensor? bias) -> Tensor",
    _int8,
    lambda x, weight, scales, bias: x.new_empty((*x.shape[:-1], weight.shape[0])),
)


# -- selection ----------------------------------------------------------------------------------


def _parts(gm: fx.GraphModule, node: fx.Node):
    x, packed, scale, offset, bias, bits, group, k = node.args
    val = x.meta["val"]
    tensors = [getattr(gm, a.target) if isinstance(a, fx.Node) and a.op == "get_attr" else None for a in (packed, scale, offset)]
    return val, tensors, bias, bits, group, k


def _owned(tensor) -> bool:
    return tensor is not None and WEIGHTS.owner(tensor) is not None


def _applies_int4(gm_of):
    def applies(node: fx.Node) -> bool:
        gm = gm_of(node)
        val, (packed, scale, offset), _, bits, group, k = _parts(gm, node)
        n = packed.shape[0] if packed is not None else -1
        return (
            val.device.type == "cpu" and val.dtype == torch.bfloat16 and bits == 4 and group in INT4_GROUPS
            and k % group == 0 and n % INT4_BLOCK_N == 0 and _owned(packed) and _owned(scale)
            and int4_layout_matches_torch()
        )

    return applies


def _lower_int4(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    val, (packed, scale, offset), bias, bits, group, k = _parts(gm, node)
    n = packed.shape[0]
    weight, packed_key = WEIGHTS.owner(packed)
    _, qparams_key = WEIGHTS.owner(scale)
    symmetric = offset is None
    w4, sz = WEIGHTS.convert(
        weight, weight_keys.kernel_layout("cpu_int4", packed_key, qparams_key),
        lambda: (to_int4pack(packed, n, k), int4_scales_zeros(scale, offset)),
        rebuild={
            packed_key: lambda kernel: from_int4pack(kernel[0], n, k),
            qparams_key: lambda kernel: qparams_from_int4(kernel[1], symmetric),
        },
    )
    builder = GraphBuilder(gm, "codegen:cpu-int4")
    w_node = builder.constant("memsave_int4pack", w4, before=node)
    sz_node = builder.constant("memsave_int4_scales_zeros", sz, before=node)
    return _replace(builder, node, memsave_ops.linear_int4_cpu.default, (node.args[0], w_node, sz_node, bias, group, n))


def _applies_int8(gm_of):
    def applies(node: fx.Node) -> bool:
        gm = gm_of(node)
        val, (packed, scale, offset), _, bits, group, k = _parts(gm, node)
        return (
            val.device.type == "cpu" and val.dtype == torch.bfloat16 and bits == 8 and offset is None
            and node.args[3] is None and group == k and _owned(packed) and _owned(scale)
        )

    return applies


def _lower_int8(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    val, (packed, scale, _), bias, bits, group, k = _parts(gm, node)
    weight, packed_key = WEIGHTS.owner(packed)
    _, qparams_key = WEIGHTS.owner(scale)
    # Codes are stored offset by 128; as signed bytes that is a flip of the top bit.
    w8, s8 = WEIGHTS.convert(
        weight, weight_keys.kernel_layout("cpu_int8", packed_key, qparams_key),
        lambda: ((packed ^ 0x80).view(torch.int8), scale.reshape(-1).to(torch.bfloat16)),
        rebuild={
            packed_key: lambda kernel: kernel[0].view(torch.uint8) ^ 0x80,
            qparams_key: lambda kernel: (kernel[1].float().to(torch.float16).reshape(-1, 1), None),
        },
    )
    builder = GraphBuilder(gm, "codegen:cpu-int8")
    w_node = builder.constant("memsave_int8", w8, before=node)
    s_node = builder.constant("memsave_int8_scales", s8, before=node)
    return _replace(builder, node, memsave_ops.linear_int8_cpu.default, (node.args[0], w_node, s_node, bias))


def _replace(builder: GraphBuilder, node: fx.Node, op, args) -> fx.Node:
    new = builder.call(op, args, before=node)
    node.replace_all_uses_with(new)
    builder.gm.graph.erase_node(node)
    return new


def register() -> None:
    gm_of = lambda node: node.graph.owning_module  # noqa: E731
    affine = memsave_ops.linear_affine.default
    register_kernel(affine, Kernel("cpu-int4pack", _applies_int4(gm_of), _lower_int4))
    register_kernel(affine, Kernel("cpu-int8pack", _applies_int8(gm_of), _lower_int8))
    # For fp32 activations the native kernels (codegen/native) run every format; with
    # narrowing allowed, their prefill products are bf16 (a many-rows int4 linear: 3x faster
    # than this kernel, which the default path therefore does not use; its decode is faster
    # than the native fp32 one, 0.30 vs 0.61 ms at 5632 x 2048, but converting to its layout
    # would leave the prefill graphs a second copy of the weight to read).
