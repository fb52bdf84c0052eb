"""A quantized static KV cache under torch.compile: memory held, decode speed, fidelity.

One fresh process per config and repeat, the C allocator as a user's process has it.

- **memory** (parts `1k`, `4k`, `16k`): an HF Llama shaped like the docs LM (4 layers, hidden
  256, 4 query / 2 key-value heads of size 64, random weights, seeded) where the cache
  dominates; the cache sized for n tokens and filled with n tokens (prefill in chunks of 1024),
  then 16 decode steps. Caches:
    fp32, bf16        HF's StaticCache (bf16: the model in bf16), forward compiled by memsave
    fp32_inductor     HF's StaticCache, forward compiled by Inductor alone (torch.compile's default)
    int8, int4, kivi2 memsave.QuantizedStaticCache(scheme=...), forward compiled by memsave
    hf_quanto_int4/2  HF's QuantizedCache (quanto backend, its defaults: q_group_size 64,
                      residual 128 tokens in full precision), eager (it does not compile)
  Per run: the cache's bytes as memsave counts them (`memsave.cache_bytes`; HF's quantized
  cache: none), the live tensor bytes the fill left allocated (tracker; on a third cache, since
  the tracker's profiler records are process memory too), the process's RSS
  growth over the fill (after a warm-up of the same schedule on another cache of the same shape,
  kept alive, so that compiling is not counted and the measured buffers are new memory; the C
  heap trimmed before, so no freed page is reused without showing), the median decode step time and one decode step's tracked peak, and the
  first 1024-token chunk's time (first-token time).
- **fidelity**: the docs LM (`memsave lm`, the small causal LM trained here, SDPA attention) on
  held-out text: perplexity of tokens 65-256 of 8 windows of 256 bytes, each predicted through
  the cache (64 tokens prefilled, then one token at a time, teacher-forced), and greedy-token
  agreement over 128 tokens generated after 64-token prompts (4 prompts) against the fp32 cache
  in the same process. memsave's caches compiled (backend="memsave", default options); kv_int8 /
  kv_int4 / kv_kivi2: HF's StaticCache with `options={"kv_cache": ...}` (its prefill attends to the
  prompt's own states, later tokens read the codes); HF's
  quantized caches eager, with their default 128 full-precision recent tokens and with 32
  (`_r32`: about memsave's window, which holds the newest key group's 0-31 tokens; the docs
  LM's 256-token context leaves HF's default residual most of every window in full precision).

- **generate**: what a user runs, `model.generate(ids, cache_implementation="static",
  max_new_tokens=32)` after a 4096-token prompt, HF making the cache, on the memory part's model:
  the forward compiled by Inductor alone (baseline), by memsave with default options (fp32 cache)
  and by memsave with `options={"kv_cache": "int8" | "int4" | "kivi2"}` and nothing else. Per run
  (two warm-up generates first): the cache's bytes, the tracked peak of one whole generate, the
  process's RSS growth over a generate whose output (and cache) is kept, its peak, and the growth
  after `malloc_trim` (the cache and what the process cannot give back), first-token time (best of
  two one-token generates) and the decode time per token.

    python benchmarks/bench_kv_cache.py            # all parts
    python benchmarks/bench_kv_cache.py --quick    # 1k only, fewer windows
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import (
    Benchmark,
    MiB,
    Part,
    current_rss_bytes,
    main,
    with_sections,
)
from benchmarks.harness import run_median as _median  # noqa: E402

NAME = "kv_cache"
TITLE = "Quantized static KV cache under torch.compile: bytes held, decode step, fidelity"
SCHEMES = ["fp32", "fp32_inductor", "bf16", "int8", "int4", "kivi2", "hf_quanto_int4", "hf_quanto_int2"]
LENGTHS = {"1k": 1024, "4k": 4096, "16k": 16384}
# What a user runs: model.generate(ids, cache_implementation="static") with HF making the cache,
# the forward compiled by Inductor alone, by memsave, and by memsave with options["kv_cache"].
GENERATE = ["fp32_inductor", "fp32", "int8", "int4", "kivi2"]
GENERATE_PROMPT, GENERATE_NEW = 4096, 32
GENERATE_METRICS = {"cache_mib": "lower", "gen_peak_mib": "lower", "gen_rss_mib": "lower", "gen_rss_peak_mib": "lower",
                    "gen_rss_trimmed_mib": "lower",
                    "gen_first_token_ms": "lower", "gen_decode_ms": "lower"}
FIDELITY = ["fp32", "int8", "int4", "kivi2", "kv_int8", "kv_int4", "kv_kivi2", "hf_quanto_int4", "hf_quanto_int2",
            "hf_quanto_int4_r32", "hf_quanto_int2_r32"]
CONFIGS = ([f"{n}.{s}" for n in LENGTHS for s in SCHEMES] + [f"generate.{s}" for s in GENERATE]
           + [f"fidelity.{s}" for s in FIDELITY])
MEMORY_METRICS = {"cache_mib": "lower", "tracked_mib": "lower", "rss_mib": "lower", "rss_trimmed_mib": "lower",
                  "decode_ms": "lower",
                  "decode_peak_mib": "lower", "first_token_ms": "lower"}
FIDELITY_METRICS = {"ppl": "lower", "ppl_delta": "lower", "agreement": "higher"}
PARAMS = {"windows": 8, "prompts": 4, "decode_steps": 16}
QUICK = {"windows": 2, "prompts": 1, "decode_steps": 4}
CHUNK = 1024
HEADROOM = 64  # cache slots beyond n for the decode steps


def _parts(params: dict) -> dict[str, Part]:
    parts = {n: Part([f"{n}.{s}" for s in SCHEMES], f"{n}.fp32", repeats=2 if n == "4k" else 1, metrics=MEMORY_METRICS)
             for n in LENGTHS}
    parts["generate"] = Part([f"generate.{s}" for s in GENERATE], "generate.fp32_inductor", repeats=3,
                             metrics=GENERATE_METRICS)
    parts["fidelity"] = Part([f"fidelity.{s}" for s in FIDELITY], "fidelity.fp32", repeats=1, metrics=FIDELITY_METRICS)
    return parts


def _quiet():
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)


def _cache(scheme: str, config, length: int):
    import transformers

    import memsave

    if scheme in ("fp32", "fp32_inductor", "bf16") or scheme.startswith("kv_"):  # kv_*: HF's cache, options['kv_cache']
        return transformers.StaticCache(config=config, max_cache_len=length)
    if scheme.startswith("hf_quanto_int"):
        from transformers.cache_utils import QuantizedCache

        bits, _, residual = scheme.removeprefix("hf_quanto_int").partition("_r")
        return QuantizedCache("quanto", config, nbits=int(bits), residual_length=int(residual) if residual else None)
    return memsave.QuantizedStaticCache(config, max_cache_len=length, scheme=scheme)


def _model(scheme: str, model):
    import torch

    if scheme == "bf16":
        model = model.to(torch.bfloat16)
    if scheme == "fp32_inductor":
        model.forward = torch.compile(model.forward)  # what a user runs today: Inductor alone
    elif scheme.startswith("kv_"):
        model.forward = torch.compile(model.forward, backend="memsave", options={"kv_cache": scheme.removeprefix("kv_")})
    elif not scheme.startswith("hf_"):
        model.forward = torch.compile(model.forward, backend="memsave")
    return model


def measure_memory(scheme: str, n: int, params: dict) -> dict[str, float]:
    import torch
    import transformers

    import memsave
    from memsave.memory.process import give_back

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=n + 2 * HEADROOM)
    model = _model(scheme, transformers.LlamaForCausalLM(config).eval())
    ids = torch.randint(0, 256, (1, n + HEADROOM), generator=torch.Generator().manual_seed(1))
    chunk = min(CHUNK, n)

    def prefill(cache, upto):
        first = None
        for start in range(0, upto, chunk):
            began = time.perf_counter()
            model(ids[:, start : start + chunk], cache=cache, position_ids=torch.arange(start, start + chunk)[None])
            first = first if first is not None else time.perf_counter() - began

        return first

    def decode(cache, position):
        model(ids[:, position : position + 1], cache=cache, position_ids=torch.tensor([[position]]))

    with torch.no_grad():
        # Warm-up: the whole schedule on another cache (the first chunk and the later ones
        # compile separately; compiling grows RSS by tens of MiB). It stays alive, so the
        # measured cache's buffers are new memory, not the warm-up cache's freed pages.
        warm = _cache(scheme, config, n + HEADROOM)
        prefill(warm, n)
        decode(warm, n)
        decode(warm, n + 1)
        gc.collect()
        give_back()  # no free pages resident before: the new cache's pages show as new RSS
        before = current_rss_bytes()
        cache = _cache(scheme, config, n + HEADROOM)
        first = prefill(cache, n)  # no tracker here: its profiler's records would be RSS too
        gc.collect()
        rss = current_rss_bytes() - before
        give_back()  # what the process could not give back: the cache, and pages fragmentation pins
        rss_trimmed = current_rss_bytes() - before
        times = []
        for i in range(params["decode_steps"]):
            began = time.perf_counter()
            decode(cache, n + i)
            times.append(time.perf_counter() - began)
        tracked = _cache(scheme, config, n + HEADROOM)  # a third cache, under the tracker
        with memsave.MemoryTracker() as fill:
            prefill(tracked, n)
        decode(tracked, n)  # its first step may still do one-time work; the peak is of a later one
        with memsave.MemoryTracker() as step:
            decode(tracked, n + 1)
    counted = None if scheme.startswith("hf_") else memsave.cache_bytes(cache) / MiB  # HF's fp layers counted too
    result = {"tracked_mib": fill.stats.end_bytes / MiB, "rss_mib": rss / MiB, "rss_trimmed_mib": rss_trimmed / MiB, "decode_ms": statistics.median(times) * 1e3,
              "decode_peak_mib": step.stats.peak_bytes / MiB, "first_token_ms": first * 1e3}
    if counted is not None:
        result["cache_mib"] = counted
    return result


def measure_fidelity(scheme: str, params: dict) -> dict[str, float]:
    import torch

    from memsave.models import docs_lm

    model, _ = docs_lm.load(attn_implementation="sdpa")
    reference, _ = docs_lm.load(attn_implementation="sdpa")
    model = _model(scheme, model) if scheme != "fp32" else model
    tokens = docs_lm.held_out_tokens()
    window, prompt = 256, 64
    windows = tokens[: params["windows"] * window].view(-1, window)

    @torch.no_grad()
    def teacher_forced(m, make):
        nll, count = 0.0, 0
        for row in windows:
            cache = make()
            logits = [m(row[None, :prompt], cache=cache).logits[:, -1]]
            for i in range(prompt, window - 1):
                logits.append(m(row[None, i : i + 1], cache=cache, position_ids=torch.tensor([[i]])).logits[:, -1])
            predicted = torch.cat(logits).double()  # logits for tokens prompt .. window-1
            nll += torch.nn.functional.cross_entropy(predicted, row[prompt:], reduction="sum").item()
            count += window - prompt
        return math.exp(nll / count)

    @torch.no_grad()
    def greedy(m, make, row):
        cache = make()
        out = []
        token = m(row[None, :prompt], cache=cache).logits[:, -1].argmax(-1)
        for i in range(prompt, prompt + 128):
            out.append(int(token))
            token = m(token.view(1, 1), cache=cache, position_ids=torch.tensor([[i]])).logits[:, -1].argmax(-1)
        return out

    config = model.config
    size = window + 32

    def make():
        return _cache(scheme, config, size)

    def make_fp32():
        return _cache("fp32", config, size)

    ppl = teacher_forced(model, make)
    ppl_fp32 = ppl if scheme == "fp32" else teacher_forced(reference, make_fp32)
    agree = []
    for row in windows[: params["prompts"]]:
        ours, theirs = greedy(model, make, row), greedy(reference, make_fp32, row)
        agree.append(sum(a == b for a, b in zip(ours, theirs)) / len(theirs))
    return {"ppl": ppl, "ppl_delta": ppl - ppl_fp32, "agreement": statistics.mean(agree), "ppl_fp32": ppl_fp32}


def measure_generate(scheme: str, params: dict) -> dict[str, float]:
    """`model.generate(ids, cache_implementation="static")` of GENERATE_NEW tokens after a
    GENERATE_PROMPT-token prompt, HF making the static cache, the options as the README spells
    them: `{"kv_cache": scheme}` (nothing else) for int8 / int4 / kivi2."""
    import torch
    import transformers

    import memsave
    from benchmarks.harness import peak_rss_bytes, reset_peak_rss
    from memsave.memory.process import give_back

    torch.manual_seed(0)
    n, new = GENERATE_PROMPT, GENERATE_NEW
    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=n + 2 * new)
    model = transformers.LlamaForCausalLM(config).eval()
    if scheme == "fp32_inductor":
        model.forward = torch.compile(model.forward)
    else:
        options = {"kv_cache": scheme} if scheme != "fp32" else None
        model.forward = torch.compile(model.forward, backend="memsave", options=options)
    ids = torch.randint(0, 256, (1, n), generator=torch.Generator().manual_seed(1))

    def generate(tokens: int):
        return model.generate(ids, cache_implementation="static", max_new_tokens=tokens, do_sample=False,
                              min_new_tokens=tokens, return_dict_in_generate=True)

    with torch.no_grad():
        generate(new)  # compiles the prefill and the decode step
        generate(new)  # and anything a second cache does the first time
        gc.collect()
        give_back()
        before = current_rss_bytes()
        reset_peak_rss()
        began = time.perf_counter()
        out = generate(new)  # held: the returned cache stays alive
        whole = time.perf_counter() - began
        gc.collect()
        rss, rss_peak = current_rss_bytes() - before, peak_rss_bytes() - before
        give_back()
        rss_trimmed = current_rss_bytes() - before  # the cache, and what the process could not give back
        counted = memsave.cache_bytes(out.past_key_values)
        del out
        gc.collect()
        firsts = []
        for _ in range(2):
            began = time.perf_counter()
            generate(1)  # the prefill and one token: first-token time
            firsts.append(time.perf_counter() - began)
        with memsave.MemoryTracker() as tracker:
            generate(new)
    first = min(firsts)
    return {"cache_mib": counted / MiB, "gen_peak_mib": tracker.stats.peak_bytes / MiB, "gen_rss_mib": rss / MiB,
            "gen_rss_peak_mib": rss_peak / MiB, "gen_rss_trimmed_mib": rss_trimmed / MiB, "gen_first_token_ms": first * 1e3,
            "gen_decode_ms": (whole - first) / (new - 1) * 1e3}


def measure(config: str, params: dict) -> dict[str, float]:
    _quiet()
    part, scheme = config.split(".", 1)
    if part == "fidelity":
        return measure_fidelity(scheme, params)
    if part == "generate":
        return measure_generate(scheme, params)
    return measure_memory(scheme, LENGTHS[part], params)


# -- report -----------------------------------------------------------------------------------



def _fmt(value, spec=".2f"):
    return "–" if value is None else format(value, spec)


def render_sections(results) -> str:
    lines = ["", "## Cache memory against the fp32 static cache (issue 16's goals: int8 ≤ 0.27x, int4 ≤ 0.16x)", "",
             ("| context | cache | counted MiB | tracked MiB | x fp32 | RSS growth MiB | x fp32 | RSS after trim MiB | "
              "x fp32 | decode ms | x fp32 | decode peak MiB | first 1024 tokens ms |"),
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in LENGTHS:
        base = {m: _median(results, f"{n}.fp32", m) for m in MEMORY_METRICS}
        for s in SCHEMES:
            got = {m: _median(results, f"{n}.{s}", m) for m in MEMORY_METRICS}
            if got["tracked_mib"] is None:
                continue

            def ratio(m, got=got, base=base):
                return None if got[m] is None or not base[m] else got[m] / base[m]

            lines.append(f"| {n} | {s} | {_fmt(got['cache_mib'])} | {_fmt(got['tracked_mib'])} | {_fmt(ratio('tracked_mib'), '.3f')} | "
                         f"{_fmt(got['rss_mib'])} | {_fmt(ratio('rss_mib'), '.3f')} | {_fmt(got['rss_trimmed_mib'])} | "
                         f"{_fmt(ratio('rss_trimmed_mib'), '.3f')} | {_fmt(got['decode_ms'])} | "
                         f"{_fmt(ratio('decode_ms'))} | {_fmt(got['decode_peak_mib'])} | {_fmt(got['first_token_ms'], '.0f')} |")
    lines += ["", f"## generate(cache_implementation=\"static\"): {GENERATE_PROMPT}-token prompt, {GENERATE_NEW} new tokens", "",
              "HF makes the static cache; int8 / int4 / kivi2 are `options={\"kv_cache\": scheme}` and nothing else. "
              "Baseline: Inductor alone (`torch.compile(model.forward)`), fp32 cache.", "",
              ("| forward compiled by | cache held MiB | x base | tracked peak MiB | x base | RSS held MiB | x base | "
               "RSS peak MiB | x base | RSS held after trim MiB | x base | first token ms | x base | decode ms/token | x base |"),
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    base = {m: _median(results, "generate.fp32_inductor", m) for m in GENERATE_METRICS}
    for s in GENERATE:
        got = {m: _median(results, f"generate.{s}", m) for m in GENERATE_METRICS}
        if got["gen_peak_mib"] is None:
            continue
        cells = []
        for m in ("cache_mib", "gen_peak_mib", "gen_rss_mib", "gen_rss_peak_mib", "gen_rss_trimmed_mib", "gen_first_token_ms",
                  "gen_decode_ms"):
            ratio = None if got[m] is None or not base[m] else got[m] / base[m]
            cells += [_fmt(got[m], ".0f" if m == "gen_first_token_ms" else ".2f"), _fmt(ratio, ".3f")]
        label = {"fp32_inductor": "Inductor (fp32 cache)", "fp32": "memsave (fp32 cache)"}.get(s, f"memsave kv_cache={s}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Fidelity on the docs LM (held-out text)", "",
              "| cache | perplexity | minus fp32's | greedy agreement over 128 tokens |", "|---|---:|---:|---:|"]
    for s in FIDELITY:
        ppl = _median(results, f"fidelity.{s}", "ppl")
        if ppl is None:
            continue
        lines.append(f"| {s} | {ppl:.4f} | {_fmt(_median(results, f'fidelity.{s}', 'ppl_delta'), '+.4f')} | "
                     f"{_fmt(_median(results, f'fidelity.{s}', 'agreement'), '.3f')} |")
    return "\n".join(lines) + "\n"


def render_plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    xs = [LENGTHS[n] for n in LENGTHS]
    for s in SCHEMES:
        ys = [_median(results, f"{n}.{s}", "tracked_mib") for n in LENGTHS]
        if any(y is not None for y in ys):
            ax.plot([x for x, y in zip(xs, ys) if y is not None], [y for y in ys if y is not None], marker="o", label=s)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("cache held (MiB, tracked)")
    ax.set_title("KV cache memory vs context length (4 layers, 2 kv heads x 64)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


BENCH = Benchmark(
    name=NAME, title=TITLE, configs=CONFIGS, baseline="4k.fp32", measure=measure,
    metrics={**MEMORY_METRICS, **GENERATE_METRICS, **FIDELITY_METRICS}, params=PARAMS, quick=QUICK, repeats=1, timeout_s=1800.0,
    default_allocator=True, parts=_parts, report=with_sections(render_sections), draw=render_plot,
    quick_configs=[f"1k.{s}" for s in SCHEMES] + [f"generate.{s}" for s in GENERATE] + [f"fidelity.{s}" for s in FIDELITY],
)

if __name__ == "__main__":
    main(BENCH)
