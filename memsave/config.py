"""Options for the memsave backend: one frozen dataclass per pass family, one `Config` over them.

Users write options in one of three ways, all validated here with errors that name the key and
the valid choices:

    torch.compile(model, backend="memsave")                                   # default recipe
    torch.compile(model, backend="memsave", options={"recompute": "none"})    # short strings
    torch.compile(model, backend="memsave", options={"recompute": {"policy": "min-cut"}})
    torch.compile(model, backend=memsave.Config(recompute="none"))          # a Config is a backend

Each pass family (quantize, prune, ...) takes a short string, a dict of its config's fields, an
instance of its config class, or None/"none"/False to switch it off. Families that no pass
implements yet accept only "none": asking for more raises instead of silently doing nothing.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar

try:  # Dynamo wraps backend exceptions in BackendCompilerFailed, except these.
    from torch._dynamo.exc import ShortenTraceback as _Unwrapped
except ImportError:  # pragma: no cover - older torch: the error arrives wrapped
    _Unwrapped = Exception


class OptionError(ValueError, _Unwrapped):
    """A bad memsave option: a ValueError naming the key and the valid choices.

    Also a Dynamo ShortenTraceback, which Dynamo re-raises as it is instead of wrapping it
    in BackendCompilerFailed, so `torch.compile(..., options=bad)(x)` raises this ValueError.
    """

    def __init__(self, message: str):
        if _Unwrapped is Exception:
            ValueError.__init__(self, message)
        else:
            _Unwrapped.__init__(self, message, first_useful_frame=None)


PASS_FAMILIES = (
    "quantize",
    "prune",
    "factorize",
    "recompute",
    "pipeline",
    "tensor_parallel",
    "chunk",
    "precision",
    "plan_memory",
)
CODEGEN_CHOICES = ("inductor", "fx")
OFF_VALUES = (None, False, "none", "off")


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


class FamilyConfig:
    """Base of the per-family configs: parsing from a short string or a dict, with clear errors."""

    family: ClassVar[str]
    # short string -> dict of field values; subclasses fill this in.
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {}
    # Names with parameters (e.g. "int4-g128-asym"): a parser from name to field values (None
    # when the name does not fit), the pattern and an example for the error message.
    name_parser: ClassVar[Callable[[str], dict[str, Any] | None] | None] = None
    name_pattern: ClassVar[str] = ""
    name_example: ClassVar[str] = ""

    @classmethod
    def parse(cls, value: Any) -> FamilyConfig | None:
        if isinstance(value, str):
            value = value.strip().lower()
        if value in OFF_VALUES:
            return None
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            if value in cls.shorthands:
                return cls(**cls.shorthands[value])
            fields_ = cls.name_parser(value) if cls.name_parser is not None else None
            if fields_ is None:
                names = f", names of the form {cls.name_pattern} (e.g. {cls.name_example!r})," if cls.name_pattern else ""
                raise OptionError(
                    f"options[{cls.family!r}]: unknown value {value!r}; valid choices: "
                    f"{_choices(('none', *cls.shorthands))}{names} or a dict with keys "
                    f"{_choices(f.name for f in fields(cls))}"
                )
            return cls(**fields_)
        if isinstance(value, dict):
            valid = {f.name for f in fields(cls)}
            for key in value:
                if key not in valid:
                    raise OptionError(
                        f"options[{cls.family!r}]: unknown key {key!r}; valid keys: "
                        f"{_choices(sorted(valid))}"
                    )
            return cls(**value)
        raise OptionError(
            f"options[{cls.family!r}]: expected a string, a dict or {cls.__name__}, "
            f"got {type(value).__name__}"
        )

    def _check_choice(self, name: str, value: Any, valid: tuple) -> None:
        if value not in valid:
            raise OptionError(
                f"options[{self.family!r}][{name!r}]: invalid value {value!r}; "
                f"valid choices: {_choices(valid)}"
            )


RECOMPUTE_POLICIES = ("none", "min-cut", "budget", "sqrt", "selective")


def _parse_recompute_name(name: str) -> dict[str, Any] | None:
    """`budget` (half the saved bytes), `budget-25` (25%), `budget-min` → RecomputeConfig fields."""
    m = re.fullmatch(r"budget(?:-(\d{1,3}|min))?", name)
    if m is None:
        return None
    budget = m.group(1)
    if budget is None:
        return {"policy": "budget"}
    return {"policy": "budget", "budget": "min" if budget == "min" else int(budget) / 100}


@dataclass(frozen=True)
class RecomputeConfig(FamilyConfig):
    """Which activations a training graph saves for backward and which it recomputes.

    policy:
      "none"      save every activation the backward needs (no recomputation);
      "min-cut"   AOTAutograd-style max-flow/min-cut: recompute cheap ops when that saves bytes;
      "budget"    memsave's solver: save at most `budget` bytes, recomputing what costs least
                  (exact ILP on small graphs, a greedy heuristic on large ones; plans ranked by
                  the simulated peak of forward + backward);
      "sqrt"      segment checkpointing: save only the values crossing ~sqrt(n) evenly spaced
                  block boundaries, recompute inside segments;
      "selective" save matmul and attention outputs, recompute pointwise ops and norms.
    budget (policy "budget" only; default 0.5): a fraction in (0, 1] of the bytes saved with no
    recomputation, an int number of bytes, or "min" (the fewest saved bytes possible). Giving a
    budget implies policy "budget". Outputs of random ops (dropout) are always saved.
    """

    family: ClassVar[str] = "recompute"
    POLICIES: ClassVar[tuple[str, ...]] = RECOMPUTE_POLICIES
    name_pattern: ClassVar[str] = "'budget[-<percent>]', 'budget-min'"
    name_parser: ClassVar = staticmethod(_parse_recompute_name)
    name_example: ClassVar[str] = 'budget-50'
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {
        "min-cut": {"policy": "min-cut"},
        "sqrt": {"policy": "sqrt"},
        "selective": {"policy": "selective"},
    }

    policy: str | None = None  # None: "budget" when a budget is given, else "min-cut"
    budget: float | int | str | None = None

    def __post_init__(self):
        if self.policy is None:
            object.__setattr__(self, "policy", "budget" if self.budget is not None else "min-cut")
        self._check_choice("policy", self.policy, self.POLICIES)
        if self.policy != "budget":
            if self.budget is not None:
                raise OptionError(
                    f"options['recompute']['budget']: a budget applies to policy 'budget' only, "
                    f"not {self.policy!r} (leave 'policy' out to get 'budget')"
                )
            return
        budget = 0.5 if self.budget is None else self.budget
        if isinstance(budget, str) and budget.strip().lower() == "min":
            budget = "min"
        elif isinstance(budget, float) and 0 < budget <= 1:
            pass
        elif isinstance(budget, int) and not isinstance(budget, bool) and budget >= 1024:
            pass
        else:
            raise OptionError(
                f"options['recompute']['budget']: invalid value {budget!r}; valid choices: a fraction in "
                "(0, 1] of the bytes saved without recomputation (a float, e.g. 0.5), a number of bytes "
                "(an int, at least 1024), or 'min'"
            )
        object.__setattr__(self, "budget", budget)

    def describe(self) -> str:
        if self.policy != "budget":
            return self.policy
        if isinstance(self.budget, float):
            return f"budget {self.budget:.0%}"
        return f"budget {self.budget}" + (" bytes" if isinstance(self.budget, int) else "")


class LayerSelection:
    """include/exclude glob patterns over weight names and per-pattern overrides, shared by
    the families that act per weight (quantize, prune, factorize). A subclass lists the
    fields an override may change in `override_keys`."""

    override_keys: ClassVar[tuple[str, ...]] = ()

    def _normalize_selection(self) -> None:
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = (value,)
            if not all(isinstance(p, str) for p in value):
                raise OptionError(f"options[{self.family!r}][{name!r}]: expected glob patterns (strings), got {value!r}")
            object.__setattr__(self, name, tuple(value))
        items = self.overrides.items() if isinstance(self.overrides, dict) else self.overrides
        normalized = []
        for pattern, changes in items:
            changes = dict(changes)
            for key in changes:
                if key not in self.override_keys:
                    raise OptionError(
                        f"options[{self.family!r}]['overrides'][{pattern!r}]: unknown key {key!r}; "
                        f"valid keys: {_choices(self.override_keys)}"
                    )
            dataclasses.replace(self, overrides=(), **changes)  # validates the values
            normalized.append((pattern, tuple(sorted(changes.items()))))
        object.__setattr__(self, "overrides", tuple(normalized))

    def for_weight(self, name: str):
        """The config for one weight, or None when the filters leave it alone."""
        if not any(fnmatch.fnmatchcase(name, p) for p in self.include):
            return None
        if any(fnmatch.fnmatchcase(name, p) for p in self.exclude):
            return None
        config = self
        for pattern, changes in self.overrides:
            if fnmatch.fnmatchcase(name, pattern):
                config = dataclasses.replace(config, **dict(changes))
        return config


QUANT_BITS = (2, 3, 4, 8)
QUANT_GROUPS = (None, 32, 64, 128, 256)
QUANT_METHODS = ("rtn", "mse", "awq", "gptq")
QUANT_SCHEMES = ("affine", "log", "vq")


def _parse_quant_name(name: str) -> dict[str, Any] | None:
    """`int4`, `int4-g64`, `int3-g32-asym-mse`, `log4-g128`, `vq2`, ... → QuantizeConfig fields."""
    vq = re.fullmatch(r"vq([2348])", name)
    if vq is not None:
        return {"scheme": "vq", "bits": int(vq.group(1))}
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

    scheme: "affine" (linear levels), "log" (logarithmic levels, sign kept) or "vq" (k-means
    codebook of 2^(bits·d) vectors of d consecutive weights, d the largest with bits·d ≤ 8).
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
    name_pattern: ClassVar[str] = "'int<bits>[-g<group>][-sym/-asym][-rtn/-mse/-awq/-gptq]', 'log<bits>[-g<group>][-mse]', 'vq<bits>'"
    name_parser: ClassVar = staticmethod(_parse_quant_name)
    name_example: ClassVar[str] = 'int4-g128-asym'
    # int4 alone is memsave's int4 recipe; see README for why this one.
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
        group = "per-channel" if self.group_size is None else f"g{self.group_size}"
        if self.scheme == "log":
            return f"log{self.bits} {group} {self.method}"
        acts = ", int8 activations" if self.activations == "int8" else ""
        return f"int{self.bits} {group} {'sym' if self.symmetric else 'asym'} {self.method}{acts}"


PRUNE_STRUCTURES = ("unstructured", "structured", "2:4", "4:8")
PRUNE_METHODS = ("magnitude", "wanda")
PRUNE_GRANULARITIES = ("channels+heads", "channels", "heads")


def _parse_prune_name(name: str) -> dict[str, Any] | None:
    """`2:4`, `wanda-2:4`, `magnitude-unstructured-50`, `structured-25`, `structured-heads-25`,
    ... → PruneConfig fields."""
    m = re.fullmatch(
        r"(?:(magnitude|wanda)-)?(unstructured|structured|2:4|4:8)(?:-(channels|heads))?(?:-(\d{1,2}))?", name
    )
    if m is None:
        return None
    method, structure, granularity, percent = m.groups()
    if granularity is not None and structure != "structured":
        return None
    fields_: dict[str, Any] = {"structure": structure}
    if method is not None:
        fields_["method"] = method
    if granularity is not None:
        fields_["granularity"] = granularity
    if percent is not None:
        fields_["sparsity"] = int(percent) / 100
    return fields_


@dataclass(frozen=True)
class PruneConfig(LayerSelection, FamilyConfig):
    """Weight pruning of linear layers, stored so that it saves memory.

    structure: "unstructured" (any weights; stored as bitmask + values where that is smaller
    than dense, otherwise left dense and reported), "2:4"/"4:8" (n of every m consecutive
    input weights kept; packed values + position indices; sparsity is implied), or
    "structured" (whole MLP neurons / output channels and whole attention heads removed, the
    next layer's inputs shrunk to match: a smaller dense model). granularity (structured only):
    "channels+heads", "channels" or "heads"; under grouped-query attention heads go in whole
    kv groups. method: "magnitude" (|W|) or "wanda" (|W| times the input channel's RMS on
    calibration data; needs memsave.calibrate). sparsity: the fraction of weights (structured:
    of each group's channels, heads or kv groups) removed, in [0, 1). include/exclude: glob
    patterns over weight names (layers in exclude stay dense); overrides: {pattern: {field:
    value}}. free_weights: release the dense originals once the graph reads only the pruned form.
    """

    family: ClassVar[str] = "prune"
    name_pattern: ClassVar[str] = "'[magnitude-/wanda-]<unstructured/structured[-channels/-heads]/2:4/4:8>[-<percent>]'"
    name_parser: ClassVar = staticmethod(_parse_prune_name)
    name_example: ClassVar[str] = 'wanda-2:4'
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {}
    override_keys: ClassVar[tuple[str, ...]] = ("structure", "method", "sparsity", "granularity")

    structure: str = "unstructured"
    method: str = "magnitude"
    sparsity: float = 0.5
    granularity: str = "channels+heads"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    overrides: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    free_weights: bool = True

    def __post_init__(self):
        self._check_choice("structure", self.structure, PRUNE_STRUCTURES)
        self._check_choice("method", self.method, PRUNE_METHODS)
        self._check_choice("granularity", self.granularity, PRUNE_GRANULARITIES)
        if self.granularity != "channels+heads" and self.structure != "structured":
            raise OptionError(
                f"options['prune']['granularity']: {self.granularity!r} applies to structure 'structured' "
                f"only, not {self.structure!r}"
            )
        self._check_choice("free_weights", self.free_weights, (True, False))
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 <= self.sparsity < 1:
            raise OptionError(
                f"options['prune']['sparsity']: {self.sparsity!r} is not a fraction in [0, 1) "
                "(the share of weights removed; 1 would remove all)"
            )
        object.__setattr__(self, "sparsity", float(self.sparsity))
        self._normalize_selection()

    @property
    def n_m(self) -> tuple[int, int] | None:
        if ":" not in self.structure:
            return None
        n, m = self.structure.split(":")
        return int(n), int(m)

    @property
    def effective_sparsity(self) -> float:
        nm = self.n_m
        return 1 - nm[0] / nm[1] if nm else self.sparsity

    def describe(self) -> str:
        what = self.structure if self.granularity == "channels+heads" else f"{self.structure} {self.granularity}"
        return f"{self.method} {what} {self.effective_sparsity:.0%}"


FACTORIZE_METHODS = ("svd", "svd-llm")


def _parse_factorize_name(name: str) -> dict[str, Any] | None:
    """`svd`, `svd-llm`, `svd-llm-20` (20% of the parameters removed) → FactorizeConfig fields."""
    m = re.fullmatch(r"(svd|svd-llm)(?:-(\d{1,2}))?", name)
    if m is None:
        return None
    fields_: dict[str, Any] = {"method": m.group(1)}
    if m.group(2) is not None:
        fields_["reduction"] = int(m.group(2)) / 100
    return fields_


@dataclass(frozen=True)
class FactorizeConfig(LayerSelection, FamilyConfig):
    """Low-rank factorization of linear weights, W (out×in) ≈ U·V: two smaller linears.

    method: "svd" (truncated SVD of W) or "svd-llm" (SVD of W whitened by the Cholesky factor
    of the inputs' second moment, as in SVD-LLM: minimizes the output error; needs
    memsave.calibrate). reduction: the fraction of the selected layers' parameters removed, in
    (0, 1). energy: instead of reduction, keep the smallest rank holding this share of the
    (whitened) spectrum's energy, per layer. rank: instead of both, this rank for every
    selected layer (per layer through overrides). allocation: "uniform" (every layer at the same
    reduction) or "sensitivity" (ranks allocated across layers to lose the least spectral
    energy for the same total). A layer is factorized only where r·(out+in) < out·in.
    include/exclude/overrides: as for quantize. free_weights: release the dense originals.
    """

    family: ClassVar[str] = "factorize"
    name_pattern: ClassVar[str] = "'svd[-<percent>]', 'svd-llm[-<percent>]'"
    name_parser: ClassVar = staticmethod(_parse_factorize_name)
    name_example: ClassVar[str] = 'svd-llm-20'
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {}
    override_keys: ClassVar[tuple[str, ...]] = ("reduction", "energy", "rank")

    method: str = "svd-llm"
    reduction: float | None = 0.25
    energy: float | None = None
    rank: int | None = None
    allocation: str = "uniform"
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    overrides: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = ()
    free_weights: bool = True
    damp: float = 0.01

    def __post_init__(self):
        self._check_choice("method", self.method, FACTORIZE_METHODS)
        self._check_choice("allocation", self.allocation, ("uniform", "sensitivity"))
        self._check_choice("free_weights", self.free_weights, (True, False))
        if self.rank is not None:
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise OptionError(f"options['factorize']['rank']: {self.rank!r} is not a positive integer")
            object.__setattr__(self, "reduction", None)
            object.__setattr__(self, "energy", None)
            if self.allocation != "uniform":
                raise OptionError("options['factorize']: allocation='sensitivity' distributes a 'reduction'; it does not combine with 'rank'")
        elif self.energy is not None:
            if not isinstance(self.energy, (int, float)) or isinstance(self.energy, bool) or not 0 < self.energy <= 1:
                raise OptionError(f"options['factorize']['energy']: {self.energy!r} is not a fraction in (0, 1]")
            object.__setattr__(self, "reduction", None)
            if self.allocation != "uniform":
                raise OptionError("options['factorize']: allocation='sensitivity' distributes a 'reduction'; it does not combine with 'energy'")
        elif self.reduction is None:
            raise OptionError("options['factorize']: give 'reduction' (share of parameters removed) or 'energy'")
        elif isinstance(self.reduction, bool) or not isinstance(self.reduction, (int, float)) or not 0 < self.reduction < 1:
            raise OptionError(
                f"options['factorize']['reduction']: {self.reduction!r} is not a fraction in (0, 1) "
                "(the share of the layers' parameters removed)"
            )
        if not isinstance(self.damp, (int, float)) or not self.damp >= 0:
            raise OptionError(f"options['factorize']['damp']: {self.damp!r} must be a number >= 0")
        self._normalize_selection()

    def describe(self) -> str:
        if self.rank is not None:
            return f"{self.method} rank {self.rank}"
        target = f"energy {self.energy:g}" if self.energy is not None else f"-{self.reduction:.0%} params"
        return f"{self.method} {target}"


PRECISION_COMPUTE = ("bf16", "fp16", "fp32")
PRECISION_SAVED = (None, "bf16", "fp8")


@dataclass(frozen=True)
class PrecisionConfig(FamilyConfig):
    """Mixed precision: matmuls in bf16/fp16, norms, softmax, loss and reductions in fp32.

    compute: "bf16" or "fp16" (matmul-like ops run in it, pointwise ops follow their inputs,
    numerically sensitive ops run in fp32; outputs keep their dtype), or "fp32" (no compute
    casting; use with saved). Trainable weights stay fp32 (master weights) and are cast per
    call, so their gradients are fp32; graph constants are cast once at compile time.
    saved (training): store the activations saved for backward as "bf16" or "fp8" (e4m3 with
    a per-tensor scale) between forward and backward; None keeps their dtype.
    weights (inference): "narrow" stores each weight that only matmul-like ops read as one
    compute-dtype copy made at compile time and releases its fp32 original (the model then runs
    only compiled); "fp32" keeps the fp32 weights and casts them per call.
    fp16 training needs loss scaling: use memsave.passes.mixed_precision.loss_scaler().
    """

    family: ClassVar[str] = "precision"
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {
        "bf16": {"compute": "bf16"},
        "fp16": {"compute": "fp16"},
        "saved-bf16": {"compute": "fp32", "saved": "bf16"},
        "saved-fp8": {"compute": "fp32", "saved": "fp8"},
    }

    compute: str = "bf16"
    saved: str | None = None
    weights: str = "narrow"

    def __post_init__(self):
        self._check_choice("compute", self.compute, PRECISION_COMPUTE)
        self._check_choice("saved", self.saved, PRECISION_SAVED)
        self._check_choice("weights", self.weights, ("narrow", "fp32"))

    def describe(self) -> str:
        return f"compute {self.compute}" + (f", saved {self.saved}" if self.saved else "")


@dataclass(frozen=True)
class PlanMemoryConfig(FamilyConfig):
    """Memory planning of the final graph: liveness, in-place reuse, planned/measured/lower-bound peak.

    inplace: let an elementwise op write into an input that dies at it (same shape, strides and
    dtype), through the op's out= form; only with codegen "fx" (Inductor plans its own buffers,
    and the pass then only reports). layout: drop copies that change nothing (clone/contiguous
    of a tensor already in that layout, same-dtype casts) and fold chains of permutes.
    measure: run the planned graph once at compile time on the example input (when it is
    known) under memsave.MemoryTracker, to report the measured peak (always in debug mode).
    """

    family: ClassVar[str] = "plan_memory"
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {
        "on": {},
        "report": {"inplace": False, "layout": False},
    }

    inplace: bool = True
    layout: bool = True
    measure: bool = False

    def __post_init__(self):
        for name in ("inplace", "layout", "measure"):
            self._check_choice(name, getattr(self, name), (True, False))

    def describe(self) -> str:
        parts = [p for p, on in (("in-place", self.inplace), ("layout", self.layout)) if on]
        return "plan " + (", ".join(parts) if parts else "report only")


@dataclass(frozen=True)
class TensorParallelConfig(FamilyConfig):
    """Tensor parallelism: linears and attention heads split across ranks (Megatron pairing).

    Column-parallel linears (QKV, MLP gate/up) keep their block of output features, the
    row-parallel linears after them (attention output, MLP down) their block of input
    features, with an all-reduce after each pair; attention heads are divided among ranks.
    Found from the graph: linears whose outputs cannot be split (the LM head, anything an
    unknown op reads) stay replicated. Run under `torchrun --nproc-per-node N`.
    group: the torch.distributed process group to split across (None: the default group; give
    the tensor-parallel group when combining with other parallelism). include/exclude: glob
    patterns over the weight names of linears that may be split. free_weights: release each
    split weight's full tensor, so a rank holds only its shards (memsave.sharded_parameters(model)
    gives an optimizer the shards). vocab_parallel: also split embeddings by vocabulary rows
    (masked lookup + all-reduce) and the linears otherwise kept whole (the LM head) by output
    rows, all-gathering their outputs.
    """

    family: ClassVar[str] = "tensor_parallel"
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {"auto": {}}

    group: Any = None
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    free_weights: bool = True
    vocab_parallel: bool = False

    def __post_init__(self):
        self._check_choice("free_weights", self.free_weights, (True, False))
        self._check_choice("vocab_parallel", self.vocab_parallel, (True, False))
        if self.group is not None and not hasattr(self.group, "group_name"):
            raise OptionError(
                f"options['tensor_parallel']['group']: expected a torch.distributed ProcessGroup or None "
                f"(the default group), got {type(self.group).__name__}"
            )
        for name in ("include", "exclude"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, str) else tuple(value)
            if not all(isinstance(p, str) for p in value):
                raise OptionError(f"options['tensor_parallel'][{name!r}]: expected glob patterns (strings), got {value!r}")
            object.__setattr__(self, name, value)

    def describe(self) -> str:
        return "tensor parallel" + (", vocab-parallel" if self.vocab_parallel else "") + (" (own group)" if self.group is not None else "")


CHUNK_TARGETS = ("loss", "attention", "mlp")
CHUNK_DEFAULT_BUDGET = 32 * 2**20  # bytes of one loss chunk's logits when no budget is given


def _parse_chunk_name(name: str) -> dict[str, Any] | None:
    """`tokens-<n>` (chunks of n tokens), `budget-<MiB>` (chunk workspace budget) → ChunkConfig fields."""
    m = re.fullmatch(r"(tokens|budget)-(\d+)", name)
    if m is None:
        return None
    value = int(m.group(2))
    return {"chunk_size": value} if m.group(1) == "tokens" else {"budget": value * 2**20}


@dataclass(frozen=True)
class ChunkConfig(FamilyConfig):
    """Sequence chunking: the LM-head loss over token chunks, eager attention routed to SDPA, MLPs by tokens.

    targets: which patterns to rewrite. "loss": linear → cross_entropy becomes one op that
    computes the loss (and its gradient) over chunks of tokens, never holding the full
    (tokens × vocab) logits; "attention": matmul → softmax → matmul attention becomes
    scaled_dot_product_attention where that is exactly the same computation; "mlp": inference
    MLP blocks are computed over chunks of tokens, only when a budget or chunk size is given.
    chunk_size: tokens per chunk (an int >= 1), or None to derive it from the budget.
    budget: bytes one chunk's temporaries may take (an int >= 1024), or None: 32 MiB of
    logits per loss chunk, and no MLP chunking.
    """

    family: ClassVar[str] = "chunk"
    name_pattern: ClassVar[str] = "'tokens-<n>', 'budget-<MiB>'"
    name_parser: ClassVar = staticmethod(_parse_chunk_name)
    name_example: ClassVar[str] = "budget-64"
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {
        "auto": {},
        "loss": {"targets": ("loss",)},
        "attention": {"targets": ("attention",)},
    }

    targets: tuple[str, ...] = CHUNK_TARGETS
    chunk_size: int | None = None
    budget: int | None = None

    def __post_init__(self):
        targets = (self.targets,) if isinstance(self.targets, str) else tuple(self.targets)
        if not targets:
            raise OptionError(f"options['chunk']['targets']: empty; valid choices: {_choices(CHUNK_TARGETS)} (or 'none' to switch chunking off)")
        for target in targets:
            self._check_choice("targets", target, CHUNK_TARGETS)
        object.__setattr__(self, "targets", tuple(t for t in CHUNK_TARGETS if t in targets))
        if self.chunk_size is not None and (isinstance(self.chunk_size, bool) or not isinstance(self.chunk_size, int) or self.chunk_size < 1):
            raise OptionError(f"options['chunk']['chunk_size']: {self.chunk_size!r} is not a positive int (tokens per chunk) or None (from the budget)")
        if self.budget is not None and (isinstance(self.budget, bool) or not isinstance(self.budget, int) or self.budget < 1024):
            raise OptionError(f"options['chunk']['budget']: {self.budget!r} is not a number of bytes (an int >= 1024) or None (32 MiB per loss chunk)")
        if self.chunk_size is not None and self.budget is not None:
            raise OptionError("options['chunk']: give 'chunk_size' or 'budget', not both (the size comes from the budget)")

    @property
    def explicit(self) -> bool:
        """Whether the user asked for a size (what MLP chunking waits for)."""
        return self.chunk_size is not None or self.budget is not None

    def rows_for(self, row_bytes: int) -> int:
        """Tokens per chunk when one token's temporaries take `row_bytes`."""
        if self.chunk_size is not None:
            return self.chunk_size
        budget = CHUNK_DEFAULT_BUDGET if self.budget is None else self.budget
        return max(1, budget // max(row_bytes, 1))

    def describe(self) -> str:
        size = f"{self.chunk_size} tokens" if self.chunk_size else f"budget {(self.budget or CHUNK_DEFAULT_BUDGET) / 2**20:g} MiB"
        return f"{'+'.join(self.targets)}, {size}"


PIPELINE_SCHEDULES = ("gpipe", "1f1b")


def _parse_pipeline_name(name: str) -> dict[str, Any] | None:
    """`gpipe`, `1f1b`, `1f1b-2x8` (2 stages, 8 micro-batches) → PipelineConfig fields."""
    m = re.fullmatch(r"(gpipe|1f1b)(?:-(\d+)x(\d+))?", name)
    if m is None:
        return None
    fields_: dict[str, Any] = {"schedule": m.group(1)}
    if m.group(2) is not None:
        fields_.update(stages=int(m.group(2)), microbatches=int(m.group(3)))
    return fields_


@dataclass(frozen=True)
class PipelineConfig(FamilyConfig):
    """Pipeline parallelism: the graph is cut into stages, one per rank of the pipeline group.

    stages: number of stages (default: the size of the pipeline process group at compile time;
    it must equal that size). split_points: module names where stages 2..S begin (e.g.
    ["layers.2"]); leave out to cut automatically at repeated blocks, balancing each stage's
    estimated memory (weights + activations in flight under the schedule + bytes crossing its
    cuts). microbatches: micro-batches per step (default: stages; the batch must divide by it;
    1f1b needs at least as many as stages). schedule: "gpipe" or "1f1b".
    broadcast_outputs: every rank returns the last stage's output (False: non-last ranks return
    zeros of the right shape). compile_stages: run memsave's passes on each stage's graph.
    group: the torch.distributed process group whose ranks hold the stages, in rank order (None:
    the pipeline group of memsave.distributed.init_mesh, else the default group).
    weights: where this rank reads its stage's weights when the model was built without them
    (memsave.distributed.defer_weights): a file from memsave.distributed.save_weights (or any
    torch.save'd / .safetensors name -> tensor file), a name -> tensor mapping, or a callable
    name -> tensor. Only this rank's stage is read.
    """

    family: ClassVar[str] = "pipeline"
    name_pattern: ClassVar[str] = "'<gpipe/1f1b>[-<stages>x<microbatches>]'"
    name_parser: ClassVar = staticmethod(_parse_pipeline_name)
    name_example: ClassVar[str] = "1f1b-2x4"
    shorthands: ClassVar[dict[str, dict[str, Any]]] = {}

    stages: int | None = None
    microbatches: int | None = None
    schedule: str = "1f1b"
    split_points: tuple[str, ...] | None = None
    broadcast_outputs: bool = True
    compile_stages: bool = True
    group: Any = None
    weights: Any = None

    def __post_init__(self):
        self._check_choice("schedule", self.schedule, PIPELINE_SCHEDULES)
        if not (self.weights is None or isinstance(self.weights, (str, os.PathLike, Mapping)) or callable(self.weights)):
            raise OptionError(
                "options['pipeline']['weights']: expected a file path, a name -> tensor mapping or a callable "
                f"name -> tensor, got {type(self.weights).__name__}"
            )
        if self.group is not None and not hasattr(self.group, "group_name"):
            raise OptionError(
                f"options['pipeline']['group']: expected a torch.distributed ProcessGroup or None "
                f"(the mesh's pipeline group, else the default group), got {type(self.group).__name__}"
            )
        for name in ("broadcast_outputs", "compile_stages"):
            self._check_choice(name, getattr(self, name), (True, False))
        for name in ("stages", "microbatches"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise OptionError(f"options['pipeline'][{name!r}]: {value!r} is not a positive integer")
        if self.split_points is not None:
            points = (self.split_points,) if isinstance(self.split_points, str) else tuple(self.split_points)
            if not points or not all(isinstance(p, str) and p for p in points) or len(set(points)) != len(points):
                raise OptionError(
                    f"options['pipeline']['split_points']: {self.split_points!r} must be distinct module names "
                    "where stages 2..S begin, e.g. ['layers.2']"
                )
            object.__setattr__(self, "split_points", points)
            if self.stages is not None and len(points) != self.stages - 1:
                raise OptionError(
                    f"options['pipeline']: {len(points)} split_points make {len(points) + 1} stages, "
                    f"but stages={self.stages}"
                )
        if self.stages is not None:
            self.check_microbatches(self.stages)

    def check_microbatches(self, stages: int) -> int:
        """The micro-batch count for `stages` stages, or an OptionError saying why not."""
        microbatches = self.microbatches or stages
        if self.schedule == "1f1b" and microbatches < stages:
            raise OptionError(
                f"options['pipeline']: schedule '1f1b' needs microbatches >= stages, got "
                f"{microbatches} < {stages}; use more micro-batches or schedule 'gpipe'"
            )
        return microbatches

    def describe(self) -> str:
        stages = self.stages or "world"
        return f"{self.schedule} {stages} stages x {self.microbatches or 'stages'} micro-batches"


@dataclass(frozen=True)
class NotImplementedFamily(FamilyConfig):
    """Placeholder for a pass family no pass implements yet: only "none" is accepted."""

    @classmethod
    def parse(cls, value: Any) -> None:
        if isinstance(value, str):
            value = value.strip().lower()
        if value in OFF_VALUES:
            return None
        raise OptionError(
            f"options[{cls.family!r}]: {value!r} is not available: memsave has no "
            f"{cls.family!r} pass yet; valid choices: 'none'"
        )


def _unimplemented(name: str) -> type[NotImplementedFamily]:
    return type(f"{name.title().replace('_', '')}Config", (NotImplementedFamily,), {"family": name})


# One config class per family. A family is filled in by giving it a real FamilyConfig subclass.
FAMILY_CONFIGS: dict[str, type[FamilyConfig]] = {
    "quantize": QuantizeConfig,
    "prune": PruneConfig,
    "factorize": FactorizeConfig,
    "recompute": RecomputeConfig,
    "pipeline": PipelineConfig,
    "tensor_parallel": TensorParallelConfig,
    "chunk": ChunkConfig,
    "precision": PrecisionConfig,
    "plan_memory": PlanMemoryConfig,
}
assert tuple(FAMILY_CONFIGS) == PASS_FAMILIES

# The default recipe: what `backend="memsave"` does with no options. Documented in the README;
# change both together.
DEFAULT_RECIPE: dict[str, Any] = {
    "recompute": "min-cut",
    "codegen": "inductor",
}


@dataclass(frozen=True)
class Config:
    """The whole recipe for one `torch.compile(..., backend="memsave")`.

    Frozen and hashable, so a Config can key caches. A Config is itself a torch.compile
    backend: `torch.compile(model, backend=memsave.Config(...))`.
    """

    quantize: FamilyConfig | None = None
    prune: FamilyConfig | None = None
    factorize: FamilyConfig | None = None
    recompute: FamilyConfig | None = RecomputeConfig()
    pipeline: FamilyConfig | None = None
    tensor_parallel: FamilyConfig | None = None
    chunk: FamilyConfig | None = None
    precision: FamilyConfig | None = None
    plan_memory: FamilyConfig | None = None
    # "inductor" hands the transformed graph to Inductor; "fx" runs it as plain FX code.
    codegen: str = "inductor"
    # Write the graph after every pass and the per-pass table here (implies debug).
    debug_dir: str | None = None
    # Check graph invariants after every pass and measure each pass's error on the example
    # input. Costs one extra run of the graph per pass; on in tests and in `memsave explain`.
    debug: bool = False

    def __post_init__(self):
        for name in PASS_FAMILIES:
            object.__setattr__(self, name, FAMILY_CONFIGS[name].parse(getattr(self, name)))
        if self.codegen not in CODEGEN_CHOICES:
            raise OptionError(
                f"options['codegen']: invalid value {self.codegen!r}; valid choices: "
                f"{_choices(CODEGEN_CHOICES)}"
            )
        if self.debug_dir is not None:
            if not isinstance(self.debug_dir, (str, os.PathLike)):
                raise OptionError(
                    f"options['debug_dir']: expected a path string, got {type(self.debug_dir).__name__}"
                )
            object.__setattr__(self, "debug_dir", os.fspath(self.debug_dir))
            object.__setattr__(self, "debug", True)
        if not isinstance(self.debug, bool):
            raise OptionError(f"options['debug']: expected True or False, got {self.debug!r}")

    @classmethod
    def from_options(cls, options: dict[str, Any] | Config | None = None) -> Config:
        """Build a Config from `torch.compile(options=...)`, on top of the default recipe.

        MEMSAVE_DEBUG_DIR in the environment sets debug_dir when the options do not, and
        MEMSAVE_DEBUG=1 turns debug mode on.
        """
        if isinstance(options, Config):
            return options
        if options is None:
            options = {}
        if not isinstance(options, dict):
            raise OptionError(f"memsave options must be a dict or memsave.Config, got {type(options).__name__}")
        valid = {f.name for f in fields(cls)}
        for key in options:
            if key not in valid:
                raise OptionError(
                    f"unknown memsave option {key!r}; valid keys: {_choices(sorted(valid))}"
                )
        merged = {**DEFAULT_RECIPE, **options}
        if "debug_dir" not in merged and os.environ.get("MEMSAVE_DEBUG_DIR"):
            merged["debug_dir"] = os.environ["MEMSAVE_DEBUG_DIR"]
        if "debug" not in merged and os.environ.get("MEMSAVE_DEBUG") == "1":
            merged["debug"] = True  # the test suite sets this: invariants after every pass, everywhere
        return cls(**merged)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def as_options(self) -> dict[str, Any]:
        """The dict form, usable as `torch.compile(..., options=config.as_options())`."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def enabled_families(self) -> list[str]:
        return [name for name in PASS_FAMILIES if getattr(self, name) is not None]

    def __call__(self, gm, example_inputs, **kwargs):
        # A Config is a torch.compile backend in its own right.
        from memsave.backend import compile_graph

        return compile_graph(gm, example_inputs, self)


def describe_options() -> list[tuple[str, str, str]]:
    """(key, accepted values, what it does) for every option: the README table comes from this."""
    rows = []
    for name in PASS_FAMILIES:
        cls = FAMILY_CONFIGS[name]
        if issubclass(cls, NotImplementedFamily):
            rows.append((name, "'none'", "not implemented yet"))
        else:
            shorts = _choices(("none", *cls.shorthands))
            if getattr(cls, "name_pattern", None):
                shorts += ", " + cls.name_pattern
            keys = ", ".join(f.name for f in fields(cls))
            rows.append((name, f"{shorts} or dict({keys})", (cls.__doc__ or "").strip().splitlines()[0]))
    rows.append(("codegen", _choices(CODEGEN_CHOICES), "how the transformed graph runs"))
    rows.append(("debug_dir", "path", "write the graph after every pass and the per-pass table"))
    rows.append(("debug", "True/False", "check invariants and measure error after every pass"))
    return rows


def options_table_markdown() -> str:
    """The README's options table (a test keeps the README in step with this)."""
    rows = ["| key | accepted values | what it does |", "|---|---|---|"]
    rows += [f"| `{key}` | {values} | {what} |" for key, values, what in describe_options()]
    return "\n".join(rows)
