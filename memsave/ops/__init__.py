"""memsave's own ops: torch.library custom ops, each with a plain-torch reference and a fake kernel.

Importing this package registers them (the backend imports it, so graphs can always hold them).
Fast kernels for these ops register in `memsave/codegen/kernels.py`.
"""

from memsave.ops.affine import (  # noqa: F401  (registers memsave::quantize_affine / dequantize_affine)
    bits_per_weight,
    choose_qparams_affine,
    dequantize_affine,
    quantize_affine,
    quantize_weight,
)
from memsave.ops.linear import linear_affine  # noqa: F401  (registers memsave::linear_affine)
from memsave.ops.pack import pack_bits, packed_length, unpack_bits  # noqa: F401
