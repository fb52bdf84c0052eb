"""The forms a weight can take in a plan, with their exact stored bytes and the weight the
compiled model will compute with.

A form is what the passes make of one weight, in the pipeline's order (prune → factorize →
quantize): optionally pruned (2:4, or unstructured at a sparsity) or factorized (U·V at a share
of the dense parameters), then optionally quantized, where what is quantized is what is stored
(the weight itself, its kept values, or both factors). Embedding tables take the quantized forms
only (the prune and factorize passes rewrite linears).

A form becomes, for one weight, the per-layer option fields of each pass family that give it
(`Form.settings`: the methods that need calibration statistics where the weight has them, as the
passes' documented fallbacks would, else their plain counterparts). The planner scores exactly
those settings: `stored_bytes` counts what the passes store for them, and `reconstructed` builds
the weight through the passes' own functions (pruned_parts, factor_parts, weight_codes) from the
configs that the same options give, so the error a plan predicts is that of the compile.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from memsave.calibrate import CALIBRATION
from memsave.config import FactorizeConfig, PruneConfig, QuantizeConfig
from memsave.ops.affine import bits_per_weight
from memsave.ops.lowrank import rank_for_ratio
from memsave.ops.pack import packed_length
from memsave.ops.sparse import (
    bitmask_bytes,
    compressed_features,
    index_bits,
    unpack_bitmask,
    unpack_nm,
)
from memsave.passes.aten.factorize import decomposition, factor_parts
from memsave.passes.aten.prune import kept_weights, pruned_parts
from memsave.passes.aten.quantize import resolve_method, weight_codes

Settings = dict[str, dict[str, Any]]  # family ("prune", "factorize", "quantize") -> its per-layer override fields


@dataclass(frozen=True)
class Form:
    """One entry of the menu: optionally pruned (`structure`) or factorized (`share`), then
    optionally quantized (`bits` ...). The same form gives layers of other shapes other ranks
    and counts; settings() is what it means for one weight."""

    name: str
    bits: int | None = None  # quantized to this many bits; None: stored in the weight's dtype
    group_size: int | None = None  # None: per output channel
    symmetric: bool = False
    method: str = "gptq"
    structure: str | None = None  # pruned first: "2:4" or "unstructured"; None: not pruned
    sparsity: float = 0.0  # unstructured: the share of the weights removed
    share: float | None = None  # factorized first, at the largest rank r with r·(N+K) <= share·N·K

    def settings(self, n: int, k: int, element_size: int = 4, *, embedding: bool = False,
                 wanda: bool = False, whitened: bool = False) -> Settings | None:
        """The per-layer option fields, per pass family, that give an (n, k) weight this form, or
        None where it does not apply: a table and a prune or factorize form, an N:M structure
        that does not divide k, a bitmask that would not be smaller than dense (the prune pass
        keeps such a layer dense), a share below rank 1. wanda / whitened: the weight has the
        statistics Wanda's scores (mean x²) / SVD-LLM's whitening (the Gram matrix) need."""
        if embedding and (self.structure is not None or self.share is not None):
            return None
        found: Settings = {}
        if self.structure is not None:
            prune = {"structure": self.structure, "method": "wanda" if wanda else "magnitude"}
            if self.structure == "unstructured":
                prune["sparsity"] = self.sparsity
            cfg = PruneConfig(**prune)
            if cfg.n_m is not None and k % cfg.n_m[1]:
                return None
            if cfg.n_m is None and bitmask_bytes(n, k, kept_weights(n, k, cfg), element_size) >= n * k * element_size:
                return None
            found["prune"] = prune
        if self.share is not None:
            rank = rank_for_ratio(n, k, self.share)
            if rank < 1:
                return None
            found["factorize"] = {"method": "svd-llm" if whitened else "svd", "rank": rank}
        if self.bits is not None:
            found["quantize"] = {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                                 "method": self.method}
        return found

    def for_weight(self, weight: torch.Tensor, *, embedding: bool = False) -> Settings | None:
        """settings() for this weight, with the calibration statistics memsave.calibrate left for it."""
        stats = CALIBRATION.get(weight)
        n, k = weight.shape
        return self.settings(n, k, weight.element_size(), embedding=embedding,
                             wanda=stats is not None and stats.sq_mean is not None,
                             whitened=stats is not None and stats.gram is not None)

    def bytes(self, n: int, k: int, element_size: int = 4, **statistics: bool) -> int:
        """Stored bytes of an (n, k) weight in this form (settings(): the same keywords)."""
        settings = self.settings(n, k, element_size, **statistics)
        if settings is None:
            raise ValueError(f"form {self.name!r} does not apply to a {n}x{k} weight")
        return stored_bytes(n, k, element_size, settings)

    def scheme(self) -> QuantizeConfig:
        return QuantizeConfig(bits=self.bits, group_size=self.group_size, symmetric=self.symmetric, method=self.method)


INT8 = {"bits": 8, "group_size": None, "symmetric": True, "method": "rtn"}
INT4_G128 = {"bits": 4, "group_size": 128, "symmetric": False, "method": "gptq"}
DENSE = Form("dense")
FORMS: tuple[Form, ...] = (
    DENSE,
    Form("int8", 8, None, True, "rtn"),
    Form("int4-g128", 4, 128),
    Form("int4-g64", 4, 64),
    Form("int4-g32", 4, 32),
    Form("int3-g32", 3, 32),
    Form("int3-g128", 3, 128),
    Form("int2-g32", 2, 32),
    Form("int2-g128", 2, 128),
    # 2:4 (wanda where calibrated): values + 2-bit positions; the values in int8 or int4 too
    Form("2:4", structure="2:4"),
    Form("2:4+int8", **INT8, structure="2:4"),
    Form("2:4+int4-g128", **INT4_G128, structure="2:4"),
    # unstructured: values + a bitmask, stored only where smaller than dense
    Form("sparse-50", structure="unstructured", sparsity=0.5),
    Form("sparse-75", structure="unstructured", sparsity=0.75),
    Form("sparse-90", structure="unstructured", sparsity=0.9),
    Form("sparse-50+int4-g128", **INT4_G128, structure="unstructured", sparsity=0.5),
    # low rank (SVD-LLM where calibrated): U·V at a share of the dense parameters; a layer that
    # is nearly low-rank is stored exactly in few bytes, and int8 factors take a quarter of that
    Form("lowrank-1/8", share=1 / 8),
    Form("lowrank-1/32", share=1 / 32),
    Form("lowrank-1/2+int8", **INT8, share=1 / 2),
    Form("lowrank-1/4+int8", **INT8, share=1 / 4),
    Form("lowrank-1/8+int8", **INT8, share=1 / 8),
    Form("lowrank-1/16+int8", **INT8, share=1 / 16),
    Form("lowrank-1/32+int8", **INT8, share=1 / 32),
    Form("lowrank-1/4+int4-g128", **INT4_G128, share=1 / 4),
)
FORMS_BY_NAME = {f.name: f for f in FORMS}


def stored_bytes(n: int, k: int, element_size: int, settings: Settings) -> int:
    """What the passes store for an (n, k) weight with these settings: its own storage, the kept
    values and their positions (2:4: ceil(log2 4) = 2 bits each; unstructured: one bit per weight),
    or the factors U (n, r) and V (r, k); each stored part quantized where `quantize` is set
    (packed codes + fp16 scales, + fp16 offsets when asymmetric; a last group a row does not fill
    is stored whole, as the quantize ops store it)."""
    quantize = settings.get("quantize")

    def part(rows: int, cols: int) -> int:
        if quantize is None:
            return rows * cols * element_size
        group = _group(cols, quantize["group_size"])
        return round(bits_per_weight(rows, cols, quantize["bits"], group, quantize["symmetric"]) * rows * cols / 8)

    if "prune" in settings:
        cfg = PruneConfig(**settings["prune"])
        if cfg.n_m is not None:
            kept = compressed_features(k, *cfg.n_m)  # values per row
            return part(n, kept) + n * packed_length(kept, index_bits(cfg.n_m[1]))
        return part(1, kept_weights(n, k, cfg)) + n * packed_length(k, 1)  # values (1, nnz) + bitmask
    if "factorize" in settings:
        rank = settings["factorize"]["rank"]
        return part(n, rank) + part(rank, k)
    return part(n, k)


def _group(cols: int, group_size: int | None) -> int:
    return cols if group_size is None or group_size >= cols else group_size


def layer_config(family_config, name: str, fields: dict[str, Any]):
    """The config the compile gives weight `name` for options {family: {"include": [name],
    "overrides": {name: fields}}} (what Plan.options writes): the top level's defaults, the
    override applied, by the config's own for_weight."""
    return family_config.parse({"include": [name], "overrides": {name: fields}}).for_weight(name)


def reconstructed(weight: torch.Tensor, form: Form | Settings, name: str = "weight",
                  parts: dict | None = None) -> torch.Tensor:
    """The fp32 weight the compiled model computes with under `form` (a Form: its settings for
    this weight; or settings), nothing cached in memsave's weight cache. `weight`: the parameter
    itself (calibration statistics are keyed by it). `parts`: a dict the caller keeps per weight,
    where the pruned values and factors of one structure or rank are shared between the forms
    that quantize them differently."""
    settings = form.for_weight(weight) if isinstance(form, Form) else form
    if settings is None:
        raise ValueError(f"form {form.name!r} does not apply to {name} {tuple(weight.shape)}")
    parts = {} if parts is None else parts
    quantize = settings.get("quantize")
    k = weight.shape[1]
    with torch.no_grad():
        if "prune" in settings:
            cfg = layer_config(PruneConfig, name, settings["prune"])
            key = ("prune", cfg.structure, cfg.method, cfg.sparsity)
            if key not in parts:
                parts[key] = pruned_parts(weight, name, cfg)[:2]
            values, meta = parts[key]
            values = _stored(values, name, quantize)
            if cfg.n_m is not None:
                return unpack_nm(values, meta, *cfg.n_m, k, torch.float32)
            return unpack_bitmask(values, meta, k, torch.float32)
        if "factorize" in settings:
            cfg = layer_config(FactorizeConfig, name, settings["factorize"])
            svd, key = ("svd", cfg.method, cfg.damp), ("factors", cfg.method, cfg.damp, cfg.rank)
            if svd not in parts:  # one SVD for every rank of this weight
                parts[svd] = decomposition(weight, name, cfg)
            if key not in parts:
                parts[key] = factor_parts(weight, name, cfg, cfg.rank, parts[svd])[:2]
            u, v = parts[key]
            return _stored(u, name, quantize) @ _stored(v, name, quantize)
        return _stored(weight, name, quantize)


def _stored(tensor: torch.Tensor, name: str, quantize: dict[str, Any] | None) -> torch.Tensor:
    """What the model computes with for one stored tensor (a weight, its kept values, a factor),
    in fp32: itself, or its quantize → dequantize through the quantize pass's own code."""
    if quantize is None:
        return tensor.detach().float()
    scheme = layer_config(QuantizeConfig, name, quantize)
    cols = tensor.shape[1]
    group = _group(cols, scheme.group_size)
    # GPTQ needs the stored tensor's own input Hessian: a factor or the kept values have none,
    # so they get the MSE grid, as the pass resolves it
    scheme = resolve_method(tensor, scheme, group)
    codes = weight_codes(tensor, scheme, group, cached=lambda key, build: build())
    return codes.dequantized(cols)
