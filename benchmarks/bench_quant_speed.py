"""Speed of weight-only quantization on the CPU: memsave int8/int4 vs eager, Inductor and torchao.

The subject is the built-in ~1.1B-parameter decoder (`build_decoder("1b")`, the TinyLlama shape:
hidden 2048, 22 layers, intermediate 5632, vocab 32000). Two calls are timed, both at batch 1:

  - decode step: a forward of input_ids (1, 1). The built-in decoder has no KV cache, so a
    "decode step" is a one-token forward; like real decode it reads every weight once to do
    two flops per weight, so it is bound by how fast the weights stream from memory;
  - prefill: a forward of input_ids (1, 128): the same weights for 128 tokens, compute-bound.

Configs (each run: a fresh process, all cores, `torch.no_grad()`, `torch.compile(dynamic=False)`
so each shape gets its own static graph, compiled outside the timing):

  eager-fp32       the fp32 model as built (the baseline)
  eager-bf16       model.to(torch.bfloat16)
  inductor-fp32    torch.compile(model)
  torchao-int8wo   model.to(bfloat16); torchao.quantization.quantize_(model, Int8WeightOnlyConfig())
                   (per-row symmetric int8); torch.compile(model)
  memsave-int8     torch.compile(model, backend="memsave", options={"quantize": {"bits": 8,
                   "compute_dtype": "bfloat16"}, "codegen": ...}) on the fp32 model
  memsave-int4     the same with {"bits": 4, "group_size": 128, "symmetric": False,
                   "method": <int4_method>, "compute_dtype": "bfloat16"}: every linear of the 1b
                   model qualifies for the int4 kernel (N % 64 == 0, K % 128 == 0)
  memsave-int4-g64 the same with group_size 64

`int4_method` (param) is "rtn" by default. The method only decides which scale and offset each
group gets; the codes, their layout, the bytes and the kernel are the same for "rtn" and "mse",
so the speed is too. "mse" searches 20 clip ratios per group in eager fp32 ops: on the 1.03B
linear weights of the 1b model that is ~15-20 min of compile per run on 2 shared cores (one
5632x2048 weight: 9-13 s), against seconds for "rtn". Its fidelity is bench_quant_fidelity's
subject; `--param int4_method=mse` measures the speed with it anyway.

memsave's `compute_dtype="bfloat16"` casts the activations of each quantized linear to bf16, which
is what ATen's fast CPU kernels (`_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu`) need.
`memsave_codegen` (param, default "fx") picks memsave's code generator: with "inductor" and a
compute_dtype, the graph memsave hands to Inductor holds `aten._to_copy` casts, which Inductor
refuses ("both a fallback and a decomp for same op: aten._to_copy.default"), so the default is
"fx" until that is fixed; `--param memsave_codegen=inductor` tries Inductor.

Per run, after warm-up: the median of `decode_iters` decode calls and of `prefill_iters` prefill
calls; peak RSS growth over the timed calls; the weight bytes the compiled model holds (eager,
Inductor: its parameters; torchao: the inner tensors of its quantized parameters; memsave: the
live parameters plus the constants its graphs hold, `report.constant_tensors()`, storages counted
once); for memsave, how many linears got each kernel (from the report's `select_kernels` record).

Bandwidth: every run first measures this machine's copy bandwidth, `dst.copy_(src)` of a 512 MiB
fp32 tensor, counted as (bytes read + bytes written) / median time. The weight-streaming limit
of a decode step is then streamed weight bytes / that bandwidth, where streamed bytes = held
weight bytes minus the embedding table (a decode step reads one row of it). It also measures a
read-only bandwidth (`src.sum()`, bytes read / time), kept in the JSON.

    python benchmarks/bench_quant_speed.py                # decoder 1b, 3 repeats (~30-60 min on 2 cores)
    python benchmarks/bench_quant_speed.py --quick        # decoder medium, 1 repeat, fewer calls
    python benchmarks/bench_quant_speed.py --configs memsave-int4,torchao-int8wo
    python benchmarks/bench_quant_speed.py --redraw       # md + png again from the JSON

Writes docs/results/quant_speed.{json,md,png}. After the harness's table the markdown gets the
speedups vs eager fp32, the bandwidth limits beside the measured decode times, the kernel counts,
and whether the goals are met (batch 1: memsave int8 >= 2x and int4 >= 3x faster than eager fp32,
and no slower than torchao int8 weight-only).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (
    Benchmark,
    MiB,
    current_rss_bytes,
    main,
    peak_rss_bytes,
    reset_peak_rss,
    time_call,
    with_sections,
)

BASELINE = "eager-fp32"
# int4 "method" comes from params["int4_method"] (see the docstring for why the default is "rtn").
MEMSAVE_QUANT = {
    "memsave-int8": {"bits": 8, "compute_dtype": "bfloat16"},
    "memsave-int4": {"bits": 4, "group_size": 128, "symmetric": False, "compute_dtype": "bfloat16"},
    "memsave-int4-g64": {"bits": 4, "group_size": 64, "symmetric": False, "compute_dtype": "bfloat16"},
}
CONFIGS = [BASELINE, "eager-bf16", "inductor-fp32", "torchao-int8wo", *MEMSAVE_QUANT]
KERNELS = ("cpu-int8pack", "cpu-int4pack", "reference")
GOALS = {"memsave-int8": 2.0, "memsave-int4": 3.0, "memsave-int4-g64": 3.0}  # decode speedup vs eager fp32
TORCHAO = "torchao-int8wo"
GB = 1e9


# ----------------------------------------------------------------------------- measure


def _bandwidth(mib: int, iters: int) -> tuple[float, float]:
    """(copy GB/s counting read + write bytes, read-only GB/s) on `mib` MiB fp32 tensors."""
    import torch

    n = mib * MiB // 4
    src = torch.ones(n)
    dst = torch.zeros(n)  # written once, so its pages are resident before timing
    copy_ms = statistics.median(time_call(lambda: dst.copy_(src), warmup=2, iters=iters))
    read_ms = statistics.median(time_call(lambda: src.sum(), warmup=2, iters=iters))
    nbytes = n * 4
    del src, dst
    return 2 * nbytes / (copy_ms / 1e3) / GB, nbytes / (read_ms / 1e3) / GB


def _held_bytes(tensors) -> int:
    """Bytes of the unique storages behind tensors, looking inside tensor subclasses (torchao)."""
    import torch

    seen: dict[int, int] = {}

    def visit(t):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        flatten = getattr(type(t), "__tensor_flatten__", None)
        if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
            names, _ = t.__tensor_flatten__()
            for name in names:
                visit(getattr(t, name))
            return
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()

    for t in tensors:
        visit(t)
    return sum(seen.values())


def _prepare(config: str, model, params: dict):
    """The callable to time, for one config."""
    import torch

    if config == "eager-fp32":
        return model
    if config == "eager-bf16":
        return model.to(torch.bfloat16)
    if config == "inductor-fp32":
        return torch.compile(model, dynamic=False)
    if config == "torchao-int8wo":
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model.to(torch.bfloat16)
        quantize_(model, Int8WeightOnlyConfig())
        return torch.compile(model, dynamic=False)
    if config in MEMSAVE_QUANT:
        quantize = dict(MEMSAVE_QUANT[config])
        if quantize["bits"] == 4:
            quantize["method"] = params["int4_method"]
        options = {"quantize": quantize, "codegen": params["memsave_codegen"]}
        return torch.compile(model, backend="memsave", options=options, dynamic=False)
    raise ValueError(f"unknown config {config!r}; choose from {CONFIGS}")


def _cosine(a, b) -> float:
    import torch.nn.functional as F

    return F.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def measure(config: str, params: dict) -> dict[str, float]:
    import torch

    import memsave
    from memsave.models import build_decoder, decoder_inputs

    quick = bool(params.get("quick"))
    out: dict[str, float] = {"threads": float(torch.get_num_threads())}

    # Bandwidth first, before the model takes the memory.
    out["copy_gbps"], out["read_gbps"] = _bandwidth(params["bandwidth_mib"], 5 if quick else 10)

    t0 = time.perf_counter()
    size = params["quick_size"] if quick else params["size"]
    model = build_decoder(size)
    out["build_s"] = time.perf_counter() - t0
    out["params"] = float(sum(p.numel() for p in model.parameters()))
    out["linears"] = float(sum(isinstance(m, torch.nn.Linear) for m in model.modules()))
    decode_ids = decoder_inputs(model, batch=1, seq=1, seed=1)[0]
    prefill_ids = decoder_inputs(model, batch=1, seq=params["prefill_len"], seed=2)[0]

    with torch.no_grad():
        # fp32 eager reference logits of the decode step: a sanity check that the fast configs
        # compute the same model (a prefill reference would cost one more slow fp32 prefill).
        ref_decode = model(decode_ids).float()

        t0 = time.perf_counter()
        step = _prepare(config, model, params)
        out["prepare_s"] = time.perf_counter() - t0
        with memsave.collect() as reports:
            t0 = time.perf_counter()
            y_decode = step(decode_ids)
            out["first_decode_s"] = time.perf_counter() - t0  # compile included
            n_decode_reports = len(reports)
            t0 = time.perf_counter()
            y_prefill = step(prefill_ids)
            out["first_prefill_s"] = time.perf_counter() - t0
        out["decode_cosine_vs_fp32"] = _cosine(y_decode, ref_decode)
        del y_decode, y_prefill, ref_decode

        # Weights held after compiling.
        held = list(model.parameters())
        for report in reports:
            held += report.constant_tensors()
        out["weight_mib"] = _held_bytes(held) / MiB
        embed_bytes = _held_bytes([model.embed_tokens.weight])
        out["streamed_weight_mib"] = out["weight_mib"] - embed_bytes / MiB
        out["decode_limit_ms"] = out["streamed_weight_mib"] * MiB / (out["copy_gbps"] * GB) * 1e3
        out["decode_limit_read_ms"] = out["streamed_weight_mib"] * MiB / (out["read_gbps"] * GB) * 1e3

        # Kernels memsave chose for the quantized linears, per graph (decode graph, prefill graph).
        if config in MEMSAVE_QUANT:
            if not reports:
                raise RuntimeError("memsave compiled no graph (no report collected)")
            out["graphs"] = float(len(reports))
            for label, group in (("decode", reports[:n_decode_reports]), ("prefill", reports[n_decode_reports:])):
                counts: dict[str, int] = {}
                for report in group:
                    select = report.records[-1]
                    if select.name != "select_kernels":
                        raise RuntimeError(f"last pass of the report is {select.name!r}, not select_kernels")
                    for name, count in select.details.get("kernels", {}).items():
                        counts[name] = counts.get(name, 0) + count
                for name in sorted(set(KERNELS) | set(counts)):
                    out[f"{label}_kernel_{name}"] = float(counts.get(name, 0))

        # Timed calls.
        reset_peak_rss()
        before = current_rss_bytes()
        out["rss_before_timing_mib"] = before / MiB
        out["load_avg_before_timing"] = os.getloadavg()[0]  # other processes on this shared machine
        decode = time_call(lambda: step(decode_ids), warmup=2, iters=params["decode_iters"] if not quick else 5)
        prefill = time_call(lambda: step(prefill_ids), warmup=1, iters=params["prefill_iters"] if not quick else 2)
        out["timed_rss_growth_mib"] = (peak_rss_bytes() - before) / MiB
        out["load_avg_after_timing"] = os.getloadavg()[0]
    out["decode_ms"] = statistics.median(decode)
    out["decode_min_ms"] = min(decode)
    out["prefill_ms"] = statistics.median(prefill)
    out["prefill_min_ms"] = min(prefill)
    out["decode_tokens_per_s"] = 1e3 / out["decode_ms"]
    out["prefill_tokens_per_s"] = params["prefill_len"] * 1e3 / out["prefill_ms"]
    return out


# ----------------------------------------------------------------------------- report


def _value(results: dict, config: str, metric: str) -> float | None:
    """Median over the config's ok runs of a metric, table metric or JSON-only one."""
    values = [r["metrics"][metric] for r in results["runs"]
              if r["config"] == config and r["ok"] and metric in r["metrics"]]
    return statistics.median(values) if values else None


def _best(results: dict, config: str, metric: str) -> float | None:
    """Smallest value over the config's ok runs."""
    values = [r["metrics"][metric] for r in results["runs"]
              if r["config"] == config and r["ok"] and metric in r["metrics"]]
    return min(values) if values else None


def _ok(flag: bool) -> str:
    return "**met**" if flag else "**not met**"


def _x(v: float | None) -> str:
    return "–" if v is None else f"{v:.2f}×"


def _n(v: float | None, fmt: str = "{:.1f}") -> str:
    return "–" if v is None else fmt.format(v)


def extra_sections(results: dict) -> str:
    ran = [c for c in results["configs"] if _value(results, c, "decode_ms") is not None]
    base_decode = _value(results, BASELINE, "decode_ms")
    base_prefill = _value(results, BASELINE, "prefill_ms")
    lines = []

    # Bandwidth.
    all_copy = [r["metrics"]["copy_gbps"] for r in results["runs"] if r["ok"] and "copy_gbps" in r["metrics"]]
    all_read = [r["metrics"]["read_gbps"] for r in results["runs"] if r["ok"] and "read_gbps" in r["metrics"]]
    if all_copy:
        lines += [
            "", "## Memory bandwidth and the weight-streaming limit", "",
            f"Each run first timed `dst.copy_(src)` on {results['params'].get('bandwidth_mib')} MiB fp32 tensors "
            "(10 calls, median). **Copy bandwidth = (bytes read + bytes written) / time**: "
            f"median {statistics.median(all_copy):.1f} GB/s over {len(all_copy)} runs "
            f"(min {min(all_copy):.1f}, max {max(all_copy):.1f}). A read-only pass (`src.sum()`, bytes read / time) "
            f"gave median {statistics.median(all_read):.1f} GB/s (min {min(all_read):.1f}, max {max(all_read):.1f}).",
            "",
            "**Weight-streaming limit of a decode step = streamed weight bytes / copy bandwidth of the same run**, "
            "streamed bytes = the weight bytes the compiled model holds minus the embedding table (a one-token "
            "forward reads one row of it). It is the time a decode step would take if it did nothing but read "
            "each weight once at the measured bandwidth; other work (activations, attention, casts, Python) "
            "comes on top. `decode_limit_ms` in the table above is this limit; `decode_limit_read_ms` in the "
            "JSON uses the read-only bandwidth instead.",
        ]

    # Speedups.
    if base_decode and base_prefill:
        base_best = _best(results, BASELINE, "decode_min_ms")
        loads = [r["metrics"][k] for r in results["runs"] if r["ok"]
                 for k in ("load_avg_before_timing", "load_avg_after_timing") if k in r["metrics"]]
        lines += [
            "", "## Speedups vs eager fp32", "",
            "Speedup = eager-fp32 median / config median (the inverse of the ratios above; > 1 is faster). "
            "Decode: one-token forward, (1, 1); prefill: (1, "
            f"{results['params'].get('prefill_len')}). % of limit = limit / measured decode time. "
            "Fastest decode = the fastest single decode call over all runs of the config (less disturbed by "
            "other processes than the median), with its speedup over eager fp32's fastest. Cosine: decode "
            "logits against the eager fp32 model's, same input.", "",
            "| config | decode ms | decode speedup | fastest decode ms | speedup (fastest) | decode limit ms "
            "| % of limit | prefill ms | prefill speedup | prefill tok/s | weights MiB | streamed MiB | cosine vs fp32 |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for c in ran:
            d, p = _value(results, c, "decode_ms"), _value(results, c, "prefill_ms")
            best = _best(results, c, "decode_min_ms")
            lim = _value(results, c, "decode_limit_ms")
            lines.append(
                f"| {c} | {_n(d)} | {_x(base_decode / d if d else None)} | {_n(best)} | "
                f"{_x(base_best / best if best and base_best else None)} | {_n(lim)} | "
                f"{_n(100 * lim / d if lim and d else None, '{:.0f}%')} | {_n(p)} | "
                f"{_x(base_prefill / p if p else None)} | {_n(_value(results, c, 'prefill_tokens_per_s'))} | "
                f"{_n(_value(results, c, 'weight_mib'), '{:.0f}')} | "
                f"{_n(_value(results, c, 'streamed_weight_mib'), '{:.0f}')} | "
                f"{_n(_value(results, c, 'decode_cosine_vs_fp32'), '{:.5f}')} |"
            )
        if loads:
            lines += ["", f"The machine is shared: the 1-minute load average around the timed calls ranged "
                      f"{min(loads):.1f}–{max(loads):.1f} (median {statistics.median(loads):.1f}) on "
                      f"{results['machine'].get('available_cores')} cores, so timings include waiting for CPU; "
                      "configs were interleaved so that this hits all of them alike."]

    # Kernels.
    memsave_ran = [c for c in ran if c in MEMSAVE_QUANT]
    if memsave_ran:
        lines += [
            "", "## Kernels memsave selected", "",
            "From the `select_kernels` record of each compiled graph's report (one graph for the decode shape, "
            "one for the prefill shape; median over runs). `reference` = memsave's generic dequantize + matmul.",
            "",
            "| config | linears in the model | decode graph | prefill graph |",
            "|---|---:|---|---|",
        ]
        for c in memsave_ran:
            cells = []
            for label in ("decode", "prefill"):
                names = sorted({m[len(label) + 8:] for r in results["runs"] if r["config"] == c and r["ok"]
                                for m in r["metrics"] if m.startswith(f"{label}_kernel_")})
                cells.append(", ".join(f"{n} ×{_value(results, c, f'{label}_kernel_{n}'):.0f}" for n in names
                                       if _value(results, c, f"{label}_kernel_{n}")) or "–")
            lines.append(f"| {c} | {_n(_value(results, c, 'linears'), '{:.0f}')} | {cells[0]} | {cells[1]} |")

    # Goals.
    if base_decode:
        lines += ["", "## Goals (batch 1, vs eager fp32 and torchao int8 weight-only)", ""]
        torchao_d = _value(results, TORCHAO, "decode_ms")
        torchao_p = _value(results, TORCHAO, "prefill_ms")
        for c, goal in GOALS.items():
            d = _value(results, c, "decode_ms")
            if d is None:
                lines.append(f"- `{c}`: did not run")
                continue
            p = _value(results, c, "prefill_ms")
            s = base_decode / d
            line = f"- `{c}` decode {s:.2f}× faster than eager fp32, goal ≥ {goal:g}× → {_ok(s >= goal)}"
            best, base_best = _best(results, c, "decode_min_ms"), _best(results, BASELINE, "decode_min_ms")
            if best and base_best:
                line += f" (fastest calls: {base_best / best:.2f}×)"
            if torchao_d is not None:
                line += (f"; vs `{TORCHAO}` {torchao_d / d:.2f}× (decode {d:.1f} vs {torchao_d:.1f} ms), "
                         f"no slower → {_ok(d <= torchao_d)}")
            if p is not None and base_prefill:
                line += f". Prefill: {base_prefill / p:.2f}× vs eager fp32"
                if torchao_p is not None:
                    line += f", {torchao_p / p:.2f}× vs torchao ({p:.0f} vs {torchao_p:.0f} ms)"
            lines.append(line)
        codegen = results["params"].get("memsave_codegen")
        lines += ["", f"int4 scales chosen with `method={results['params'].get('int4_method')!r}` (same codes layout, "
                  "bytes and kernel as any other method, so the same speed). "
                  f"memsave configs ran with `codegen={codegen!r}`"
                  + (" (Inductor rejects the `aten._to_copy` casts that `compute_dtype` puts in the graph; see the "
                     "script's docstring)." if codegen == "fx" else ".")]
    return "\n".join(lines) + "\n"


BENCH = Benchmark(
    name="quant_speed",
    title="CPU speed of weight-only quantization, 1.1B decoder at batch 1: memsave int8/int4 vs eager, Inductor, torchao",
    configs=CONFIGS,
    baseline=BASELINE,
    measure=measure,
    metrics={
        "decode_ms": "lower",
        "prefill_ms": "lower",
        "decode_limit_ms": "lower",
        "weight_mib": "lower",
        "timed_rss_growth_mib": "lower",
    },
    params={
        "size": "1b",
        "quick_size": "medium",
        "prefill_len": 128,
        "decode_iters": 20,
        "prefill_iters": 3,
        "bandwidth_mib": 512,
        "memsave_codegen": "fx",
        "int4_method": "rtn",
    },
    repeats=3,
    plot=["decode_ms", "prefill_ms", "weight_mib"],
    timeout_s=3600.0,  # memsave's int4 MSE search over 1B weights alone takes minutes
    report=with_sections(extra_sections),
)


if __name__ == "__main__":
    main(BENCH)
