"""Memory as the operating system sees it: process RSS after compiling, and its peak while compiling.

Issue 13's question: a user watches the process in `top`, with glibc's default allocator
settings (no MALLOC_* variable: `Benchmark(default_allocator=True)`). One fresh process per
config and repeat; each

  1. imports, then warms up: compiles and calls a tiny model with the same options (so the
     modules and kernels a compile loads are not counted), and runs nothing else;
  2. reads RSS (/proc/self/statm): `base`;
  3. builds the model (MiniLM: loads it and copies its weights out of the package's memory-mapped
     file, `p.data = p.data.clone()`, so releasing them frees memory): `loaded`;
  4. (minilm-calibrated-*) runs `memsave.calibrate` on 128 other sentences, peak reset first;
  5. resets the peak (`echo 5 > /proc/self/clear_refs`), compiles and calls once (the compile
     happens in that call), reads VmHWM; calls again.

Metrics, as a share of the model's fp32 parameter bytes (`fp32_mib`):
  - kept_x: RSS after compile + 2 calls minus `base` (the model included: eager is ~1.0);
  - peak_x: VmHWM during compile + first call minus RSS before compiling (for eager: the calls);
  - held_x: memsave's own count of what it holds for the weights (`WEIGHTS.held_bytes`:
    originals not released + compressed forms), beside the RSS;
  - trimmed_x: kept_x after a `malloc_trim(0)` at the end (diagnostic: what of kept_x is free
    heap the process had not given back).
And in MiB: kept_mib, held_mib; calibrate_peak_mib / calibrate_kept_mib (RSS while / after
calibrating, above `loaded`), calibration_mib (the statistics alive after compiling).

Models: an HF LlamaForCausalLM built from a config (issue 13: hidden 2048, intermediate 5632,
4 layers, 16 heads, vocabulary 1024: 800 MiB of fp32 weights; --quick: hidden 512,
intermediate 1408, 50 MiB), batch 1, 8 tokens; the real all-MiniLM-L6-v2 (87 MiB fp32),
32 sentences of at most 64 tokens.

    python benchmarks/bench_process_memory.py            # every config, 3 repeats
    python benchmarks/bench_process_memory.py --quick    # small Llama, 5 configs, one repeat (~2 min)
    python benchmarks/bench_process_memory.py --configs int8,int8-fx --param hidden=1024

Writes docs/results/process_memory.{json,md,png}.
"""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import MiB, Benchmark, main, with_sections  # noqa: E402

LLAMA = {
    "eager": None,
    "int8": {"quantize": "int8"},
    "int4": {"quantize": "int4"},
    "int8-fx": {"quantize": "int8", "codegen": "fx"},
    "int4-fx": {"quantize": "int4", "codegen": "fx"},
    "structured50": {"prune": {"structure": "structured", "sparsity": 0.5}},
}
MINILM = {
    "minilm-eager": None,
    "minilm-int8-emb": {"quantize": {"bits": 8, "embeddings": True}},
    "minilm-int8-emb-fx": {"quantize": {"bits": 8, "embeddings": True}, "codegen": "fx"},
    "minilm-calibrated-int8-emb": {"quantize": {"bits": 8, "embeddings": True}},
}
CONFIGS = list(LLAMA) + list(MINILM)
# --quick without --configs: the ones issue 13 sets targets for, FX beside Inductor, and MiniLM.
QUICK_CONFIGS = ["eager", "int8", "int4", "int8-fx", "minilm-int8-emb"]
# Issue 13's targets (default codegen, default allocator), as shares of the fp32 weight bytes.
TARGETS = {"int8": {"kept_x": 0.35, "peak_x": 0.5}, "int4": {"kept_x": 0.22, "peak_x": 0.5}}


def _rss() -> int:
    from memsave.memory.process import rss_bytes

    return rss_bytes()


def _llama(params: dict, hidden: int, intermediate: int, layers: int, heads: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from memsave.models.hf import HFCausalLM

    config = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=heads, vocab_size=params["vocab"], max_position_embeddings=256, use_cache=False,
        attn_implementation="eager", rms_norm_eps=1e-5,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return HFCausalLM(LlamaForCausalLM(config)).eval()


def _minilm():
    from memsave.models.minilm import load_minilm

    model, tokenizer = load_minilm()
    for t in list(model.parameters()) + list(model.buffers()):
        t.data = t.data.clone()  # out of the package's memory-mapped file: releasable, and counted
    return model, tokenizer


def measure(config: str, params: dict) -> dict[str, float]:
    import torch

    import memsave
    from memsave.calibrate import CALIBRATION
    from memsave.memory.process import give_back, peak_rss_bytes, reset_peak_rss
    from memsave.weights import WEIGHTS

    torch.manual_seed(0)
    quick = bool(params.get("quick"))
    minilm = config.startswith("minilm")
    options = (MINILM if minilm else LLAMA)[config]

    def compile_(model):
        return model if options is None else torch.compile(model, backend="memsave", options=dict(options))

    # 1. Warm-up: the same options on a tiny model of the same kind.
    if minilm:
        from memsave.models.minilm import minilm_inputs, reference_sentences

        sentences = reference_sentences(32 + 128)
        warm, tokenizer = _minilm()
        inputs = minilm_inputs(tokenizer, sentences[:32], 64)
        warm_inputs = minilm_inputs(tokenizer, sentences[:2], 16)
    else:
        warm = _llama(params, 64, 176, 1, 4)
        warm_inputs = inputs = (torch.randint(0, params["vocab"], (1, params["tokens"])),)
    with torch.no_grad():
        warm_compiled = compile_(warm)
        warm_compiled(*warm_inputs)
        warm_compiled(*warm_inputs)
    del warm, warm_compiled
    torch._dynamo.reset()
    gc.collect()

    # 2-3. The model.
    base = _rss()
    if minilm:
        model, _ = _minilm()
    elif quick:
        model = _llama(params, 512, 1408, params["layers"], params["heads"])
    else:
        model = _llama(params, params["hidden"], params["intermediate"], params["layers"], params["heads"])
    weights = list(model.parameters()) + list(model.buffers())
    fp32 = sum(p.numel() * p.element_size() for p in model.parameters())
    loaded = _rss()
    out: dict[str, float] = {"fp32_mib": fp32 / MiB, "loaded_x": (loaded - base) / fp32}

    # 4. Calibration.
    if config == "minilm-calibrated-int8-emb":
        from memsave.models.minilm import minilm_inputs

        ids, mask = minilm_inputs(tokenizer, sentences[32:], 64)
        batches = [(ids[i : i + 16], mask[i : i + 16]) for i in range(0, len(ids), 16)]
        reset_peak_rss()
        start = time.perf_counter()
        memsave.calibrate(model, batches, progress=False)
        out["calibrate_s"] = time.perf_counter() - start
        out["calibrate_peak_mib"] = (peak_rss_bytes() - loaded) / MiB
        out["calibrate_kept_mib"] = (_rss() - loaded) / MiB

    # 5. Compile + call, call.
    before = _rss()
    reset_peak_rss()
    start = time.perf_counter()
    compiled = compile_(model)
    with torch.no_grad():
        compiled(*inputs)
    out["compile_and_call_s"] = time.perf_counter() - start
    out["peak_x"] = (peak_rss_bytes() - before) / fp32
    with torch.no_grad():
        compiled(*inputs)
    gc.collect()
    kept = _rss() - base
    held = WEIGHTS.held_bytes(weights) if options is not None else sum(
        {w.untyped_storage().data_ptr(): w.untyped_storage().nbytes() for w in weights}.values()
    )
    stats: dict[int, int] = {}
    for w in list(CALIBRATION.keys()):
        s = CALIBRATION[w]
        for t in (s.mean_abs, s.sample, s.gram, s.sq_mean):
            if t is not None:
                stats[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    out.update(
        kept_x=kept / fp32, kept_mib=kept / MiB, held_x=held / fp32, held_mib=held / MiB,
        calibration_mib=sum(stats.values()) / MiB,
    )
    from memsave.memory.process import TRIMS

    out.update(trims=TRIMS["calls"], trim_s=TRIMS["seconds"])  # what giving memory back cost (whole process)
    give_back()
    out["trimmed_x"] = (_rss() - base) / fp32
    return out


def extra_sections(results: dict) -> str:
    """The targets, and the MiB columns, under the harness's table."""
    summary = results["summary"]

    def median(config, metric):
        stat = summary.get(config, {}).get("metrics", {}).get(metric)
        if stat is not None:
            return stat["median"]
        values = [r["metrics"][metric] for r in results["runs"] if r["config"] == config and r["ok"] and metric in r["metrics"]]
        return sorted(values)[len(values) // 2] if values else None

    lines = ["", "## Against issue 13's targets (default codegen, default allocator)", "",
             "| config | metric | measured | target | met |", "|---|---|---:|---:|---|"]
    for config, targets in TARGETS.items():
        for metric, target in targets.items():
            value = median(config, metric)
            if value is not None:
                lines.append(f"| {config} | {metric} | {value:.3f} | ≤ {target} | {'yes' if value <= target else 'NO'} |")
    lines += ["", "## In MiB", "", "| config | fp32 weights | RSS kept | memsave holds | calibrate: peak / kept / alive after compile |",
              "|---|---:|---:|---:|---|"]
    for config in results["configs"]:
        fp32, kept, held = (median(config, m) for m in ("fp32_mib", "kept_mib", "held_mib"))
        if fp32 is None:
            continue
        cal = median(config, "calibrate_peak_mib")
        cal_text = (f"{cal:.1f} / {median(config, 'calibrate_kept_mib'):.1f} / {median(config, 'calibration_mib'):.1f}"
                    if cal is not None else "–")
        lines.append(f"| {config} | {fp32:.1f} | {kept:.1f} | {held:.1f} | {cal_text} |")
    lines += [
        "",
        "kept_x counts the model too (eager ≈ 1.0 plus the calls' buffers); peak_x is above the loaded model. "
        "A compile also loads code (Inductor's generated modules, C kernels): a fixed cost of some 15-25 MiB "
        "per model here, a larger share of the small --quick model than of the issue's.",
    ]
    return "\n".join(lines) + "\n"


BENCH = Benchmark(
    name="process_memory",
    title="Process RSS after compiling and its peak while compiling, glibc's default allocator (HF Llama, real MiniLM)",
    configs=CONFIGS,
    baseline="eager",
    measure=measure,
    metrics={"kept_x": "lower", "peak_x": "lower", "held_x": "lower", "trimmed_x": "lower"},
    params={"hidden": 2048, "intermediate": 5632, "layers": 4, "heads": 16, "vocab": 1024, "tokens": 8},
    repeats=3,
    plot=["kept_x", "peak_x"],
    timeout_s=1200.0,
    default_allocator=True,
    quick_configs=QUICK_CONFIGS,
    report=with_sections(extra_sections),
)


if __name__ == "__main__":
    main(BENCH)
