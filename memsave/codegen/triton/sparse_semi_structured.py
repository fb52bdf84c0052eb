"""2:4-sparse linears on NVIDIA sparse tensor cores (sm80+), through PyTorch's semi-structured
sparse tensors: a kernel with its own weight layout for memsave::linear_nm.

Not Triton, but it serves the same nodes as `sparse_nm.py` on the same devices and is offered
by the same `register()`, ahead of the Triton kernel. Where it applies — n = 2, m = 4, fp16 or
bf16 activations on an sm80+ GPU, values and positions stored as constants, N and K multiples
of the backend's minimum tile — lowering does, once per weight at compile time:

    dense = unpack_nm(values, indices)            # (N, K), on the GPU, transiently
    w = torch.sparse.to_sparse_semi_structured(dense)   # cuSPARSELt, or CUTLASS without it
    node → memsave::linear_semi_structured(x, w.packed, w.meta, bias, backend, N, K)

and the op rebuilds the sparse tensor around those buffers and runs `F.linear(x, w, bias)`.
The subclass itself is never a graph constant: torch.library ops take plain tensors only.

Note [One copy of a 2:4 weight]
The converted buffers are kept in the weight cache (`memsave/weights.py`) under a key derived
from the values' and positions' keys. The entries that held values and positions (their own
two, or one tuple holding both, as the prune pass caches them) are given up for the converted
copy (`WEIGHTS.convert`) and rebuilt from it on demand (to_dense, then `nm_from_dense`, exact),
so the process holds one copy of the weight, not two. Values not from the cache are converted
for the graph alone.

None of this runs on a CPU (`to_sparse_semi_structured` raises there); the tests check the
predicate and the graph rewrite on CPU with the conversion stubbed, the numerics on a GPU.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

import memsave.weight_keys as weight_keys
from memsave.graph.meta import arg_val, op_arg
from memsave.graph.rewrite import GraphBuilder
from memsave.ops.sparse import nm_from_dense, unpack_nm
from memsave.weights import WEIGHTS

KERNEL_NAME = "cuda-semi-structured-2:4"
BACKENDS = ("cusparselt", "cutlass")
DTYPES = (torch.float16, torch.bfloat16)


def _tensor_class(backend: str) -> type:
    if backend not in BACKENDS:
        raise ValueError(f"semi-structured: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cutlass":
        return torch.sparse.SparseSemiStructuredTensorCUTLASS
    return torch.sparse.SparseSemiStructuredTensorCUSPARSELT


def default_backend() -> str:
    """What to_sparse_semi_structured would pick: cuSPARSELt unless CUTLASS is forced or
    cuSPARSELt is missing from this build."""
    if torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS or not torch.backends.cusparselt.is_available():
        return "cutlass"
    return "cusparselt"


def shape_supported(backend: str, dtype: torch.dtype, out_features: int, in_features: int) -> bool:
    """Whether an (N, K) weight in `dtype` can be compressed by `backend` without padding."""
    limits = _tensor_class(backend)._DTYPE_SHAPE_CONSTRAINTS.get(dtype)
    if limits is None:
        return False
    rows, cols = limits.sparse_min_rows, limits.sparse_min_cols
    return out_features >= rows and out_features % rows == 0 and in_features >= cols and in_features % cols == 0


def sparse_weight(packed: torch.Tensor, meta: torch.Tensor | None, backend: str, out_features: int, in_features: int):
    """The SparseSemiStructuredTensor around stored buffers (no copy)."""
    return _tensor_class(backend)(
        torch.Size([out_features, in_features]),
        packed=packed,
        meta=meta,
        packed_t=None,
        meta_t=None,
        compressed_swizzled_bitmask=None,
    )


def to_semi_structured(dense: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, K) 2:4-sparse CUDA weight → the backend's (packed, meta) buffers."""
    w = _tensor_class(backend).from_dense(dense.contiguous())
    return w.packed, w.meta


def from_semi_structured(
    packed: torch.Tensor, meta: torch.Tensor | None, backend: str, out_features: int, in_features: int
) -> torch.Tensor:
    """The dense (N, K) weight back (exact: a copy for CUTLASS, a product with I for cuSPARSELt)."""
    return sparse_weight(packed, meta, backend, out_features, in_features).to_dense()


@torch.library.custom_op("memsave::linear_semi_structured", mutates_args=())
def linear_semi_structured(
    x: torch.Tensor,
    packed: torch.Tensor,
    meta: torch.Tensor | None,
    bias: torch.Tensor | None,
    backend: str,
    out_features: int,
    in_features: int,
) -> torch.Tensor:
    """(..., K) activations × 2:4 weight in the backend's layout → (..., N)."""
    w = sparse_weight(packed, meta, backend, out_features, in_features)
    x2 = x.reshape(-1, in_features).contiguous()  # the sparse matmul takes 2-D, row-major
    return torch.nn.functional.linear(x2, w, bias).reshape(*x.shape[:-1], out_features)


@linear_semi_structured.register_fake
def _(x, packed, meta, bias, backend, out_features, in_features):
    return x.new_empty((*x.shape[:-1], out_features))


# --------------------------------------------------------------------------- selection


def _sm80_or_later(device: torch.device) -> bool:
    try:
        return torch.cuda.get_device_capability(device) >= (8, 0)
    except (AssertionError, RuntimeError):  # no usable CUDA here (e.g. tracing with fake tensors)
        return False


def _is_constant(arg) -> bool:
    return isinstance(arg, fx.Node) and arg.op == "get_attr"


def applies(node: fx.Node) -> bool:
    """A 2:4 memsave::linear_nm node with fp16/bf16 CUDA activations on sm80+, whose values and
    positions are constants (so they can be converted at compile time) of a supported shape."""
    if op_arg(node, "n") != 2 or op_arg(node, "m") != 4:
        return False
    x, values, indices = arg_val(op_arg(node, "x")), arg_val(op_arg(node, "values")), arg_val(op_arg(node, "indices"))
    if not all(isinstance(t, torch.Tensor) for t in (x, values, indices)):
        return False
    if not (_is_constant(op_arg(node, "values")) and _is_constant(op_arg(node, "indices"))):
        return False  # e.g. values dequantized at run time
    if x.device.type != "cuda" or values.device != x.device or indices.device != x.device:
        return False
    if x.dtype not in DTYPES or values.dtype != x.dtype:
        return False
    bias = arg_val(op_arg(node, "bias"))
    if op_arg(node, "bias") is not None and (not isinstance(bias, torch.Tensor) or bias.dtype != x.dtype):
        return False  # cuSPARSELt adds the bias in the weight's dtype
    k = op_arg(node, "in_features")
    if not shape_supported(default_backend(), x.dtype, int(indices.shape[0]), int(k)):
        return False
    return _sm80_or_later(x.device)


def converted(values: torch.Tensor, indices: torch.Tensor, in_features: int, backend: str):
    """(packed, meta) for a 2:4 weight, built once per weight (Note [One copy of a 2:4 weight])."""
    out_features = indices.shape[0]

    def build():
        return to_semi_structured(unpack_nm(values, indices, 2, 4, in_features, values.dtype), backend)

    owners = WEIGHTS.owner(values), WEIGHTS.owner(indices)
    if owners[0] is None or owners[1] is None or owners[0][0] is not owners[1][0]:
        with unset_fake_temporarily(), torch.no_grad():
            return build()
    weight, values_key = owners[0]
    indices_key = owners[1][1]
    to_key = weight_keys.kernel_layout(weight_keys.CUDA_SEMI_STRUCTURED, backend, values_key, indices_key)
    if WEIGHTS.has(weight, to_key):
        return WEIGHTS.convert(weight, to_key, build, {})  # converted by an earlier compile

    def back(form) -> tuple[torch.Tensor, torch.Tensor]:
        return nm_from_dense(from_semi_structured(*form, backend, out_features, in_features), 2, 4)

    return WEIGHTS.convert(weight, to_key, build, _rebuilders(weight, values, indices, values_key, indices_key, back))


def _rebuilders(weight, values, indices, values_key, indices_key, back) -> dict:
    """How to rebuild the cache entries holding `values` and `indices` from the converted form:
    two entries of their own, or one tuple holding both (the prune pass caches (values,
    indices, sqnr)), whose other items are kept. Anything else is not given up."""
    if values_key != indices_key:
        return {values_key: lambda form: back(form)[0], indices_key: lambda form: back(form)[1]}
    if not WEIGHTS.has(weight, values_key):
        return {}
    entry = WEIGHTS.get_or_build(weight, values_key, _not_cached, reads_weight=False)
    if not isinstance(entry, tuple):
        return {}
    at = {id(values): 0, id(indices): 1}
    slots = [at.get(id(item)) for item in entry]
    if sorted(s for s in slots if s is not None) != [0, 1]:
        return {}
    # Only the other items are captured: holding the entry would keep values and indices alive.
    others = {i: item for i, item in enumerate(entry) if slots[i] is None}

    def rebuild(form):
        parts = back(form)
        return tuple(parts[slots[i]] if slots[i] is not None else others[i] for i in range(len(slots)))

    return {values_key: rebuild}


def _not_cached():
    raise RuntimeError("memsave semi-structured: a cache entry vanished while it was converted")


def _constant(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def lower(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    x, bias, k = op_arg(node, "x"), op_arg(node, "bias"), int(op_arg(node, "in_features"))
    values = _constant(gm, op_arg(node, "values"))
    indices = _constant(gm, op_arg(node, "indices"))
    backend = default_backend()
    packed, meta = converted(values, indices, k, backend)
    builder = GraphBuilder(gm, "codegen:semi-structured")
    packed_node = builder.constant("memsave_semi_structured", packed, before=node)
    meta_node = builder.constant("memsave_semi_structured_meta", meta, before=node) if meta is not None else None
    new = builder.call(
        torch.ops.memsave.linear_semi_structured.default,
        (x, packed_node, meta_node, bias, backend, int(indices.shape[0]), k),
        before=node,
    )
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)
    return new


def register() -> None:
    """Offer the lowering for memsave::linear_nm (idempotent)."""
    import memsave.ops  # noqa: F401  (defines memsave::linear_nm)
    from memsave.codegen.kernels import Kernel, register_kernel

    register_kernel(torch.ops.memsave.linear_nm.default, Kernel(KERNEL_NAME, applies, lower))
