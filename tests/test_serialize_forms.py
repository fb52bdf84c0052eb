"""memsave.save / memsave.load of every form the passes make, not only affine quantization:
pruned (unstructured, N:M, structured), factorized, other quantization schemes, and those
forms quantized further. Each round trip is bit-exact, holds no full-precision copy of a
compressed weight, and the compile after load rebuilds nothing."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import memsave
from memsave.models import MLP, build_decoder, build_mlp, decoder_inputs
from memsave.models.decoder import Decoder
from memsave.weights import WEIGHTS, is_released

SIZES = (64, 128, 64)
INT4 = "int4-g32-asym-mse"


def mlp_inputs(model) -> tuple[torch.Tensor]:
    return (torch.randn(4, SIZES[0], generator=torch.Generator().manual_seed(0)),)


def meta_mlp(model) -> nn.Module:
    with torch.device("meta"):
        return MLP(SIZES).eval()


def meta_decoder(model) -> nn.Module:
    with torch.device("meta"):
        return Decoder(model.config).eval()


@dataclass
class Case:
    options: dict  # the compressing families' options
    build: Callable[[], nn.Module] = lambda: build_mlp(SIZES)
    fresh: Callable[[nn.Module], nn.Module] = meta_mlp
    inputs: Callable[[nn.Module], tuple] = mlp_inputs
    save_compiled: bool = True  # False: save the bare module (options inferred from the forms)
    debug: bool = False  # the suite's per-pass checks (MEMSAVE_DEBUG) triple compile time
    keys: tuple[str, ...] = field(default=())  # cache keys (first item) each layers.* weight must have


CASES = {
    "2:4": Case({"prune": "2:4"}, keys=("prune",), debug=True),
    "4:8+int4": Case({"prune": "4:8", "quantize": INT4}, keys=("prune",)),
    "unstructured": Case({"prune": "magnitude-unstructured-50"}, keys=("prune",)),
    "unstructured+int8": Case({"prune": "magnitude-unstructured-50", "quantize": "int8"}, keys=("prune",)),
    "factorize": Case({"factorize": {"method": "svd", "rank": 8}}, keys=("factor",)),
    "factorize+int4": Case({"factorize": {"method": "svd", "rank": 8}, "quantize": INT4}, keys=("factor",), debug=True),
    # The rank comes from the spectrum: the compile after load needs it cached too.
    "factorize-energy": Case({"factorize": {"method": "svd", "energy": 0.5}}, keys=("spectrum", "factor")),
    # Linears with biases: the producer's bias is sliced (and released) with its rows.
    "structured+int8": Case({"prune": "structured-50", "quantize": "int8"}, keys=("prune-structured",)),
    # Channels (MLP) and heads (attention) of a decoder, sliced weights then in int4.
    "decoder-structured+int4": Case(
        {"prune": "structured-50", "quantize": INT4}, lambda: build_decoder("tiny"), meta_decoder,
        lambda m: decoder_inputs(m, batch=2, seq=16), keys=("prune-structured",),
    ),
    "structured+factorize": Case(
        {"prune": "structured-50", "factorize": {"method": "svd", "rank": 8}}, keys=("prune-structured",),
    ),
    "log4": Case({"quantize": "log4"}, keys=("params",)),
    "vq4": Case({"quantize": "vq4"}, keys=("params",)),
    "2:4+int4-bare": Case({"prune": "2:4", "quantize": INT4}, save_compiled=False, keys=("prune",)),
    "factorize+int8-bare": Case({"factorize": {"method": "svd", "rank": 8}, "quantize": "int8"}, save_compiled=False),
}


def compile_memsave(model, options: dict, debug: bool):
    return torch.compile(model, backend="memsave", options={"codegen": "fx", "debug": debug, **options})


@dataclass
class RoundTrip:
    saved: Path
    resaved: Path  # written from the loaded, recompiled model
    expected: torch.Tensor  # the original compiled model's output
    output: torch.Tensor  # the loaded model's compiled output
    held_before: int  # bytes the compressed model's parameters and buffers held (WEIGHTS.held_bytes)
    held_after: int  # the same for the loaded model, before its compile
    builds_after_load: int  # weight-cache builds while compiling and running the loaded model
    original: nn.Module
    loaded: nn.Module


def held(model: nn.Module) -> int:
    return WEIGHTS.held_bytes([*model.parameters(), *model.buffers()])


@pytest.fixture(scope="module")
def round_trips(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serialize_forms")
    done: dict[str, RoundTrip] = {}

    def get(name: str) -> RoundTrip:
        if name not in done:
            case = CASES[name]
            torch._dynamo.reset()
            model = case.build()
            inputs = case.inputs(model)
            compiled = compile_memsave(model, case.options, case.debug)
            with torch.no_grad():
                expected = compiled(*inputs)
            held_before = held(model)
            saved = directory / f"{name}.safetensors"
            memsave.save(compiled if case.save_compiled else model, saved)
            fresh = case.fresh(model)
            assert memsave.load(fresh, saved) is fresh
            held_after = held(fresh)
            torch._dynamo.reset()
            builds = WEIGHTS.builds
            recompiled = compile_memsave(fresh, fresh._memsave_options, case.debug)
            with torch.no_grad():
                output = recompiled(*inputs)
            builds = WEIGHTS.builds - builds
            resaved = directory / f"{name}-again.safetensors"
            memsave.save(recompiled, resaved)
            done[name] = RoundTrip(saved, resaved, expected, output, held_before, held_after, builds, model, fresh)
        return done[name]

    return get


def header(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["memsave"])


def first_keys(entry: dict) -> set[str]:
    return {key[0] for key, _ in entry["cache"]}


@pytest.mark.parametrize("name", list(CASES))
def test_round_trip_is_bit_exact_and_rebuilds_nothing(round_trips, name):
    rt = round_trips(name)
    assert torch.equal(rt.output, rt.expected)
    assert rt.builds_after_load == 0  # every form came from the file
    # Every stored tensor survives save → load → save bit for bit, and so does the header.
    first, second = load_file(rt.saved), load_file(rt.resaved)
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype and torch.equal(first[key], second[key]), key
    h1, h2 = header(rt.saved), header(rt.resaved)
    assert h1["weights"] == h2["weights"] and h1["tensors"] == h2["tensors"]
    assert h1["format_version"] == 2


@pytest.mark.parametrize("name", list(CASES))
def test_loaded_weights_hold_only_the_compressed_forms(round_trips, name):
    rt = round_trips(name)
    h, stored = header(rt.saved), load_file(rt.saved)
    compressed = [n for n, m in rt.original.named_modules() if isinstance(m, nn.Linear)]
    assert {f"{n}.weight" for n in compressed} <= set(h["weights"])
    for weight, entry in h["weights"].items():
        loaded = rt.loaded.get_parameter(weight)
        # The original is gone: a parameter of its shape over empty storage, registered released.
        assert is_released(loaded) and loaded.untyped_storage().nbytes() == 0 and not loaded.requires_grad
        assert tuple(loaded.shape) == tuple(rt.original.get_parameter(weight).shape)
        assert weight not in stored and not entry["also_full_precision"]
        if weight.startswith("layers.") and weight.endswith(".weight"):
            assert set(CASES[name].keys) <= first_keys(entry), (weight, first_keys(entry))
    # What the loaded model holds is what the compressed model held, byte for byte: the
    # compressed forms (and the uncompressed biases), and so is the file's tensor data.
    assert rt.held_after == rt.held_before
    assert sum(t.numel() * t.element_size() for t in stored.values()) == rt.held_before
    dense = sum(rt.original.get_parameter(w).numel() * 4 for w in h["weights"])
    assert rt.held_after < dense


def test_quantized_forms_of_derived_weights_are_released(round_trips):
    # 2:4 values and low-rank factors quantized: their fp32 form is neither in the file nor
    # held after loading; only the codes are.
    for name, derived_parts in (("4:8+int4", 1), ("factorize+int4", 2)):
        rt = round_trips(name)
        for weight, entry in header(rt.saved)["weights"].items():
            if not weight.endswith(".weight"):
                continue
            found = [v for _, value in entry["cache"] for v in value.get("tuple", []) if isinstance(v, dict) and "derived" in v]
            assert len(found) == derived_parts
            for part in found:
                sub = part["derived"]
                assert not sub["stored"] and sub["bits"] == 4 and sub["name"] not in load_file(rt.saved)
            loaded = rt.loaded.get_parameter(weight)
            for part in WEIGHTS.derived(loaded):
                assert is_released(part) and part.untyped_storage().nbytes() == 0


def test_structured_pruning_keeps_the_model_shapes(round_trips):
    # Structured pruning makes the compiled graph a smaller dense model; the module keeps its
    # architecture (it is rebuilt from code), and the sliced weights come from the cache.
    rt = round_trips("structured+int8")
    h = header(rt.saved)
    assert "layers.0.bias" in h["weights"]  # sliced with its rows, the original released
    assert is_released(rt.loaded.layers[0].bias)
    assert "layers.1.bias" in h["tensors"]  # the consumer's bias is not sliced
    consumer = rt.loaded.layers[1].weight
    (key,) = [k for k in WEIGHTS.keys(consumer) if k[0] == "prune-channels"]  # the kept channels
    kept = WEIGHTS.get_or_build(consumer, key, lambda: None, reads_weight=False)
    assert kept.shape == (SIZES[1] // 2,) and kept.dtype == torch.int64
    assert torch.equal(kept, WEIGHTS.get_or_build(rt.original.layers[1].weight, key, lambda: None, reads_weight=False))


@pytest.mark.parametrize("name", ["2:4+int4-bare", "factorize+int8-bare"])
def test_options_of_a_bare_module_are_inferred(round_trips, name):
    rt = round_trips(name)
    h = header(rt.saved)
    families = [f for f in ("quantize", "prune", "factorize") if f in CASES[name].options]
    assert sorted(rt.loaded._memsave_options) == sorted(families)
    for family in families:
        assert h[f"{family}_source"] == "inferred"
        assert h[family]["include"] == [f"layers.{i}.weight" for i in range(len(SIZES) - 1)]
    if "prune" in families:
        assert {k: h["prune"][k] for k in ("structure", "method", "sparsity")} == {"structure": "2:4", "method": "magnitude", "sparsity": 0.5}
    if "factorize" in families:
        assert {k: h["factorize"][k] for k in ("method", "rank")} == {"method": "svd", "rank": 8}
    assert torch.equal(rt.output, rt.expected)


def test_affine_only_files_stay_version_1(tmp_path):
    # Quantization alone keeps the version-1 layout, which memsave before version 2 reads; and
    # this memsave reads version-1 files as those wrote them (no "shape", no prune/factorize).
    torch._dynamo.reset()
    model = build_mlp(SIZES)
    compiled = compile_memsave(model, {"quantize": INT4}, False)
    with torch.no_grad():
        expected = compiled(*mlp_inputs(model))
    saved = tmp_path / "int4.safetensors"
    memsave.save(compiled, saved)
    h = header(saved)
    assert h["format_version"] == 1
    old = {k: v for k, v in h.items() if k not in ("prune", "prune_source", "factorize", "factorize_source")}
    for entry in old["weights"].values():
        del entry["shape"]
    written_by_v1 = tmp_path / "v1.safetensors"
    save_file(load_file(saved), str(written_by_v1), metadata={"format": "pt", "memsave": json.dumps(old)})
    fresh = meta_mlp(model)
    memsave.load(fresh, written_by_v1)
    assert fresh._memsave_options == {"quantize": h["quantize"]}
    torch._dynamo.reset()
    builds = WEIGHTS.builds
    with torch.no_grad():
        output = compile_memsave(fresh, fresh._memsave_options, False)(*mlp_inputs(model))
    assert torch.equal(output, expected) and WEIGHTS.builds == builds


def test_newer_format_is_refused(round_trips, tmp_path):
    rt = round_trips("2:4")
    h = header(rt.saved)
    h["format_version"] = 3
    newer = tmp_path / "newer.safetensors"
    save_file(load_file(rt.saved), str(newer), metadata={"format": "pt", "memsave": json.dumps(h)})
    with pytest.raises(ValueError, match=r"has format version 3, newer than this memsave reads \(2\)"):
        memsave.load(meta_mlp(None), newer)


def test_missing_part_of_a_derived_weight_is_named(round_trips, tmp_path):
    rt = round_trips("4:8+int4")
    tensors = load_file(rt.saved)
    gone = next(n for n in tensors if n.startswith("layers.0.weight.memsave_cache0_0.") and n.endswith("memsave_packed"))
    del tensors[gone]
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata={"format": "pt", "memsave": json.dumps(header(rt.saved))})
    with pytest.raises(ValueError, match=rf"lacks '{gone}' for compressed weight 'layers.0.weight'"):
        memsave.load(meta_mlp(None), broken)
