"""Weight-only quantization on the real all-MiniLM-L6-v2: bits per weight against fidelity, memsave vs torchao.

Each config runs in its own fresh process. It loads the pretrained all-MiniLM-L6-v2, embeds the
same 256 real sentences (`reference_sentences(256)`: first lines of stdlib docstrings; tokenized
together, max_length 64, then fed 64 at a time so every batch has one shape) with the fp32
model and with the quantized one, and compares the two sets of mean-pooled, L2-normalised
embeddings:

  - mean_cosine / min_cosine: cosine similarity per sentence, fp32 vs quantized;
  - nn_agreement: for each sentence, is its nearest *other* sentence (by cosine) the same
    one as with fp32? The fraction that agrees;
  - bits_per_weight: stored bits / weights over every quantized linear of MiniLM (the 36
    encoder linears: 384x384, 1536x384, 384x1536; the pooler is unused by mean pooling and
    memsave does not see it): packed codes + fp16 scales + fp16 zero points (asymmetric only),
    i.e. `memsave.ops.affine.bits_per_weight`. For memsave it is also measured from the
    compiled graph's constants (`stored_bits_per_weight` in the JSON; they must agree);
  - bits_per_weight_4096: the same formula for one 4096x4096 layer;
  - weight_sqnr_db (JSON and the equal-bits table): 10·log10(sum w² / sum (w_q − w)²) over those
    linears, a model-free view of each quantizer (for memsave from the same qparams choice and
    ops as its quantize pass, for torchao from its tensors' dequantize()).

Only linear weights are quantized, in both libraries; embeddings and LayerNorms stay fp32.

Configs:
  fp32                          fp32 weights through memsave (quantize none, codegen fx: see
                                the codegen param; --param codegen=default for the options a
                                user types, Inductor and the default kernels): the
                                noise floor of the comparison (~1.0), and the baseline column.
  memsave-<name>                torch.compile(model, backend="memsave",
                                options={"quantize": "<name>", "codegen": "fx"}), e.g.
                                memsave-int4-g64-asym-mse (see memsave/config.py for names).
  torchao-int8                  torchao.quantization.Int8WeightOnlyConfig() (per-row symmetric)
  torchao-int<b>-g<G>           IntxWeightOnlyConfig(weight_dtype=torch.int<b>, granularity=
                                PerGroup(G), mapping_type=MappingType.ASYMMETRIC) (round to nearest)
  torchao-int4-g<G>-sym         the same with MappingType.SYMMETRIC
  torchao-int4-g<G>-sym-hqq     the same with intx_choose_qparams_algorithm=HQQ_SCALE_ONLY
                                (torchao's error-minimising scale search; symmetric whatever the
                                mapping type: its zero point is always 0)
  torchao configs are applied with torchao.quantization.quantize_ to a copy of the model and run
  eagerly. torchao's int4 weight-only *Int4WeightOnlyConfig* does not run on a CPU in 0.18
  (it needs mslk; HQQ there needs the tile-packed CUDA format), so IntxWeightOnlyConfig is its
  CPU int4 path. For torchao, `bits_per_weight` is the same nominal formula as memsave's (so the
  two are compared at equal bits); what torchao really keeps in memory on a CPU (int4 codes
  unpacked to int8, fp32 scales, int8 zero points) is `stored_bits_per_weight` in the JSON.

repeats=1: the results are deterministic (same weights, same sentences, same kernels); a second
run reproduces them exactly, so medians over repeats would add nothing. Time is not measured.

    python benchmarks/bench_quant_fidelity.py                   # all 29 configs: 41 min on 2 busy cores
    python benchmarks/bench_quant_fidelity.py --quick           # 64 sentences
    python benchmarks/bench_quant_fidelity.py --configs memsave-int4,torchao-int4-g64
    python benchmarks/bench_quant_fidelity.py --redraw          # md + png again from the JSON

Writes docs/results/quant_fidelity.{json,md,png}. After the harness's table the markdown gets the
requirement checks (bits per weight), the targets (int8 >= 0.9995; best int4 at <= 4.5 bits >=
0.985; memsave no worse than torchao at equal bits) and which int4 recipe wins; the png plots
1 - mean cosine (log) and NN agreement against bits per weight, one point per config.
"""

from __future__ import annotations

import copy
import json
import math
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Benchmark, main, with_sections

# ----------------------------------------------------------------------------- configs

GROUPS = (32, 64, 128)


def _configs() -> list[str]:
    """Grouped by bit width and group size, so equal-bit rows of both libraries sit together."""
    configs = ["fp32", "memsave-int8", "torchao-int8"]
    for g in GROUPS:
        configs += [f"memsave-int4-g{g}-{sym}-{method}" for sym in ("asym", "sym") for method in ("rtn", "mse")]
        configs += [f"torchao-int4-g{g}", f"torchao-int4-g{g}-sym", f"torchao-int4-g{g}-sym-hqq"]
    configs += ["memsave-int3-g32-asym-rtn", "memsave-int3-g32-asym-mse", "torchao-int3-g32"]
    configs += ["memsave-int2-g32-asym-mse", "torchao-int2-g32"]
    # Calibration-based methods (calibrated on other sentences than the ones measured).
    for layout in ("g32-sym", "g64-asym", "g64-sym", "g128-asym", "g128-sym"):
        configs += [f"memsave-int4-{layout}-awq", f"memsave-int4-{layout}-gptq"]
    configs += ["memsave-int3-g32-asym-gptq", "memsave-int2-g32-asym-gptq"]
    return configs


CONFIGS = _configs()
_TORCHAO = re.compile(r"torchao-int([2348])(?:-g(\d+))?(-sym)?(-hqq)?")


def scheme(config: str) -> dict:
    """bits, group_size (None: per channel), symmetric, method, library."""
    if config == "fp32":
        return {"library": "none", "bits": 32, "group_size": None, "symmetric": True, "method": "-"}
    if config.startswith("memsave-"):
        from memsave.config import QuantizeConfig

        q = QuantizeConfig.parse(config[len("memsave-"):])  # "method" may be awq or gptq
        return {"library": "memsave", "bits": q.bits, "group_size": q.group_size, "symmetric": q.symmetric,
                "method": q.method}
    m = _TORCHAO.fullmatch(config)
    if m is None:
        raise ValueError(f"unknown config {config!r}")
    bits, group, sym, hqq = m.groups()
    if bits == "8":  # Int8WeightOnlyConfig: per-row symmetric
        return {"library": "torchao", "bits": 8, "group_size": None, "symmetric": True, "method": "rtn"}
    return {"library": "torchao", "bits": int(bits), "group_size": int(group), "symmetric": bool(sym or hqq),
            "method": "hqq" if hqq else "rtn"}


def nominal_bits(n: int, k: int, s: dict) -> float:
    """Packed codes + fp16 scales (+ fp16 zero points when asymmetric) per weight of one (n, k) layer."""
    from memsave.ops.affine import bits_per_weight

    if s["bits"] == 32:
        return 32.0
    group = k if s["group_size"] is None or s["group_size"] >= k else s["group_size"]
    extra = 32 / n if s.get("method") == "awq" else 0.0  # AWQ's fp32 1/s per input channel, kept for x · (1/s)
    return bits_per_weight(n, k, s["bits"], group, s["symmetric"]) + extra


def _torchao_config(config: str):
    import torch
    from torchao.quantization import Int8WeightOnlyConfig, IntxWeightOnlyConfig, MappingType, PerGroup
    from torchao.quantization.quantize_.workflows.intx.intx_choose_qparams_algorithm import (
        IntxChooseQParamsAlgorithm,
    )

    s = scheme(config)
    if s["bits"] == 8:
        return Int8WeightOnlyConfig()
    kwargs = {}
    if s["method"] == "hqq":
        kwargs["intx_choose_qparams_algorithm"] = IntxChooseQParamsAlgorithm.HQQ_SCALE_ONLY
    return IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{s['bits']}"),
        granularity=PerGroup(s["group_size"]),
        mapping_type=MappingType.SYMMETRIC if s["symmetric"] else MappingType.ASYMMETRIC,
        **kwargs,
    )


def _tensor_bytes(t) -> int:
    """Bytes a (possibly torchao subclass) tensor keeps: the sum over its inner tensors."""
    flatten = getattr(type(t), "__tensor_flatten__", None)
    if flatten is None:
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()
    return sum(_tensor_bytes(getattr(t, name)) for name in names if getattr(t, name) is not None)


# ----------------------------------------------------------------------------- measure


def _memsave_dequantized(w, s: dict):
    """What memsave's quantize pass makes of one weight: the same qparams choice and ops."""
    import torch

    from memsave.ops.affine import choose_qparams_affine, choose_qparams_mse, dequantize_affine, quantize_affine

    k = w.shape[1]
    group = k if s["group_size"] is None or s["group_size"] >= k else s["group_size"]
    choose = choose_qparams_mse if s["method"] == "mse" else choose_qparams_affine
    scale, offset = choose(w, s["bits"], group, s["symmetric"])
    packed = quantize_affine(w, scale, offset, s["bits"], group)
    return dequantize_affine(packed, scale, offset, s["bits"], group, k, torch.float32)


def _quantizable_linears(model) -> dict[str, tuple[int, int]]:
    """name -> (out, in) of the linears whose weights feed the embedding (the pooler does not)."""
    import torch

    return {f"{name}.weight": tuple(mod.weight.shape) for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and not name.startswith("encoder.pooler")}


def _embed(fn, ids, mask, batch: int):
    import torch

    with torch.no_grad():
        return torch.cat([fn(ids[i:i + batch], mask[i:i + batch]) for i in range(0, len(ids), batch)])


def measure(config: str, params: dict) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    import memsave
    from memsave.models.minilm import load_minilm, minilm_inputs, reference_sentences

    s = scheme(config)
    n_sentences = 64 if params.get("quick") else params["sentences"]
    batch = min(params["batch"], n_sentences)
    model, tokenizer = load_minilm()
    # All sentences tokenized together: one padded length, so every batch has the same shape
    # and memsave compiles once. Mean pooling masks the padding out.
    ids, mask = minilm_inputs(tokenizer, reference_sentences(n_sentences), params["max_length"])
    ref = _embed(model, ids, mask, batch)
    linears = _quantizable_linears(model)
    n_weights = sum(n * k for n, k in linears.values())

    out: dict[str, float] = {}
    qmodules: dict = {}  # torchao: name -> module of the quantized copy
    t0 = time.perf_counter()
    if s["library"] in ("none", "memsave"):
        # A copy: the weights load_minilm() returns live in non-resizable (safetensors) storage,
        # and memsave's release_weights frees the fp32 originals with storage.resize_(0).
        # codegen "default": the options exactly as a user types them (Inductor, the default
        # kernels, which narrow prefill-sized calls to bf16); "fx" (the default of this
        # benchmark, as its committed table was measured) keeps the graph op by op.
        options = {} if params["codegen"] == "default" else {"codegen": params["codegen"]}
        if s["library"] == "memsave":
            options["quantize"] = config[len("memsave-"):]
        target = copy.deepcopy(model)
        if s["method"] in ("awq", "gptq"):
            # Calibration data: 256 other docstring sentences than the measured ones.
            calibration = reference_sentences(2 * n_sentences)[n_sentences:]
            c_ids, c_mask = minilm_inputs(tokenizer, calibration, params["max_length"])
            memsave.calibrate(target, [(c_ids[i:i + batch], c_mask[i:i + batch]) for i in range(0, len(c_ids), batch)],
                              progress=False)
        with memsave.collect() as reports:
            compiled = torch.compile(target, backend="memsave", options=options)
            emb = _embed(compiled, ids, mask, batch)
        if s["library"] == "memsave":
            quantized = [q.split(":")[0] for r in reports for rec in r.records if rec.name == "quantize"
                         for q in rec.details.get("quantized", [])]
            if sorted(quantized) != sorted(linears):
                raise RuntimeError(f"memsave quantized {len(quantized)} weights, expected the {len(linears)} "
                                   f"encoder linears; missing {sorted(set(linears) - set(quantized))[:3]}")
            stored = sum(t.numel() * t.element_size() for r in reports for t in r.constant_tensors())
            out["stored_bits_per_weight"] = stored * 8 / n_weights
            out["graphs"] = float(len(reports))
        else:
            out["stored_bits_per_weight"] = 32.0
    else:
        from torchao.quantization import quantize_

        qmodel = copy.deepcopy(model)
        quantize_(qmodel, _torchao_config(config))
        qmodules = dict(qmodel.named_modules())
        stored = sum(_tensor_bytes(qmodules[name.rsplit(".", 1)[0]].weight) for name in linears)
        out["stored_bits_per_weight"] = stored * 8 / n_weights
        emb = _embed(qmodel, ids, mask, batch)
    out["quantize_and_embed_s"] = time.perf_counter() - t0

    # Weight-level error over the same linears: a model-free second view of each quantizer.
    if s["library"] == "memsave" and s["method"] in ("awq", "gptq"):
        # Their codes depend on calibration data: take memsave's own per-layer weight SQNR.
        per_layer = {k: v for r in reports for rec in r.records if rec.name == "quantize"
                     for k, v in rec.details["sqnr_db"].items()}
        signal = noise = 0.0
        for name in linears:
            w2 = model.get_submodule(name.rsplit(".", 1)[0]).weight.detach().double().pow(2).sum().item()
            signal += w2
            noise += w2 / 10 ** (per_layer[name] / 10)
        out["weight_sqnr_db"] = 10 * math.log10(signal / noise)
    elif s["library"] != "none":
        signal = noise = 0.0
        for name in linears:
            w = model.get_submodule(name.rsplit(".", 1)[0]).weight.detach()
            dq = (_memsave_dequantized(w, s) if s["library"] == "memsave"
                  else qmodules[name.rsplit(".", 1)[0]].weight.dequantize().float())
            signal += w.double().pow(2).sum().item()
            noise += (dq.double() - w.double()).pow(2).sum().item()
        out["weight_sqnr_db"] = 10 * math.log10(signal / noise)

    cos = F.cosine_similarity(emb.double(), ref.double(), dim=1)

    def nearest(e):
        sim = e.double() @ e.double().T
        sim.fill_diagonal_(-math.inf)
        return sim.argmax(dim=1)

    out["bits_per_weight"] = sum(n * k * nominal_bits(n, k, s) for n, k in linears.values()) / n_weights
    out["bits_per_weight_4096"] = nominal_bits(4096, 4096, s)
    out["mean_cosine"] = cos.mean().item()
    out["min_cosine"] = cos.min().item()
    out["one_minus_cosine"] = 1.0 - out["mean_cosine"]
    out["nn_agreement"] = (nearest(emb) == nearest(ref)).double().mean().item()
    out["sentences"] = float(len(ids))
    out["tokens_per_sentence"] = float(ids.shape[1])
    out["weights"] = float(n_weights)
    if s["library"] == "memsave" and abs(out["stored_bits_per_weight"] - out["bits_per_weight"]) > 1e-9:
        raise RuntimeError(f"memsave stores {out['stored_bits_per_weight']:.4f} bits/weight, "
                           f"the formula says {out['bits_per_weight']:.4f}")
    return out


# ----------------------------------------------------------------------------- report

INT8_TARGET = 0.9995
INT4_TARGET = 0.985
INT4_BITS = 4.5


def _value(results: dict, config: str, metric: str) -> float | None:
    stat = results["summary"].get(config, {}).get("metrics", {}).get(metric)
    return None if stat is None else stat["median"]


def _f(value: float | None, decimals: int) -> str:
    return "–" if value is None else f"{value:.{decimals}f}"


def _ok(flag: bool) -> str:
    return "**met**" if flag else "**not met**"


def _minilm_in_features() -> tuple[int, int]:
    from memsave.models.minilm import get_minilm_path

    cfg = json.loads((get_minilm_path() / "config.json").read_text())
    return cfg["hidden_size"], cfg["intermediate_size"]


def extra_sections(results: dict) -> str:
    ran = [c for c in results["configs"] if _value(results, c, "mean_cosine") is not None]
    cos = {c: _value(results, c, "mean_cosine") for c in ran}
    nn = {c: _value(results, c, "nn_agreement") for c in ran}
    bits = {c: _value(results, c, "bits_per_weight") for c in ran}
    lines = ["", "## Bits per weight: requirements", ""]
    hidden, inter = _minilm_in_features()
    ks = sorted({hidden, inter, 512, 4096})
    lines += [
        "Stored bits / weights = (packed codes + fp16 scales + fp16 zero points) / weights, from "
        "`memsave.ops.affine.bits_per_weight` (it does not depend on the number of rows). "
        f"MiniLM's linears have {hidden} and {inter} input features.",
        "",
        "| scheme | " + " | ".join(f"in-features {k}" for k in ks) + " | all MiniLM linears | requirement |",
        "|---|" + "---:|" * (len(ks) + 1) + "---|",
    ]
    checks = [("int8 per-channel sym", {"bits": 8, "group_size": None, "symmetric": True}, 8.1, 512),
              ("int4 g128 asym", {"bits": 4, "group_size": 128, "symmetric": False}, 4.3, 0),
              ("int4 g128 sym", {"bits": 4, "group_size": 128, "symmetric": True}, 4.3, 0)]
    for label, s, limit, min_k in checks:
        per_k = [nominal_bits(4096, k, s) for k in ks]
        name = {8: "memsave-int8", 4: f"memsave-int4-g128-{'sym' if s['symmetric'] else 'asym'}-rtn"}[s["bits"]]
        whole = bits.get(name)
        relevant = [b for k, b in zip(ks, per_k) if k >= min_k] + ([whole] if whole is not None and min_k <= min(ks) else [])
        flag = all(b <= limit for b in relevant)
        cond = f"≤ {limit}" + (f" for in-features ≥ {min_k}" if min_k else "")
        lines.append(f"| {label} | " + " | ".join(f"{b:.4f}" for b in per_k)
                     + f" | {'–' if whole is None else f'{whole:.4f}'} | {cond}: {_ok(flag)} |")
    lines += ["", "Every scheme's value for the MiniLM linears and for one 4096×4096 layer is in the table above "
              "(`bits_per_weight`, `bits_per_weight_4096`)."]

    # Targets.
    lines += ["", "## Targets", ""]
    if "memsave-int8" in cos:
        c = cos["memsave-int8"]
        lines.append(f"- memsave int8 mean cosine ≥ {INT8_TARGET}: {c:.5f} → {_ok(c >= INT8_TARGET)}")
    int4 = sorted((c for c in ran if c.startswith("memsave-int4") and bits[c] <= INT4_BITS + 1e-9),
                  key=lambda c: -cos[c])
    if int4:
        best = int4[0]
        lines.append(f"- best memsave int4 at ≤ {INT4_BITS} bits/weight, mean cosine ≥ {INT4_TARGET}: "
                     f"`{best}` {cos[best]:.4f} → {_ok(cos[best] >= INT4_TARGET)}"
                     + ("" if cos[best] >= INT4_TARGET else
                        f" (round-to-nearest and the MSE clip search alone do not get there on this model; "
                        f"the gap is {INT4_TARGET - cos[best]:.4f})"))
        ao = [c for c in ran if c.startswith("torchao-int4") and bits[c] <= INT4_BITS + 1e-9]
        if ao:
            ab = max(ao, key=lambda c: cos[c])
            lines.append(f"  - for comparison, torchao's best int4 at ≤ {INT4_BITS} bits/weight: `{ab}` {cos[ab]:.4f}")
    pairs = _equal_bit_pairs(ran)
    if pairs:
        worse = [(m, t) for m, t in pairs if 1 - cos[m] > 1 - cos[t]]
        lines.append(f"- memsave's error (1 − mean cosine) no worse than torchao's at equal bits: "
                     f"{len(pairs) - len(worse)} of {len(pairs)} pairs → {_ok(not worse)}"
                     + ("" if not worse else "; worse: " + ", ".join(
                         f"`{m}` vs `{t}` (error {(1 - cos[m]) / (1 - cos[t]):.3f}×)" for m, t in worse)))

    # Equal bits, side by side.
    if pairs:
        lines += ["", "## memsave vs torchao at equal bits", "",
                  "Same scheme, same bits per weight (same formula), same sentences. Error = 1 − mean cosine; "
                  "ratio = memsave error / torchao error (< 1: memsave is closer to fp32). Weight SQNR: "
                  "10·log10(Σw² / Σ(w_q − w)²) over the same linears (higher is better). The last column is "
                  "what torchao really keeps in memory on a CPU (IntxWeightOnlyConfig stores int2/3/4 codes "
                  "unpacked, one int8 each, with fp32 scales and int8 zero points).", "",
                  "| bits/weight | memsave | error | NN agree | weight SQNR dB | torchao | error | NN agree | "
                  "weight SQNR dB | error ratio | torchao in memory, bits/weight |",
                  "|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
        for m, t in pairs:
            em, et = 1 - cos[m], 1 - cos[t]
            ratio = f"{em / et:.3f}×" if et > 0 else "–"
            stored = _run_metric(results, "stored_bits_per_weight", t)
            sm, st = (_run_metric(results, "weight_sqnr_db", c) for c in (m, t))
            lines.append(f"| {bits[m]:.3f} | `{m}` | {em:.5f} | {nn[m]:.3f} | {_f(sm, 2)} | `{t}` | {et:.5f} | "
                         f"{nn[t]:.3f} | {_f(st, 2)} | {ratio} | {_f(stored, 2)} |")
        rtn_worse = [m for m, t in pairs if scheme(m)["method"] == "rtn" and cos[m] < cos[t]]
        if rtn_worse:
            lines += ["", "Where memsave's round-to-nearest trails torchao's (" + ", ".join(f"`{m}`" for m in rtn_worse)
                      + "): both now use the same grid (symmetric scale max|w| / (2^(b−1) − 0.5), all 2^b "
                      "codes in use; asymmetric range [min(w, 0), max(w, 0)] with an integer zero point), which "
                      "the identical weight SQNR columns show. A likely cause of the rest (not checked separately): "
                      "memsave keeps fp16 scales where torchao keeps fp32 ones in memory (last column), so a few "
                      "codes may round differently; the error ratios of these pairs are within 1% of 1."]

    # Winner.
    if int4:
        lines += ["", f"## Which int4 recipe wins at ≤ {INT4_BITS} bits/weight (memsave)", "",
                  "| rank | config | bits/weight | mean cosine | min cosine | NN agreement |", "|---:|---|---:|---:|---:|---:|"]
        for i, c in enumerate(int4, 1):
            lines.append(f"| {i} | `{c}` | {bits[c]:.3f} | {cos[c]:.4f} | {_value(results, c, 'min_cosine'):.4f} | "
                         f"{nn[c]:.3f} |")
        best = int4[0]
        over = [c for c in ran if c.startswith("memsave-int4") and bits[c] > INT4_BITS + 1e-9]
        lines += ["", f"**Winner: `{best}`** ({bits[best]:.3f} bits/weight, mean cosine {cos[best]:.4f}, "
                  f"NN agreement {nn[best]:.3f})."]
        close = [c for c in int4[1:] if cos[best] - cos[c] < 0.001]
        if close:
            lines[-1] += (" Within 0.001 of it (a tie at this sample size): "
                          + ", ".join(f"`{c}` ({bits[c]:.3f} bits/weight, {cos[c]:.4f})" for c in close) + ".")
        from memsave.config import QuantizeConfig

        d = QuantizeConfig.parse("int4")
        default = f"memsave-int{d.bits}-g{d.group_size}-{'sym' if d.symmetric else 'asym'}-{d.method}"
        if default in cos:
            lines.append("")
            lines.append(f"memsave's `int4` shorthand is `{default}`"
                         + (": the winner." if default == best else
                            f" ({cos[default]:.4f}, rank {int4.index(default) + 1 if default in int4 else '–'})."))
        if over:
            ob = max(over, key=lambda c: cos[c])
            lines += [""]
            lines.append(f"Above the budget, `{ob}` ({bits[ob]:.2f} bits/weight) reaches {cos[ob]:.4f}.")
    return "\n".join(lines) + "\n"


def _run_metric(results: dict, metric: str, config: str | None = None) -> float | None:
    """A JSON-only metric (not in the table) of the first run (of `config`) that has it."""
    for run in results["runs"]:
        if run["ok"] and metric in run["metrics"] and config in (None, run["config"]):
            return run["metrics"][metric]
    return None


def render_scatter(results: dict, path: Path) -> None:
    """Left: 1 - mean cosine (log) against bits per weight, one marker per config. Right: every
    config's error as a labelled bar, grouped by bits, with its NN agreement."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    colors = {"memsave": "tab:blue", "torchao": "tab:orange"}
    markers = {"rtn": "o", "mse": "^", "hqq": "v", "awq": "s", "gptq": "D"}
    dodge = {"memsave": -0.04, "torchao": 0.04}
    points = []
    for config in results["configs"]:
        b, c, a = (_value(results, config, m) for m in ("bits_per_weight", "mean_cosine", "nn_agreement"))
        s = scheme(config)
        if None in (b, c, a) or s["library"] == "none":  # fp32: 32 bits, error ~0
            continue
        points.append((config, s, b, max(1 - c, 1e-7), a))

    fig = Figure(figsize=(16, max(6.0, 0.3 * len(points) + 1.8)))
    FigureCanvasAgg(fig)
    ax, bars = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    for config, s, b, err, _ in points:
        color = colors[s["library"]]
        ax.scatter(b + dodge[s["library"]], err, marker=markers[s["method"]], s=48, alpha=0.9,
                   facecolors=color if not s["symmetric"] or s["bits"] == 8 else "none", edgecolors=color)
    ax.set_yscale("log")
    for target, text, ls in ((INT4_TARGET, "int4 target", "--"), (INT8_TARGET, "int8 target", ":")):
        ax.axhline(1 - target, ls=ls, lw=0.9, color="tab:red")
        ax.text(0.01, 1 - target, f" {text}: cosine {target}", transform=ax.get_yaxis_transform(), va="bottom",
                fontsize=8, color="tab:red")
    ax.axvline(INT4_BITS, ls="--", lw=0.8, color="tab:gray")
    ax.set_xlabel("bits per weight (MiniLM linears: codes + fp16 scales + fp16 zero points)")
    ax.set_ylabel("1 − mean cosine vs fp32 (log; lower is better)")
    ax.set_title("Embedding error vs bits per weight (grey dashed: 4.5 bits)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    legend = [Line2D([], [], ls="", marker="s", color=colors[k], label=k) for k in colors]
    legend += [Line2D([], [], ls="", marker=markers[k], color="k", label=k) for k in markers]
    legend += [Line2D([], [], ls="", marker="o", color="k", label="asymmetric (int8: symmetric)"),
               Line2D([], [], ls="", marker="o", markerfacecolor="none", color="k", label="symmetric")]
    ax.legend(handles=legend, fontsize=8, loc="upper right")

    ordered = sorted(points, key=lambda p: (-p[2], p[1]["group_size"] or 0, p[1]["library"], p[3]))
    y = list(range(len(ordered)))[::-1]
    bars.barh(y, [p[3] for p in ordered], color=[colors[p[1]["library"]] for p in ordered], alpha=0.85)
    bars.set_yticks(y, [f"{p[0]}  ({p[2]:.3g} b)" for p in ordered], fontsize=7.5)
    bars.set_xscale("log")
    for yi, p in zip(y, ordered):
        bars.annotate(f"cos {1 - p[3]:.4f}, NN {p[4]:.2f}", (p[3], yi), xytext=(3, 0), textcoords="offset points",
                      va="center", fontsize=6.5)
    bars.axvline(1 - INT4_TARGET, ls="--", lw=0.9, color="tab:red")
    bars.axvline(1 - INT8_TARGET, ls=":", lw=0.9, color="tab:red")
    bars.set_xlim(right=max(p[3] for p in ordered) * 8)
    bars.set_xlabel("1 − mean cosine vs fp32 (log; lower is better); text: mean cosine, NN agreement")
    bars.set_title("Every config, grouped by bits per weight", fontsize=10)
    bars.grid(alpha=0.3, axis="x", which="both")
    n = _run_metric(results, "sentences")
    fig.suptitle(f"{results['title']}\n{int(n) if n else '?'} sentences; markers/bars: one config each, "
                 "error vs the fp32 model in the same process", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _equal_bit_pairs(ran: list[str]) -> list[tuple[str, str]]:
    """(memsave, torchao) configs with the same scheme and method family."""
    pairs = [("memsave-int8", "torchao-int8")]
    for g in GROUPS:
        pairs += [(f"memsave-int4-g{g}-asym-rtn", f"torchao-int4-g{g}"),
                  (f"memsave-int4-g{g}-asym-mse", f"torchao-int4-g{g}"),
                  (f"memsave-int4-g{g}-sym-rtn", f"torchao-int4-g{g}-sym"),
                  (f"memsave-int4-g{g}-sym-mse", f"torchao-int4-g{g}-sym-hqq")]
    pairs += [("memsave-int3-g32-asym-rtn", "torchao-int3-g32"), ("memsave-int3-g32-asym-mse", "torchao-int3-g32"),
              ("memsave-int2-g32-asym-mse", "torchao-int2-g32")]
    return [(m, t) for m, t in pairs if m in ran and t in ran]


BENCH = Benchmark(
    name="quant_fidelity",
    title="Weight-only quantization of the real all-MiniLM-L6-v2: bits per weight vs embedding fidelity, memsave vs torchao",
    configs=CONFIGS,
    baseline="fp32",
    measure=measure,
    metrics={
        "bits_per_weight": "lower",
        "bits_per_weight_4096": "lower",
        "mean_cosine": "higher",
        "min_cosine": "higher",
        "nn_agreement": "higher",
    },
    params={"sentences": 256, "batch": 64, "max_length": 64, "codegen": "fx"},
    repeats=1,
    plot=["mean_cosine"],  # the png is the scatter plot (draw) instead
    report=with_sections(extra_sections),
    draw=render_scatter,
)


if __name__ == "__main__":
    main(BENCH)
