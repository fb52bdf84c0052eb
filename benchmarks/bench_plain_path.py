"""The plain path as a user measures it: each short option name from the README, as typed, on an
HF Llama, against eager fp32 and torchao; step time and the process's RSS.

Model: `transformers.LlamaForCausalLM` from a config (hidden 2048, intermediate 5632, 4 layers,
16 heads, vocabulary 1024: 210M parameters, 800 MiB of fp32 weights; `--quick`: hidden 512,
2 layers). Per run (a fresh process, all cores, default glibc allocator settings: no MALLOC_*
variables, so RSS is what a user's `top` shows):

  1. warm-up: a tiny HF Llama prepared exactly as the config prepares the measured one and
     called (imports — transformers' among them — and Dynamo's, Inductor's and memsave's
     one-time setup are then not counted); RSS0 = RSS now;
  2. the model is built (fp32, eval), then prepared as the config says, and called twice on
     the one-token input: `rss_kept` = (RSS after that − RSS0) / fp32 weight bytes, the
     process's growth for holding the (compressed) model; `compile_peak` = (peak RSS during
     the first call − RSS before it) / fp32 weight bytes (the compile's transient);
     `held_mib`: memsave's own count of the bytes its weights hold (WEIGHTS.held_bytes: the
     compressed forms plus any originals still alive);
  3. timing: one-token step (input (1, 1), no KV cache: every weight read once) and a 128-token
     prefill, `use_cache=False`, medians of 15 and 3 calls after warm-up; each shape is its
     own static graph (dynamic=False), compiled outside the timing;
  4. bandwidth, last (its 512 MiB buffers would change glibc's mmap threshold for everything
     after them): `dst.copy_(src)` of 512 MiB fp32, (bytes read + written) / time, median of 10.

Configs: `eager-fp32` (the baseline), `torchao-int8wo` (model.to(bfloat16), torchao
`quantize_(model, Int8WeightOnlyConfig())`, torch.compile: what a user would use today),
and memsave with exactly the README's option names, default codegen (Inductor):

  int8, int4 (g64, GPTQ → MSE without calibration), int4-g32/-g128/-g256, int4-exact
  ({"bits": 4, "group_size": 64, ..., "compute_dtype": "float32"}: exact fp32 activations),
  int3, int2, w8a8, log4, vq4, vq2, prune 2:4 / 4:8 / unstructured-50 / structured-50,
  factorize svd-50.

Goals (issue 13): int8 ≥ 1.0× torchao's speed, int4 ≥ 1.3× torchao's; every other config
≥ 1.0× eager fp32 at the one-token step and ≥ 0.9× at the prefill; RSS kept ≤ 0.35 (int8),
≤ 0.22 (int4) of the fp32 weight bytes; compile peak ≤ 0.5. The weight-streaming limit of a
step = weight bytes read per step (held bytes minus the embedding table) / copy bandwidth.

    python benchmarks/bench_plain_path.py                 # 3 repeats, ~1.5 h on 2 cores
    python benchmarks/bench_plain_path.py --quick         # small model, 1 repeat: a smoke test
    python benchmarks/bench_plain_path.py --configs int8,int4,torchao-int8wo
    python benchmarks/bench_plain_path.py --redraw        # md + png again from the JSON

Writes docs/results/plain_path{,_quick}.{json,md,png}.
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Benchmark, MiB, main, time_call, with_sections
from benchmarks.harness import run_median as _median  # noqa: E402

BASELINE = "eager-fp32"
TORCHAO = "torchao-int8wo"
GB = 1e9
# config name -> options exactly as a user types them from the README
MEMSAVE = {
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4"},
    "int4-g32": {"quantize": "int4-g32"},
    "int4-g128": {"quantize": "int4-g128"},
    "int4-g256": {"quantize": "int4-g256"},
    "int4-exact": {"quantize": {"bits": 4, "group_size": 64, "symmetric": False, "method": "gptq", "compute_dtype": "float32"}},
    "int3": {"quantize": "int3"},
    "int2": {"quantize": "int2"},
    "w8a8": {"quantize": "w8a8"},
    "log4": {"quantize": "log4"},
    "vq4": {"quantize": "vq4"},
    "vq2": {"quantize": "vq2"},
    "prune-2of4": {"prune": "2:4"},
    "prune-4of8": {"prune": "4:8"},
    "unstructured-50": {"prune": "unstructured-50"},
    "structured-50": {"prune": "structured-50"},
    "svd-50": {"factorize": "svd-50"},
}
CONFIGS = [BASELINE, TORCHAO, *MEMSAVE]
SPEED_GOALS = {"int8": (TORCHAO, 1.0), "int4": (TORCHAO, 1.3)}  # config -> (versus, at least)
RSS_GOALS = {"int8": 0.35, "int4": 0.22}
COMPILE_PEAK_GOAL = 0.5
SIZES = {
    "full": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 4},
    "quick": {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 2},
    "tiny": {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1},  # the warm-up
}


def build_llama(size: str):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **SIZES[size], num_attention_heads=16, num_key_value_heads=16, vocab_size=1024,
        max_position_embeddings=512, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def _bandwidth_gbps(mib: int) -> float:
    import torch

    n = mib * MiB // 4
    src, dst = torch.ones(n), torch.zeros(n)
    ms = statistics.median(time_call(lambda: dst.copy_(src), warmup=2, iters=10))
    return 2 * n * 4 / (ms / 1e3) / GB


def _warm_up(config: str) -> None:
    """Prepare a tiny HF Llama exactly as `config` prepares the measured one and call it, so the
    imports (transformers', torchao's for its config) and Dynamo's,
    Inductor's and memsave's one-time setup are in RSS0, not in the measured growth."""
    import torch

    tiny = build_llama("tiny")
    with torch.no_grad():
        _prepare(config, tiny)(torch.randint(0, 1024, (1, 1)), use_cache=False)
    del tiny
    torch._dynamo.reset()
    gc.collect()


def _prepare(config: str, model):
    import torch

    if config == BASELINE:
        return model
    if config == TORCHAO:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        model.to(torch.bfloat16)
        quantize_(model, Int8WeightOnlyConfig())
        return torch.compile(model, dynamic=False)
    return torch.compile(model, backend="memsave", options=MEMSAVE[config], dynamic=False)


def measure(config: str, params: dict) -> dict[str, float]:
    import torch

    import memsave
    from memsave.memory.process import peak_rss_bytes, reset_peak_rss, rss_bytes
    from memsave.weights import WEIGHTS

    quick = bool(params.get("quick"))
    out: dict[str, float] = {"threads": float(torch.get_num_threads())}
    _warm_up(config)
    rss0 = rss_bytes()

    model = build_llama("quick" if quick else "full")
    weights = list(model.parameters())
    fp32 = sum(p.numel() * p.element_size() for p in weights)
    out["params_m"] = sum(p.numel() for p in weights) / 1e6
    out["fp32_weight_mib"] = fp32 / MiB
    out["model_rss_mib"] = (rss_bytes() - rss0) / MiB
    step_ids = torch.randint(0, 1024, (1, 1), generator=torch.Generator().manual_seed(1))
    prefill_ids = torch.randint(0, 1024, (1, params["prefill_len"]), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        reference = model(step_ids, use_cache=False).logits.float()
        run = _prepare(config, model)
        before = rss_bytes()
        reset_peak_rss()
        with memsave.collect() as reports:
            t0 = time.perf_counter()
            first = run(step_ids, use_cache=False).logits
            out["first_call_s"] = time.perf_counter() - t0
        out["compile_peak"] = (peak_rss_bytes() - before) / fp32
        run(step_ids, use_cache=False)
        out["rss_kept"] = (rss_bytes() - rss0) / fp32
        out["held_mib"] = WEIGHTS.held_bytes(weights) / MiB if config in MEMSAVE else _storage_bytes(model) / MiB
        out["cosine_vs_fp32"] = torch.nn.functional.cosine_similarity(
            first.double().flatten(), reference.double().flatten(), dim=0
        ).item()
        del first, reference
        kernels: dict[str, int] = {}
        for report in reports:
            for record in report.records:
                if record.name == "select_kernels":
                    for name, count in record.details.get("kernels", {}).items():
                        kernels[name] = kernels.get(name, 0) + count
        for name, count in kernels.items():
            out[f"kernel_{name}"] = float(count)
        # Streamed per step: what the model holds minus the embedding table (one row is read).
        embed = model.get_input_embeddings().weight
        embed_bytes = embed.numel() * embed.element_size() if embed.untyped_storage().nbytes() else 0
        graph_constants = _storage_bytes(None, [t for r in reports for t in r.constant_tensors()])
        held = out["held_mib"] * MiB if config in MEMSAVE else _storage_bytes(model)
        out["streamed_mib"] = (max(held, graph_constants) - embed_bytes) / MiB

        steps = time_call(lambda: run(step_ids, use_cache=False), warmup=3, iters=5 if quick else params["step_iters"])
        prefills = time_call(lambda: run(prefill_ids, use_cache=False), warmup=1, iters=2 if quick else params["prefill_iters"])
    # Bandwidth last: its 512 MiB buffers would raise glibc's mmap threshold (to 32 MiB) for
    # everything after them, and the RSS above is meant to be what a user's process shows.
    del run, model, reports
    out["copy_gbps"] = _bandwidth_gbps(params["bandwidth_mib"])
    out["step_limit_ms"] = out["streamed_mib"] * MiB / (out["copy_gbps"] * GB) * 1e3
    out["step_ms"] = statistics.median(steps)
    out["step_min_ms"] = min(steps)
    out["prefill_ms"] = statistics.median(prefills)
    out["limit_share"] = out["step_limit_ms"] / out["step_ms"]
    return out


def _storage_bytes(model, tensors=None) -> int:
    """Bytes of the unique storages behind a model's parameters and buffers (or `tensors`),
    looking inside tensor subclasses (torchao's quantized weights)."""
    import torch

    seen: dict[int, int] = {}

    def visit(t):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            for name in t.__tensor_flatten__()[0]:
                visit(getattr(t, name))
            return
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()

    for t in tensors if tensors is not None else [*model.parameters(), *model.buffers()]:
        visit(t)
    return sum(seen.values())


# ----------------------------------------------------------------------------- report



def _fmt(v: float | None, spec: str = "{:.2f}") -> str:
    return "–" if v is None else spec.format(v)


def _met(flag: bool) -> str:
    return "met" if flag else "**not met**"


def extra_sections(results: dict) -> str:
    eager_step, eager_prefill = _median(results, BASELINE, "step_ms"), _median(results, BASELINE, "prefill_ms")
    ao_step, ao_prefill = _median(results, TORCHAO, "step_ms"), _median(results, TORCHAO, "prefill_ms")
    ran = [c for c in results["configs"] if _median(results, c, "step_ms") is not None]
    lines = [
        "", "## Against eager fp32 and torchao (speed: > 1 is faster)", "",
        "Speed = baseline median time / config median time, both from this run. Limit share = the "
        "weight-streaming limit (bytes read per step / measured copy bandwidth) / the measured step time. "
        "RSS kept and compile peak are shares of the fp32 weight bytes (default allocator).", "",
        "| config | step ms | vs eager | vs torchao | prefill ms | vs eager | vs torchao | limit share "
        "| RSS kept | compile peak | held MiB | cosine vs fp32 | kernels |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for c in ran:
        s, p = _median(results, c, "step_ms"), _median(results, c, "prefill_ms")
        kernels = sorted({m[7:] for r in results["runs"] if r["config"] == c and r["ok"] for m in r["metrics"] if m.startswith("kernel_")})
        lines.append(
            f"| {c} | {_fmt(s, '{:.1f}')} | {_fmt(eager_step / s if eager_step and s else None)}× | "
            f"{_fmt(ao_step / s if ao_step and s else None)}× | {_fmt(p, '{:.0f}')} | "
            f"{_fmt(eager_prefill / p if eager_prefill and p else None)}× | {_fmt(ao_prefill / p if ao_prefill and p else None)}× | "
            f"{_fmt(_median(results, c, 'limit_share'), '{:.0%}')} | {_fmt(_median(results, c, 'rss_kept'))} | "
            f"{_fmt(_median(results, c, 'compile_peak'))} | {_fmt(_median(results, c, 'held_mib'), '{:.0f}')} | "
            f"{_fmt(_median(results, c, 'cosine_vs_fp32'), '{:.5f}')} | "
            + ", ".join(f"{k} ×{_median(results, c, 'kernel_' + k):.0f}" for k in kernels) + " |"
        )
    lines += ["", "## Goals", ""]
    for c, (versus, goal) in SPEED_GOALS.items():
        s, v = _median(results, c, "step_ms"), _median(results, versus, "step_ms")
        p, vp = _median(results, c, "prefill_ms"), _median(results, versus, "prefill_ms")
        if s and v:
            lines.append(f"- `{c}` step {v / s:.2f}× `{versus}`'s speed (goal ≥ {goal}): {_met(v / s >= goal)}"
                         + (f"; prefill {vp / p:.2f}× ({_met(vp / p >= goal)})" if p and vp else ""))
    others = [c for c in ran if c in MEMSAVE and c not in SPEED_GOALS]
    for c in others:
        s, p = _median(results, c, "step_ms"), _median(results, c, "prefill_ms")
        if s and eager_step:
            lines.append(f"- `{c}`: step {eager_step / s:.2f}× eager (≥ 1.0: {_met(eager_step / s >= 1.0)})"
                         + (f", prefill {eager_prefill / p:.2f}× (≥ 0.9: {_met(eager_prefill / p >= 0.9)})" if p and eager_prefill else ""))
    for c, goal in RSS_GOALS.items():
        kept = _median(results, c, "rss_kept")
        if kept is not None:
            lines.append(f"- `{c}` RSS kept {kept:.2f} of the fp32 weight bytes (≤ {goal}): {_met(kept <= goal)}")
    peaks = {c: _median(results, c, "compile_peak") for c in ran if c in MEMSAVE}
    worst = max((v, c) for c, v in peaks.items() if v is not None) if any(v is not None for v in peaks.values()) else None
    if worst:
        lines.append(f"- compile peak ≤ {COMPILE_PEAK_GOAL} for every memsave config: worst `{worst[1]}` {worst[0]:.2f} "
                     f"({_met(worst[0] <= COMPILE_PEAK_GOAL)})")
    copy = [r["metrics"]["copy_gbps"] for r in results["runs"] if r["ok"] and "copy_gbps" in r["metrics"]]
    if copy:
        lines += ["", f"Copy bandwidth over the runs: median {statistics.median(copy):.1f} GB/s "
                  f"(min {min(copy):.1f}, max {max(copy):.1f})."]
    return "\n".join(lines) + "\n"


BENCH = Benchmark(
    name="plain_path",
    title="The plain path: README short names on an HF Llama (210M, fp32), step time and process RSS, default allocator",
    configs=CONFIGS,
    baseline=BASELINE,
    measure=measure,
    metrics={"step_ms": "lower", "prefill_ms": "lower", "rss_kept": "lower", "compile_peak": "lower", "held_mib": "lower"},
    params={"prefill_len": 128, "step_iters": 15, "prefill_iters": 3, "bandwidth_mib": 512},
    repeats=3,
    plot=["step_ms", "prefill_ms", "rss_kept"],
    timeout_s=3600.0,
    default_allocator=True,
    report=with_sections(extra_sections),
)


if __name__ == "__main__":
    main(BENCH)
