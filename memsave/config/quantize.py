"""quantize: weight quantization of linears (and embeddings), and its short names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from memsave.config.base import FamilyConfig, LayerSelection, OptionError


QUANT_BITS = (2, 3, 4, 8)
QUANT_GROUPS = (None, 32, 64, 128, 256)
QUANT_METHODS = ("rtn", "mse", "awq", "gptq")
QUANT_SCHEMES = ("affine", "log", "vq", "nf4")


def _parse_quant_name(name: str) -> dict[str, Any] | None:
    """`int4`, `int4-g64`, `int3-g32-asym-mse`, `log4-g128`, `vq2`, ... → QuantizeConfig fields."""
    vq = re.fullmatch(r"vq([2348])", name)
    if vq is not None:
        return {"scheme": "vq", "bits": int(vq.group(1))}
    nf4 = re.fullmatch(r"nf4(?:-g(\d+))?", name)
    if nf4 is not None:  # QLoRA's 4-bit NormalFloat, blocks of 64 by default
        return {"scheme": "nf4", "bits": 4, "group_size": int(nf4.group(1) or 64)}
    m = re.fullmatch(r"(int|log)([2348])(?:-g(\d+))?(?:-(sym|asym))?(?:-(rtn|mse|awq|gptq))?", name)
    if m is None:
        return None
    kind, bits, group, sym, method = m.groups()
    fields_: dict[str, Any] = {"bits": int(bits), "scheme": "affine" if kind == "int" else "log"}
    if group is not None:
        fields_["group_size"] = int(group)
    if sym is not None:
        fields_["symmetric"] = sym == "sym"
    if method is not None:
        fields_["method"] = method
    return fields_


@dataclass(frozen=True)
class QuantizeConfig(LayerSelection, FamilyConfig):
    """Weight quantization of linear (and optionally embedding) weights.

    scheme: "affine" (linear levels), "log" (logarithmic levels, sign kept), "vq" (k-means
    codebook of 2^(bits·d) vectors of d consecutive weights, d the largest with bits·d ≤ 8) or
    "nf4" (QLoRA's 4-bit NormalFloat levels times each block's absmax, the absmax double-quantized
    to int8; bits 4, method "rtn", a group_size: short name 'nf4' = blocks of 64).
    bits: 2, 3, 4 or 8. group_size: None (one group per output row, "per channel") or 32, 64,
    128, 256 input features per group. symmetric: codes centred on zero (no stored offset) or
    asymmetric (min/max range, fp16 offset per group). method: "rtn" round-to-nearest, "mse"
    an error-minimizing clip search per group, "awq" activation-aware channel scaling searched
    on calibration data, "gptq" error-compensating rounding with the inputs' Hessian (both need
    memsave.calibrate(model, batches) before compiling; without it they fall back to "mse"). include/exclude: glob patterns over weight names
    (e.g. "layers.*.mlp.*"); overrides: {pattern: {field: value}} for per-layer schemes.
    embeddings: also quantize embedding tables. free_weights: release the full-precision
    originals once every use in the graph reads the compressed copy. compute_dtype: None (the
    default) lets codegen pick the fastest kernel this machine has, which may run a matmul on a
    bf16 copy of fp32 activations where that is faster (int4 on ATen's CPU kernel; the error is
    reported like any lossy pass); "float32" keeps the activations as they are (exact w.r.t.
    the dequantized weights); "bfloat16"/"float16" casts the inputs of every quantized matmul
    (explicit casts in the graph, error reported). activations: "int8" quantizes the
    linears' inputs per token at run time too (W8A8, short name "w8a8").
    """

    family: ClassVar[str] = "quantize"
    name_pattern: ClassVar[str] = "'int<bits>[-g<group>][-sym/-asym][-rtn/-mse/-awq/-gptq]', 'log<bits>[-g<group>][-mse]', 'vq<bits>', 'nf4[-g<group>]'"
    name_parser: ClassVar = staticmethod(_parse_quant_name)
    name_example: ClassVar[str] = 'int4-g128-asym'
    # int4 alone is memsave's int4 recipe; see docs/quantization.md for why this one.
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {
        "int8": {"bits": 8, "group_size": None, "symmetric": True, "method": "rtn"},
        # memsave's int4 recipe (4.5 bits/weight): GPTQ when memsave.calibrate ran, otherwise
        # the MSE search. Chosen by benchmarks/bench_quant_fidelity.py on the real MiniLM.
        "int4": {"bits": 4, "group_size": 64, "symmetric": False, "method": "gptq"},
        "w8a8": {"bits": 8, "group_size": None, "symmetric": True, "method": "rtn", "activations": "int8"},
    }

    scheme: str = "affine"
    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    method: str = "rtn"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    overrides: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    embeddings: bool = False
    free_weights: bool = True
    compute_dtype: str | None = None
    activations: str | None = None

    override_keys: ClassVar[tuple[str, ...]] = ("bits", "group_size", "symmetric", "method")

    def __post_init__(self):
        self._check_choice("scheme", self.scheme, QUANT_SCHEMES)
        self._check_choice("bits", self.bits, QUANT_BITS)
        self._check_choice("group_size", self.group_size, QUANT_GROUPS)
        self._check_choice("method", self.method, QUANT_METHODS)
        for name in ("symmetric", "embeddings", "free_weights"):
            self._check_choice(name, getattr(self, name), (True, False))
        self._check_choice("compute_dtype", self.compute_dtype, (None, "float32", "bfloat16", "float16"))
        self._check_choice("activations", self.activations, (None, "int8"))
        narrow = self.compute_dtype in ("bfloat16", "float16")
        if self.scheme != "affine" and (self.method in ("awq", "gptq") or self.activations or narrow):
            raise OptionError(
                f"options['quantize']: scheme {self.scheme!r} supports methods 'rtn'/'mse' only, without "
                "activations or compute_dtype (those need the affine scheme)"
            )
        if self.scheme == "nf4" and (self.bits != 4 or self.group_size is None or self.method != "rtn"):
            raise OptionError(
                "options['quantize']: scheme 'nf4' is 4 bits, nearest level (method 'rtn'), with a group_size "
                f"of 32, 64, 128 or 256; got bits={self.bits}, group_size={self.group_size}, method={self.method!r}"
            )
        if self.activations == "int8" and (
            self.bits != 8 or not self.symmetric or self.group_size is not None or narrow
        ):
            raise OptionError(
                "options['quantize']: activations='int8' (W8A8) needs int8 per-channel symmetric weights "
                "(bits=8, group_size=None, symmetric=True) and no compute_dtype; use the short name 'w8a8'"
            )
        self._normalize_selection()

    def describe(self) -> str:
        if self.scheme == "vq":
            return f"vq {self.bits} bits/weight"
        if self.scheme == "nf4":
            return f"nf4 g{self.group_size} (double-quantized absmax)"
        group = "per-channel" if self.group_size is None else f"g{self.group_size}"
        if self.scheme == "log":
            return f"log{self.bits} {group} {self.method}"
        acts = ", int8 activations" if self.activations == "int8" else ""
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'} {self.method}{acts}"
