"""GPU benchmark: memsave's Triton quantized linear against a bf16 matmul and torchao int4.

Layers of a 7B-class model (N×K = 4096×4096, 11008×4096, 4096×11008), decode (M = 1 row)
and prefill (M = 128, 512 rows), weights int4 in groups of 128 (asymmetric) and int8 per
output channel (symmetric). Each kernel is timed with `triton.testing.do_bench` (median; it
clears L2 before every call, so the weights come from HBM as in a real decode step).

Configs `<form>.m<rows>`, one fresh process each (benchmarks/harness.py), in parts by row
count: `bf16` (x @ the dequantized bf16 weight: the baseline of its part), `int4-g128` and
`int8` (memsave's Triton kernel), `torchao-int4-g128` (torchao's int4 weight-only linear).
Per shape: `us_<N>x<K>` (median µs) and, for memsave's kernels, `copy_share_<N>x<K>`: the bytes
the kernel must move (packed codes + scales (+ offsets), or the bf16 weight, + x + y) over its time, as a share of
the device's copy bandwidth (a 1 GiB `copy_` timed by CUDA events, bytes read + written). The
goal for batch-1 int4 is ≥ 70 % of the copy bandwidth.

    python benchmarks/bench_triton_gpu.py             # CUDA -> docs/results/triton_gpu.*
    python benchmarks/bench_triton_gpu.py --quick     # CPU, TRITON_INTERPRET=1, tiny shapes: checks
                                                      # the script (the numbers mean nothing)
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Benchmark, Part, main, with_sections  # noqa: E402

NAME = "triton_gpu"
TITLE = "Triton quantized linear on GPU: memsave int4/int8 vs bf16 matmul and torchao int4"
GPU_SHAPES = "4096x4096,11008x4096,4096x11008"  # (N, K): attention / MLP up / MLP down
DRY_SHAPES = "48x64,40x200"
ROWS = (1, 128, 512)
GOAL = 0.70  # int4 batch-1 bandwidth, as a fraction of copy bandwidth


@dataclass(frozen=True)
class Weights:
    bits: int
    group: int | None  # None: per output channel
    symmetric: bool


FORMS = {"int4-g128": Weights(4, 128, False), "int8": Weights(8, None, True)}
CONFIGS = [f"{form}.m{m}" for m in ROWS for form in ("bf16", *FORMS, "torchao-int4-g128")]
PARAMS = {"shapes": GPU_SHAPES, "dry": False}
QUICK = {"shapes": DRY_SHAPES, "dry": True}
QUICK_CONFIGS = [c for c in CONFIGS if not c.startswith("torchao") and c.endswith((".m1", ".m128"))]


def _shapes(params: dict) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in params["shapes"].split(",")]


# --------------------------------------------------------------------------- timing


def gpu_time_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def cpu_time_ms(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth(device, dry: bool) -> float:
    """Bytes read + written per second by a large device copy (median of repeats)."""
    import torch

    nbytes = (64 << 20) if dry else (1 << 30)
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    if dry:
        ms = cpu_time_ms(lambda: dst.copy_(src))
    else:
        for _ in range(3):
            dst.copy_(src)
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        ms = statistics.median(times)
    del src, dst
    return 2 * nbytes / (ms * 1e-3)


# --------------------------------------------------------------------------- baselines


def torchao_int4(w_bf16, group_size: int):
    """A bf16 nn.Linear quantized by torchao's int4 weight-only config, or (None, reason)."""
    import torch

    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except Exception as e:  # not installed, or an import error in this torch
        return None, f"torchao not importable ({type(e).__name__})"
    n, k = w_bf16.shape
    # Newer torchao: version 2, whose default "plain" format needs fbgemm; tinygemm is
    # "tile_packed_to_4d". Older torchao: version 1 is tinygemm. Take the first that runs.
    attempts = (
        ("tile_packed_to_4d", dict(int4_packing_format="tile_packed_to_4d")),
        ("version 1", dict(version=1)),
        ("default", {}),
    )
    errors = []
    for name, kwargs in attempts:
        try:
            lin = torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16, device=w_bf16.device)
            with torch.no_grad():
                lin.weight.copy_(w_bf16)
            quantize_(lin, Int4WeightOnlyConfig(group_size=group_size, **kwargs))
            with torch.no_grad():
                lin(torch.randn(1, k, dtype=torch.bfloat16, device=w_bf16.device))
            return lin, name
        except Exception as e:
            errors.append(f"{name}: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}")
    return None, "torchao int4 failed (" + "; ".join(errors) + ")"


def measure(config: str, params: dict) -> dict[str, float]:
    form, rows = config.rsplit(".m", 1)
    m, dry = int(rows), bool(params["dry"])
    if dry:  # before memsave's kernel files are imported: @triton.jit reads it then
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not dry and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device (torch.cuda.is_available() is False): this benchmark times GPU "
                           "kernels; run it on a CUDA machine, or --quick to check the script on CPU")
    import memsave.ops  # noqa: F401  (memsave::linear_affine)
    from memsave.codegen.triton import launch, launcher
    from memsave.codegen.triton.spec import GEMV_MAX_ROWS, make_spec
    from memsave.ops.affine import quantize_weight

    device = torch.device("cpu" if dry else "cuda")
    timer = cpu_time_ms if dry else gpu_time_ms
    torch.manual_seed(0)
    copy_bw = copy_bandwidth(device, dry)
    out = {"copy_gbps": copy_bw / 1e9}
    for n, k in _shapes(params):
        shape = f"{n}x{k}"
        w = torch.randn(n, k, device=device) * 0.02
        x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
        if form == "bf16":
            w_bf16 = w.to(torch.bfloat16)
            t = timer(lambda: torch.nn.functional.linear(x, w_bf16))
            out[f"us_{shape}"] = t * 1e3
            out[f"copy_share_{shape}"] = (w_bf16.nbytes + x.nbytes + m * n * 2) / (t * 1e-3) / copy_bw
        elif form == "torchao-int4-g128":
            ao, how = torchao_int4(w.to(torch.bfloat16), 128)
            if ao is None:
                raise RuntimeError(how)
            with torch.no_grad():
                out[f"us_{shape}"] = timer(lambda: ao(x)) * 1e3
        else:
            spec_w = FORMS[form]
            group = spec_w.group or k
            packed, scale, offset = quantize_weight(w, spec_w.bits, group, spec_w.symmetric)

            def run():
                return launch(x, packed, scale, offset, None, spec_w.bits, group, k)

            y = run()  # first call: compiles and autotunes
            ref = torch.ops.memsave.linear_affine(x, packed, scale, offset, None, spec_w.bits, group, k)
            out[f"err_{shape}"] = ((y.float() - ref.float()).abs().max()
                                   / ref.float().abs().max().clamp_min(1e-12)).item()
            t = timer(run)
            moved = packed.nbytes + scale.nbytes + (offset.nbytes if offset is not None else 0) + x.nbytes + y.nbytes
            out[f"us_{shape}"] = t * 1e3
            out[f"copy_share_{shape}"] = moved / (t * 1e-3) / copy_bw
            out[f"tflops_{shape}"] = 2 * m * n * k / (t * 1e-3) / 1e12
            if not dry:
                variant = "gemv" if m <= GEMV_MAX_ROWS else "gemm"
                spec = make_spec(variant, spec_w.bits, group, k, spec_w.symmetric, False, x.dtype, False)
                tuner = launcher._autotuned.get(spec)
                print(f"{config} {shape}: autotuned {getattr(tuner, 'best_config', '')}", file=sys.stderr)
        del w, x
        if not dry:
            torch.cuda.empty_cache()
    return out


def _parts(params: dict) -> dict[str, Part]:
    """Per row count: every form against the bf16 matmul of the same rows."""
    shapes = [f"{n}x{k}" for n, k in _shapes(params)]
    metrics = {f"us_{s}": "lower" for s in shapes} | {f"copy_share_{s}": "higher" for s in shapes}
    return {f"m{m}": Part([c for c in CONFIGS if c.endswith(f".m{m}")], f"bf16.m{m}", metrics=metrics) for m in ROWS}


def goal_section(results: dict) -> str:
    lines = ["", "## Goal", ""]
    if results["params"].get("dry"):
        lines += ["**Dry run** (CPU, TRITON_INTERPRET=1, tiny shapes): the numbers mean nothing.", ""]
    fractions = {m.removeprefix("copy_share_"): s["median"] for m, s in
                 results["summary"].get("int4-g128.m1", {}).get("metrics", {}).items() if m.startswith("copy_share_")}
    if fractions:
        verdict = "met" if min(fractions.values()) >= GOAL else "NOT met"
        lines.append(f"int4 batch-1 bandwidth ≥ {GOAL:.0%} of copy bandwidth: **{verdict}** (per shape: "
                     + ", ".join(f"{s} {f:.0%}" for s, f in fractions.items()) + ").")
    copy = [r["metrics"]["copy_gbps"] for r in results["runs"] if r["ok"]]
    if copy:
        lines.append(f"Copy bandwidth over the runs: median {statistics.median(copy):.0f} GB/s.")
    lines += ["", "us: `triton.testing.do_bench` median µs (L2 cleared before each call), x in bf16. "
              "Ratios: time / the bf16 matmul's at the same rows (below 1: faster). copy_share: bytes the kernel must "
              "move / its time / copy bandwidth. The JSON has each kernel's relative error vs memsave's reference "
              "(err_*), its TFLOP/s, and the stderr of each run names the block sizes autotuning picked.", ""]
    return "\n".join(lines)


BENCH = Benchmark(name=NAME, title=TITLE, configs=CONFIGS, baseline="bf16.m1", measure=measure,
                  metrics={"copy_gbps": "higher"}, params=PARAMS, quick=QUICK, quick_configs=QUICK_CONFIGS,
                  repeats=3, timeout_s=900.0, parts=_parts, report=with_sections(goal_section))


if __name__ == "__main__":
    main(BENCH)
