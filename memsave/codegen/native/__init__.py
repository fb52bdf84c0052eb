"""memsave's own CPU kernels, in C: linears that read compressed weights directly.

- `linear.c`: the kernels (fused decode-and-multiply for small batches, tile decoders for the
  GEMM path, exact int8×int8 for W8A8); AVX-512 where the CPU has it, plain C elsewhere.
- `build.py`: compiles linear.c for this machine on first use and loads it (ctypes).
- `kernels.py`: one torch op per stored format, each with its reference op's schema, offered
  to codegen's kernel registry (`codegen/kernels.py`) for CPU activations.
"""
