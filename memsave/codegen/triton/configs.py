"""Block sizes for the generated kernels: a handful to autotune over on a GPU, one under the
interpreter (where autotuning would only time numpy, slowly).

Every BLOCK_* is a power of two (tl.arange needs one) and BLOCK_K ≥ MIN_BLOCK_K (tl.dot on a
GPU needs K ≥ 16 for 16-bit inputs; the interpreter would accept less, so it is enforced here
for both). In "tile" scale mode BLOCK_K must also divide group_size, so each K tile lies in
one group: configs are shrunk to fit (group sizes there are multiples of 16, so 16 always fits).
"""

from __future__ import annotations

from memsave.codegen.triton.spec import MIN_BLOCK_K, KernelSpec

# (BLOCK_N, BLOCK_K, num_warps, num_stages). Decode is bandwidth bound: many small programs
# over N keep every SM streaming; wide K tiles give long contiguous byte runs per row.
GEMV_CONFIGS = (
    (8, 256, 2, 2),
    (16, 128, 4, 2),
    (16, 256, 4, 3),
    (32, 128, 4, 2),
    (32, 256, 8, 3),
    (64, 128, 8, 2),
)
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages); GROUP_M swizzles programs for L2 reuse.
GEMM_CONFIGS = (
    (16, 64, 64, 4, 4),
    (32, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (64, 128, 64, 4, 3),
    (128, 64, 64, 4, 3),
    (128, 128, 32, 4, 4),
    (128, 128, 64, 8, 3),
)
GROUP_M = 8
INTERPRET_GEMV = (32, 64, 4, 1)
INTERPRET_GEMM = (16, 32, 32, 4, 1)


def fit_block_k(block_k: int, spec: KernelSpec) -> int:
    """The largest power of two ≤ block_k that keeps a K tile inside one group ("tile" mode)."""
    if block_k < MIN_BLOCK_K or block_k & (block_k - 1):
        raise ValueError(f"BLOCK_K must be a power of two ≥ {MIN_BLOCK_K}, got {block_k}")
    if spec.scales == "tile":
        while spec.group_size % block_k:
            block_k //= 2
    return block_k


def block_configs(spec: KernelSpec) -> list[dict]:
    """Meta-parameter dicts (BLOCK_*, num_warps, num_stages) to try for `spec`, deduplicated."""
    out: list[dict] = []
    if spec.variant == "gemv":
        for bn, bk, warps, stages in (INTERPRET_GEMV,) if spec.interpret else GEMV_CONFIGS:
            out.append(dict(BLOCK_N=bn, BLOCK_K=fit_block_k(bk, spec), num_warps=warps, num_stages=stages))
    else:
        for bm, bn, bk, warps, stages in (INTERPRET_GEMM,) if spec.interpret else GEMM_CONFIGS:
            out.append(
                dict(
                    BLOCK_M=bm,
                    BLOCK_N=bn,
                    BLOCK_K=fit_block_k(bk, spec),
                    GROUP_M=GROUP_M,
                    num_warps=warps,
                    num_stages=stages,
                )
            )
    unique = {tuple(sorted(c.items())): c for c in out}
    return list(unique.values())
