"""What a generated Triton kernel for memsave::linear_affine is specialized on.

One `KernelSpec` is one kernel source file. Everything that changes the code (not just the
numbers it runs on) is in the spec; everything else (M, N, K, strides, pointers) is a kernel
argument, so one kernel serves every layer with the same bits / grouping / dtype.

How scales are applied is the main choice, by how a K tile of BLOCK_K codes meets the
quantization groups:

- "channel": one group per row (G = 1). Scale and offset are per output, so they factor out
  of the sum over K: y = s·Σ x·q + m·Σ x. The loop accumulates codes only; the scale is
  applied once, in the epilogue.
- "tile": group_size is a multiple of 16, and every BLOCK_K divides it (configs are chosen
  so), so each K tile lies in one group: one (BLOCK_N,) vector of scales per tile.
- "element": any other group size (smaller than 16, or not a multiple of 16): scales are
  gathered per weight element. Correct for every grouping, slower; a fallback.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memsave.ops.affine import num_groups

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
VARIANTS = ("gemv", "gemm")
SCALE_MODES = ("channel", "tile", "element")
MIN_BLOCK_K = 16  # tl.dot on a GPU needs K ≥ 16 for 16-bit inputs; the interpreter accepts less
# At most this many rows (tokens) of x: GEMV, one program per row, each re-reading its weight
# tile (from L2 after the first row); more rows: GEMM, which reads each tile once but pads the
# rows to BLOCK_M ≥ 16. Untuned: measure the crossover on the GPU (bench --rows 1,4,8,16).
GEMV_MAX_ROWS = 8

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class KernelSpec:
    variant: str  # "gemv" (few rows: decode) or "gemm" (tiles of rows: prefill)
    bits: int  # code width: one of SUPPORTED_BITS
    scales: str  # one of SCALE_MODES (see the module docstring)
    group_size: int  # codes per group along K; 0 in "channel" mode, where it does not matter
    symmetric: bool  # no stored offset: m = -2^(bits-1)·s
    has_bias: bool
    dot_dtype: str  # gemm: the tl.dot input type ("float16", "bfloat16", "float32"); gemv: ""
    input_precision: str  # gemm with float32 dot: "ieee" or "tf32"; otherwise ""
    interpret: bool  # generated for TRITON_INTERPRET=1 (bf16 dots become fp32 there)

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.variant not in VARIANTS:
            raise ValueError(f"triton linear_affine: variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.scales not in SCALE_MODES:
            raise ValueError(f"triton linear_affine: scales must be one of {SCALE_MODES}, got {self.scales!r}")

    @property
    def name(self) -> str:
        """Readable summary, used in file names and error messages."""
        parts = [
            self.variant,
            f"b{self.bits}",
            self.scales if self.scales == "channel" else f"{self.scales}{self.group_size}",
            "sym" if self.symmetric else "asym",
        ]
        if self.has_bias:
            parts.append("bias")
        if self.dot_dtype:
            parts.append(self.dot_dtype + (f"-{self.input_precision}" if self.input_precision else ""))
        if self.interpret:
            parts.append("interp")
        return "_".join(parts)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"triton linear_affine: bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        names = ", ".join(str(d) for d in SUPPORTED_DTYPES)
        raise TypeError(f"triton linear_affine: x must be one of {names}, got {dtype}")


def scale_mode(group_size: int, in_features: int) -> str:
    if num_groups(in_features, group_size) == 1:
        return "channel"
    return "tile" if group_size % MIN_BLOCK_K == 0 else "element"


def make_spec(
    variant: str,
    bits: int,
    group_size: int,
    in_features: int,
    symmetric: bool,
    has_bias: bool,
    dtype: torch.dtype,
    interpret: bool,
) -> KernelSpec:
    """The kernel to run for these arguments; only what changes the code is kept."""
    check_bits(bits)
    check_dtype(dtype)
    mode = scale_mode(group_size, in_features)
    dot_dtype = input_precision = ""
    if variant == "gemm":
        # The interpreter multiplies bf16 as raw bits: compute those dots in fp32 there.
        dot_dtype = "float32" if interpret and dtype == torch.bfloat16 else _DTYPE_NAMES[dtype]
        if dot_dtype == "float32":
            # Follow torch's own setting for fp32 matmuls (off by default: exact fp32).
            input_precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 and not interpret else "ieee"
    return KernelSpec(
        variant=variant,
        bits=bits,
        scales=mode,
        group_size=0 if mode == "channel" else group_size,
        symmetric=symmetric,
        has_bias=has_bias,
        dot_dtype=dot_dtype,
        input_precision=input_precision,
        interpret=interpret,
    )
