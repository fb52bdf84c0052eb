"""Launching the generated kernels, and the custom op `memsave::linear_affine_triton`.

The op has exactly the schema of `memsave::linear_affine` (ops/linear.py), so codegen can
swap one for the other by changing a node's target. It is a plain `torch.library.custom_op`
with a fake kernel (not `torch.library.triton_op`, which does not trace under the
interpreter on CPU): Dynamo, AOTAutograd and Inductor see an opaque op with known output
shape, and Inductor calls it as an extern kernel.

`launch` picks GEMV (≤ GEMV_MAX_ROWS rows of x after flattening leading dims) or GEMM, builds
the kernel for the spec (once per process), and runs it: autotuned over a few block configs
on a GPU (keyed by M's power-of-two bucket, N and K), one fixed small config under
TRITON_INTERPRET=1. Triton is imported only here, on first launch.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Callable

import torch

import memsave.ops  # noqa: F401  (the reference ops the twins copy)
from memsave.codegen.oplib import TRITON_DISPATCH, twin
from memsave.codegen.triton import source, templates
from memsave.codegen.triton.configs import block_configs, fit_block_k
from memsave.codegen.triton.spec import GEMV_MAX_ROWS, VARIANTS, KernelSpec, check_bits, check_dtype, make_spec
from memsave.ops.affine import num_groups
from memsave.ops.pack import packed_length

AUTOTUNE_KEY = ["M_BUCKET", "N", "K"]
_META = ("num_warps", "num_stages")

_lock = threading.Lock()
_kernels: dict[KernelSpec, tuple[Callable, list[dict]]] = {}


def interpreting() -> bool:
    """Whether @triton.jit makes interpreted functions now (TRITON_INTERPRET=1)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # Triton before knobs: the variable itself
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def kernel_for(spec: KernelSpec) -> tuple[Callable, list[dict]]:
    """(the jit function, the block configs it may run with) for `spec`, built once."""
    with _lock:
        if spec not in _kernels:
            module = source.load(templates.render(spec))
            _kernels[spec] = (module.kernel, block_configs(spec))
        return _kernels[spec]


_autotuned: dict[KernelSpec, Callable] = {}


def _autotuner(spec: KernelSpec, fn: Callable, configs: list[dict]) -> Callable:
    with _lock:
        if spec not in _autotuned:
            import triton

            tconfigs = [
                triton.Config(
                    {k: v for k, v in c.items() if k not in _META},
                    num_warps=c["num_warps"],
                    num_stages=c["num_stages"],
                )
                for c in configs
            ]
            _autotuned[spec] = triton.autotune(configs=tconfigs, key=AUTOTUNE_KEY)(fn)
        return _autotuned[spec]


def _check(x, packed, scale, offset, bias, bits, group_size, in_features) -> None:
    check_bits(bits)
    check_dtype(x.dtype)
    if group_size <= 0:
        raise ValueError(f"triton linear_affine: group_size must be positive, got {group_size}")
    if x.dim() < 1 or x.shape[-1] != in_features:
        raise ValueError(f"triton linear_affine: x must be (..., in_features={in_features}), got {tuple(x.shape)}")
    groups = num_groups(in_features, group_size)
    width = packed_length(groups * group_size, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != width:
        raise ValueError(
            f"triton linear_affine: packed must be uint8 (N, {width}) for {bits}-bit codes of "
            f"{in_features} features in groups of {group_size}, got {packed.dtype} {tuple(packed.shape)}"
        )
    n = packed.shape[0]
    for name, t in (("scale", scale), ("offset", offset)):
        if t is not None and tuple(t.shape) != (n, groups):
            raise ValueError(f"triton linear_affine: {name} must be (N, G) = ({n}, {groups}), got {tuple(t.shape)}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"triton linear_affine: bias must be (N,) = ({n},), got {tuple(bias.shape)}")
    for name, t in (("packed", packed), ("scale", scale), ("offset", offset), ("bias", bias)):
        if t is not None and t.device != x.device:
            raise ValueError(
                f"triton linear_affine: {name} is on {t.device}, x on {x.device}: all must be on one device"
            )


def prepare(x: torch.Tensor, out_features: int, in_features: int, interpret: bool, who: str):
    """What every launcher does first: refuse non-CUDA inputs (unless interpreting), view x as
    (M, K) with unit stride along K, allocate y (M, N) in x's dtype."""
    if x.device.type != "cuda" and not interpret:
        raise RuntimeError(
            f"triton {who}: x is on {x.device}; the Triton kernels run on CUDA tensors "
            "(or on any device under TRITON_INTERPRET=1)"
        )
    x2 = x.reshape(-1, in_features)  # (M, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, torch.empty((x2.shape[0], out_features), dtype=x.dtype, device=x.device)


def launch(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
    in_features: int,
    *,
    variant: str | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """y = x @ dequantize(packed, scale, offset).T + bias, like memsave::linear_affine.

    variant: "gemv" / "gemm" to force one (tests, benchmarks); None picks by rows of x.
    config: fixed block sizes (BLOCK_*, num_warps, num_stages) instead of autotuning.
    """
    _check(x, packed, scale, offset, bias, bits, group_size, in_features)
    interpret = interpreting()
    n, k = packed.shape[0], in_features
    x2, y = prepare(x, n, k, interpret, "linear_affine")
    m = x2.shape[0]
    if m == 0 or n == 0:
        return y.reshape(*x.shape[:-1], n)
    if variant is None:
        variant = "gemv" if m <= GEMV_MAX_ROWS else "gemm"
    elif variant not in VARIANTS:
        raise ValueError(f"triton linear_affine: variant must be one of {VARIANTS} or None, got {variant!r}")
    spec = make_spec(variant, bits, group_size, k, offset is None, bias is not None, x.dtype, interpret)
    fn, configs = kernel_for(spec)

    packed, scale = packed.contiguous(), scale.contiguous()
    pointers = [x2, packed, scale]
    if offset is not None:
        pointers.append(offset.contiguous())
    if bias is not None:
        pointers.append(bias.contiguous())
    pointers.append(y)
    m_bucket = 1 << (m - 1).bit_length()
    scalars = (m, n, k, m_bucket, x2.stride(0), packed.stride(0), scale.stride(0), y.stride(0))

    def grid(meta):
        blocks_n = (n + meta["BLOCK_N"] - 1) // meta["BLOCK_N"]
        if variant == "gemv":
            return (m * blocks_n,)
        return (((m + meta["BLOCK_M"] - 1) // meta["BLOCK_M"]) * blocks_n,)

    if config is None and not interpret:
        fn = _autotuner(spec, fn, configs)
        meta = {}
    else:
        meta = dict(config if config is not None else configs[0])
        if fit_block_k(meta["BLOCK_K"], spec) != meta["BLOCK_K"]:
            raise ValueError(
                f"triton linear_affine: BLOCK_K={meta['BLOCK_K']} must divide group_size={group_size} "
                f"(so a K tile lies in one group); try {fit_block_k(meta['BLOCK_K'], spec)}"
            )
    with torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext():
        fn[grid](*pointers, *scalars, **meta)
    return y.reshape(*x.shape[:-1], n)


# memsave::linear_affine on Triton: reads the packed codes, never the dequantized weight. The
# reference's schema and fake kernel (codegen/oplib.py), so selecting it only retargets a node.
linear_affine_triton = twin(
    torch.ops.memsave.linear_affine.default, "linear_affine_triton", launch, dispatch_key=TRITON_DISPATCH
)
