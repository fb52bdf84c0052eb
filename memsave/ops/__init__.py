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
from memsave.ops.gptq import quantize_affine_gptq  # noqa: F401  (registers memsave::quantize_affine_gptq)
from memsave.ops.linear import linear_affine  # noqa: F401  (registers memsave::linear_affine)
from memsave.ops.pack import pack_bits, packed_length, unpack_bits  # noqa: F401
from memsave.ops.w8a8 import dequantize_per_token, linear_w8a8, quantize_per_token  # noqa: F401
from memsave.ops.log import (  # noqa: F401  (registers memsave::quantize_log / dequantize_log / linear_log)
    choose_logparams,
    choose_logparams_mse,
    dequantize_log,
    linear_log,
    log_bits_per_weight,
    quantize_log,
    quantize_weight_log,
)
from memsave.ops.nf4 import (  # noqa: F401  (registers memsave::quantize_nf4 / dequantize_nf4 / linear_nf4)
    NF4_LEVELS,
    dequantize_nf4,
    linear_nf4,
    nf4_bits_per_weight,
    quantize_nf4,
    quantize_weight_nf4,
)
from memsave.ops.vq import (  # noqa: F401  (registers memsave::quantize_vq / dequantize_vq / linear_vq)
    dequantize_vq,
    kmeans_codebook,
    linear_vq,
    quantize_vq,
    quantize_weight_vq,
    vq_bits_per_weight,
)
from memsave.ops.sparse import (  # noqa: F401  (registers memsave::densify_bitmask / linear_bitmask / densify_nm / linear_nm)
    bitmask_bytes,
    densify_bitmask,
    densify_nm,
    linear_bitmask,
    linear_nm,
    nm_bytes,
    nm_from_dense,
    nm_keep_mask,
    pack_bitmask,
    pack_nm,
    unpack_bitmask,
    unpack_nm,
)
from memsave.ops.chunked_ce import linear_cross_entropy, linear_cross_entropy_backward  # noqa: F401  (registers memsave::linear_cross_entropy(_backward))
from memsave.ops.step_in_backward import step_in_backward  # noqa: F401  (registers memsave::step_in_backward)
from memsave.ops.kv_cache import (  # noqa: F401  (registers memsave::quantize_kv_int8 / dequantize_kv_int8 / attention_int8_kv)
    attention_int8_kv,
    attention_int8_kv_reference,
    dequantize_kv_int8,
    kv_int8_bytes,
    quantize_kv_int8,
)
from memsave.ops.kv_lowbit import (  # noqa: F401  (registers the KIVI-layout cache ops: quantize/dequantize_kv_tokens/channels, attention_kivi)
    attention_kivi,
    attention_kivi_reference,
    dequantize_kv_channels,
    dequantize_kv_tokens,
    kv_lowbit_bytes,
    quantize_kv_channels,
    quantize_kv_tokens,
)
