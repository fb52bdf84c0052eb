"""GPU benchmark: memsave's Triton quantized linear against a bf16 matmul and torchao int4.

Layers of a 7B-class model (N×K = 4096×4096, 11008×4096, 4096×11008), decode (M = 1 row)
and prefill (M = 128, 512 rows), weights int4 in groups of 128 (asymmetric) and int8 per
output channel (symmetric). Each kernel is timed with `triton.testing.do_bench` (median; it
clears L2 before every call, so the weights come from HBM as in a real decode step).

Bandwidth: the device's copy bandwidth is measured with a 1 GiB `copy_` timed by CUDA events
(bytes read + written per second). A decode kernel's achieved bandwidth is the bytes it must
move — packed codes + scales (+ offsets) + x + y — over its time; the goal for batch-1 int4
is ≥ 70 % of the copy bandwidth.

    python benchmarks/bench_triton_gpu.py                 # CUDA: writes docs/results/triton_gpu.md
    python benchmarks/bench_triton_gpu.py --rows 1,8,16   # other row counts
    python benchmarks/bench_triton_gpu.py --dry-run       # CPU, TRITON_INTERPRET=1, tiny shapes:
                                                          # checks the script, prints the table

Standalone (not on benchmarks/harness.py, whose fresh process per run and RSS metrics are for
CPU memory): GPU timings here are per-kernel medians inside one process.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "docs" / "results" / "triton_gpu.md"
GPU_SHAPES = ((4096, 4096), (11008, 4096), (4096, 11008))  # (N, K): attention / MLP up / MLP down
DRY_SHAPES = ((48, 64), (40, 200))
GOAL = 0.70  # int4 batch-1 bandwidth, as a fraction of copy bandwidth


@dataclass(frozen=True)
class Weights:
    label: str
    bits: int
    group: int | None  # None: per output channel
    symmetric: bool


WEIGHTS = (Weights("int4 g128 asym", 4, 128, False), Weights("int8 per-channel sym", 8, None, True))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="CPU under TRITON_INTERPRET=1 with tiny shapes")
    p.add_argument("--rows", default=None, help="comma-separated M values (default 1,128,512; dry run 1,20)")
    p.add_argument("--out", type=Path, default=None, help=f"markdown output (default {DEFAULT_OUT}; dry run: none)")
    return p.parse_args(argv)


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


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        # Set before memsave's kernel files are imported (@triton.jit reads it then).
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(
            "bench_triton_gpu: no CUDA device (torch.cuda.is_available() is False). This benchmark "
            "times GPU kernels; run it on a CUDA machine, or use --dry-run to check the script on CPU.",
            file=sys.stderr,
        )
        return 2
    import triton

    import memsave.ops  # noqa: F401  (memsave::linear_affine)
    from memsave.codegen.triton import launch, launcher
    from memsave.codegen.triton.spec import GEMV_MAX_ROWS, make_spec
    from memsave.ops.affine import dequantize_affine, quantize_weight

    dry = args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    rows = [int(r) for r in (args.rows or ("1,20" if dry else "1,128,512")).split(",")]
    shapes = DRY_SHAPES if dry else GPU_SHAPES
    timer = cpu_time_ms if dry else gpu_time_ms
    out_path = args.out if args.out is not None else (None if dry else DEFAULT_OUT)
    torch.manual_seed(0)

    copy_bw = copy_bandwidth(device, dry)
    device_name = "CPU (dry run, TRITON_INTERPRET=1)" if dry else torch.cuda.get_device_name()
    print(f"{device_name}: copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)

    results = []
    ao_notes = {}
    for n, k in shapes:
        w = torch.randn(n, k, device=device) * 0.02
        w_bf16 = w.to(torch.bfloat16)
        ao = None
        if not dry:
            ao, ao_notes[(n, k)] = torchao_int4(w_bf16, 128)
        for spec_w in WEIGHTS:
            group = spec_w.group or k
            packed, scale, offset = quantize_weight(w, spec_w.bits, group, spec_w.symmetric)
            for m in rows:
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)

                def run():
                    return launch(x, packed, scale, offset, None, spec_w.bits, group, k)

                y = run()  # first call: compiles and autotunes
                ref = torch.ops.memsave.linear_affine(x, packed, scale, offset, None, spec_w.bits, group, k)
                err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12)).item()
                t_triton = timer(run)
                variant = "gemv" if m <= GEMV_MAX_ROWS else "gemm"
                chosen = ""
                if not dry:
                    spec = make_spec(variant, spec_w.bits, group, k, spec_w.symmetric, False, x.dtype, False)
                    tuner = launcher._autotuned.get(spec)
                    chosen = str(getattr(tuner, "best_config", "") or "")
                w_deq = dequantize_affine(packed, scale, offset, spec_w.bits, group, k, torch.bfloat16)
                t_bf16 = timer(lambda: torch.nn.functional.linear(x, w_deq))
                t_ao = None
                if ao is not None and spec_w.bits == 4:
                    with torch.no_grad():
                        t_ao = timer(lambda: ao(x))
                moved = packed.nbytes + scale.nbytes + (offset.nbytes if offset is not None else 0)
                moved += x.nbytes + y.nbytes
                results.append(
                    dict(
                        weights=spec_w.label, m=m, n=n, k=k, variant=variant, triton_ms=t_triton, bf16_ms=t_bf16,
                        torchao_ms=t_ao, bandwidth=moved / (t_triton * 1e-3), error=err, config=chosen,
                        tflops=2 * m * n * k / (t_triton * 1e-3) / 1e12,
                    )
                )
                r = results[-1]
                print(
                    f"{spec_w.label:>22} M={m:<4} {n}x{k}: triton {t_triton * 1e3:8.1f} us  bf16 {t_bf16 * 1e3:8.1f} us"
                    + (f"  torchao {t_ao * 1e3:8.1f} us" if t_ao is not None else "")
                    + f"  {r['bandwidth'] / 1e9:7.0f} GB/s ({r['bandwidth'] / copy_bw:.0%} of copy)  err {err:.1e}",
                    flush=True,
                )
            del packed, scale, offset
        del w, w_bf16, ao
        if not dry:
            torch.cuda.empty_cache()

    text = report(results, copy_bw, device_name, ao_notes, dry, torch.__version__, triton.__version__)
    if out_path is None:
        print(text)
    else:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(text)
        print(f"wrote {out_path}")
    return 0


def _us(ms):
    return "–" if ms is None else f"{ms * 1e3:.1f}"


def report(results, copy_bw, device_name, ao_notes, dry, torch_version, triton_version) -> str:
    try:
        import importlib.metadata

        ao_version = importlib.metadata.version("torchao")
    except Exception:
        ao_version = "not installed"
    lines = [
        "# Triton quantized linear on GPU",
        "",
        f"- date: {datetime.date.today().isoformat()}",
        f"- device: {device_name}",
        f"- torch {torch_version}, triton {triton_version}, torchao {ao_version}",
        f"- copy bandwidth (1 GiB `copy_`, read + written): {copy_bw / 1e9:.0f} GB/s",
        "- times: `triton.testing.do_bench` medians (L2 cleared before each call); x in bf16",
        "- bandwidth: (packed codes + scales + offsets + x + y) bytes / Triton time",
        "",
    ]
    if dry:
        lines += ["**Dry run** (CPU, interpreter, tiny shapes): the numbers mean nothing.", ""]
    lines += [
        "| weights | M | N×K | kernel | Triton µs | bf16 µs | torchao int4 µs | vs bf16 | GB/s | of copy | TFLOP/s "
        "| rel. error | config |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['weights']} | {r['m']} | {r['n']}×{r['k']} | {r['variant']} | {_us(r['triton_ms'])} | "
            f"{_us(r['bf16_ms'])} | {_us(r['torchao_ms'])} | {r['bf16_ms'] / r['triton_ms']:.2f}× | "
            f"{r['bandwidth'] / 1e9:.0f} | {r['bandwidth'] / copy_bw:.0%} | {r['tflops']:.1f} | {r['error']:.1e} | "
            f"{r['config'].replace('|', '/')} |"
        )
    decode = [r for r in results if r["weights"].startswith("int4") and r["m"] == 1]
    if decode:
        fractions = [r["bandwidth"] / copy_bw for r in decode]
        verdict = "met" if min(fractions) >= GOAL else "not met"
        lines += [
            "",
            f"**Goal: int4 batch-1 bandwidth ≥ {GOAL:.0%} of copy bandwidth — {verdict}** "
            f"(per shape: {', '.join(f'{f:.0%}' for f in fractions)}).",
        ]
    if ao_notes:
        lines += ["", "torchao int4 (group 128): " + "; ".join(f"{n}×{k}: {v}" for (n, k), v in ao_notes.items())]
    lines += [
        "",
        "vs bf16 = bf16 time / Triton time (above 1: Triton faster). Relative error: max |Triton − "
        "memsave reference| / max |reference|. Config: the block sizes autotuning picked.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
