"""Every key of the weight cache (`weights.WEIGHTS`), in one place: what each caches and which
step builds it. A recompile finds its work by these keys, and memsave.save / memsave.load
write and restore entries by them, so passes, codegen and serialize spell keys only here.
"""

from __future__ import annotations

from typing import Hashable

CPU_LAYOUTS = ("cpu_int4", "cpu_int8")  # ATen's packed CPU layouts (codegen/cpu.py)
CUDA_SEMI_STRUCTURED = "cuda_semi_structured"  # a 2:4 weight in PyTorch's semi-structured layout
# Every kernel's own layout (WEIGHTS.convert): memsave.save stores the generic forms they are
# rebuilt from instead, and a compile converts those again.
KERNEL_LAYOUTS = (*CPU_LAYOUTS, CUDA_SEMI_STRUCTURED)


# -- quantize (passes/aten/quantize.py, fold_weights.py) ---------------------------------------


def quant_params(scheme: str, bits: int, group: int, symmetric: bool, method: str) -> tuple:
    """A quantized weight's side parameters ((scale, offset), or the scheme's own). The affine
    form, ("qparams", bits, group, symmetric, method), is the one memsave.save stores."""
    if scheme == "affine":
        return ("qparams", bits, group, symmetric, method)
    return ("params", scheme, bits, group, symmetric, method)


def is_affine_params(key: Hashable) -> bool:
    return isinstance(key, tuple) and len(key) == 5 and key[0] == "qparams"


def packed(params_key: tuple) -> tuple:
    """The packed codes quantized with `params_key`'s parameters."""
    return ("packed", params_key)


def is_packed(key: Hashable) -> bool:
    return isinstance(key, tuple) and key[:1] == ("packed",)


def sqnr(params_key: tuple) -> tuple:
    """The weight's quantization SQNR (dB), for the per-layer report."""
    return ("sqnr", params_key)


def awq(params_key: tuple) -> tuple:
    """AWQ's (column scale, alpha) found for these parameters."""
    return ("awq", *params_key)


# -- kernel layouts (codegen) ------------------------------------------------------------------


def kernel_layout(layout: str, *source_keys: Hashable) -> tuple:
    """A kernel's own copy of cached forms (e.g. "cpu_int4" of the packed codes and their
    parameters): WEIGHTS.convert keeps it in place of the sources and rebuilds them from it."""
    return (layout, *source_keys)


def cpu_int4(params_key: tuple) -> tuple:
    """ATen's CPU int4 layout of the codes and parameters of `params_key` (codegen/cpu.py)."""
    return kernel_layout("cpu_int4", packed(params_key), params_key)


def is_kernel_layout(key: Hashable) -> bool:
    return isinstance(key, tuple) and len(key) > 0 and key[0] in KERNEL_LAYOUTS


# -- prune, factorize, precision ---------------------------------------------------------------


def pruned(structure: str, method: str, sparsity: float) -> tuple:
    """(values, metadata, sqnr) of an unstructured or N:M pruned weight (passes/aten/prune.py)."""
    return ("prune", structure, method, sparsity)


def pruned_group(kind: str, method: str, sparsity: float, members: Hashable) -> tuple:
    """Structured pruning of one channel or head group (passes/aten/prune_structured.py):
    kind "structured" caches a member's pruned tensor, "channels" / "heads" the kept indices."""
    return (f"prune-{kind}", method, sparsity, members)


def spectrum(method: str, damp: float) -> tuple:
    """The weight's singular values for rank allocation (passes/aten/factorize.py)."""
    return ("spectrum", method, damp)


def factors(method: str, rank: int, damp: float) -> tuple:
    """(U, V, relative error) of the rank-`rank` factorization."""
    return ("factor", method, rank, damp)


def precision(dtype) -> tuple:
    """The weight stored in a narrow dtype (passes/aten/mixed_precision.py)."""
    return ("precision", dtype)
