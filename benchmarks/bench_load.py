"""Compress while loading: a safetensors checkpoint four and more times the budget, planned and
loaded one tensor at a time, beside what a user does today (issue 14, item 4).

Model: an HF LlamaForCausalLM built from a config (hidden 1024, intermediate 2816, 8 layers, 16
heads / 4 kv heads, vocabulary 16384: 122M parameters, 467 MiB of fp32 weights; --quick: 2
layers, hidden 512, budget 1/4), random weights saved once as a plain safetensors file (cached under
~/.cache/memsave/bench_load, or $MEMSAVE_CACHE_DIR). The budget is `budget_fraction` (1/5) of
the fp32 weight bytes, for a call on 1 x `tokens` (128) tokens. One fresh process per config and
repeat, glibc's default allocator settings (what a user's process has); each first warms up
(imports and a tiny model loaded the same way), then:

  fp32.load_state_dict   build the model, model.load_state_dict(safetensors.torch.load_file(path))
  memsave.load           with memsave.empty_parameters(): build it; plan = memsave.plan(model,
                         tokens, budget=..., checkpoint=path); memsave.load(model, path,
                         options=plan.options); compile with plan.options; one call
  memsave.reload         memsave.load(model, <that model's memsave.save file>); compile with
                         model._memsave_options; one call (the file is made once, in a process
                         of its own, if missing)

Metrics (MiB unless named otherwise; peaks are VmHWM above the RSS before the step, after
`echo 5 > /proc/self/clear_refs`):
  load_peak_mib      while loading (memsave.load: loading and compressing)
  plan_peak_mib      while planning from the checkpoint (memsave.load only)
  call_peak_mib      RSS peak while compiling and making the first call, above the RSS after loading
  held_mib           after loading: memsave's count of the bytes the model's tensors hold
                     (WEIGHTS.held_bytes of the parameters + buffers)
  largest_fp32_mib   the largest single tensor of the checkpoint, at full precision
  formula_mib        held_mib + largest_fp32_mib: item 4's bound before the fixed overhead
  overhead_mib       load_peak_mib - formula_mib: what loading needs beyond that
  plan_total_mib     the plan's count (weights + the call's working memory, estimated on meta)
  measured_total_mib weights held + the compiled call's tracked peak of live tensors (memsave.MemoryTracker)
  budget_mib, fp32_mib, plan_s, load_s, output_crc (crc32 of the first call's logits: the reload
  must give the same)

    python benchmarks/bench_load.py             # 3 repeats -> docs/results/load.{json,md,png}
    python benchmarks/bench_load.py --quick     # small model, one repeat
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import MiB, Benchmark, main, with_sections  # noqa: E402

CONFIGS = ["fp32.load_state_dict", "memsave.load", "memsave.reload"]
PARAMS = {"hidden": 1024, "intermediate": 2816, "layers": 8, "heads": 16, "kv_heads": 4, "vocab": 16384,
          "budget_fraction": 0.2, "tokens": 128, "codegen": "inductor"}
QUICK = {"hidden": 512, "intermediate": 1408, "layers": 2, "budget_fraction": 0.25}
SHAPE_KEYS = ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab")


def _config(params: dict, **overrides):
    from transformers import LlamaConfig

    fields = {"vocab_size": params["vocab"], "hidden_size": params["hidden"], "intermediate_size": params["intermediate"],
              "num_hidden_layers": params["layers"], "num_attention_heads": params["heads"],
              "num_key_value_heads": params["kv_heads"], "max_position_embeddings": 512, "tie_word_embeddings": False}
    fields.update(overrides)
    return LlamaConfig(**fields)


def _model(config):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(config).eval()


def _folder(params: dict) -> Path:
    root = os.environ.get("MEMSAVE_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "memsave")
    key = hashlib.sha256(json.dumps({k: params[k] for k in SHAPE_KEYS}, sort_keys=True).encode()).hexdigest()[:16]
    return Path(root) / "bench_load" / key


def checkpoint(params: dict) -> Path:
    """The plain checkpoint (random weights, seed 0), written once."""
    import torch
    from safetensors.torch import save_file

    path = _folder(params) / "model.safetensors"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        model = _model(_config(params))
        partial = path.with_suffix(".partial")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(partial))
        os.replace(partial, path)
    return path


def _budget(params: dict, path: Path) -> int:
    from memsave.checkpoint import Checkpoint

    fp32 = sum(e.nbytes for e in Checkpoint(path).entries.values())
    return int(fp32 * params["budget_fraction"])


def _tokens(params: dict):
    import torch

    return (torch.arange(params["tokens"]).view(1, -1) * 7919) % params["vocab"]


def _plan_and_load(params: dict, path: Path, rss: dict | None = None):
    """memsave's way: plan from the checkpoint, then load compressing. `rss` gets the peaks."""
    import memsave

    from memsave.memory.process import peak_rss_bytes, reset_peak_rss, rss_bytes

    with memsave.empty_parameters():
        model = _model(_config(params))
    marks = {}
    before = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    plan = memsave.plan(model, _tokens(params), budget=_budget(params, path), checkpoint=path)
    marks["plan_s"] = time.perf_counter() - start
    marks["plan_peak_mib"] = (peak_rss_bytes() - before) / MiB
    gc.collect()
    before = rss_bytes()
    reset_peak_rss()
    start = time.perf_counter()
    memsave.load(model, path, options=plan.options)
    marks["load_s"] = time.perf_counter() - start
    marks["load_peak_mib"] = (peak_rss_bytes() - before) / MiB
    if rss is not None:
        rss.update(marks)
    return model, plan


def saved_file(params: dict) -> Path:
    """memsave.save of the planned, compressed model; made in a process of its own if missing."""
    path = _folder(params) / f"memsave-{params['budget_fraction']}.safetensors"
    if not path.exists():
        code = ("import json, sys; sys.path.insert(0, '.'); from benchmarks import bench_load; "
                f"bench_load.make_saved(json.loads({json.dumps(json.dumps(params))}))")
        subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], check=True, timeout=3600)
    return path


def make_saved(params: dict) -> None:
    import torch

    import memsave

    path = checkpoint(params)
    model, plan = _plan_and_load(params, path)
    compiled = torch.compile(model, backend="memsave", options={**plan.options, "codegen": params["codegen"]})
    with torch.no_grad():
        compiled(_tokens(params))
    target = _folder(params) / f"memsave-{params['budget_fraction']}.safetensors"
    memsave.save(compiled, target.with_suffix(".partial"))
    os.replace(target.with_suffix(".partial"), target)


def _warm_up(config: str, params: dict) -> None:
    """The same steps on a one-layer model, so imports and one-time setup are not measured."""
    import torch
    from safetensors.torch import save_file

    import memsave

    small = {**params, "layers": 1, "vocab": 256, "hidden": 128, "intermediate": 256, "heads": 4, "kv_heads": 2}
    torch.manual_seed(0)
    model = _model(_config(small))
    tiny = _folder(params) / "warm.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tiny))
    tokens = (_tokens(params) % 256)
    with torch.no_grad():
        if config == "fp32.load_state_dict":
            model(tokens)
            return
        with memsave.empty_parameters():
            fresh = _model(_config(small))
        plan = memsave.plan(fresh, tokens, budget=10**9, checkpoint=tiny)
        memsave.load(fresh, tiny, options={"quantize": "int4"})
        torch.compile(fresh, backend="memsave", options={"quantize": "int4", "codegen": params["codegen"]})(tokens)
    del plan, fresh, model
    torch._dynamo.reset()
    gc.collect()


def measure(config: str, params: dict) -> dict[str, float]:
    import torch

    import memsave
    from memsave.budget.planner import measured_call, output_tensor
    from memsave.checkpoint import Checkpoint
    from memsave.memory.process import peak_rss_bytes, reset_peak_rss, rss_bytes
    from memsave.weights import WEIGHTS

    torch.set_num_threads(int(params.get("threads") or torch.get_num_threads()))
    path = checkpoint(params)
    saved = saved_file(params) if config == "memsave.reload" else None
    entries = Checkpoint(path).entries
    out: dict[str, float] = {"fp32_mib": sum(e.nbytes for e in entries.values()) / MiB,
                             "largest_fp32_mib": max(e.nbytes for e in entries.values()) / MiB,
                             "budget_mib": _budget(params, path) / MiB}
    _warm_up(config, params)
    tokens = _tokens(params)
    options = {"codegen": params["codegen"]}
    if config == "fp32.load_state_dict":
        from safetensors.torch import load_file

        before = rss_bytes()
        reset_peak_rss()
        start = time.perf_counter()
        model = _model(_config(params))
        model.load_state_dict(load_file(str(path)))
        out["load_s"] = time.perf_counter() - start
        out["load_peak_mib"] = (peak_rss_bytes() - before) / MiB
        call = model
    elif config == "memsave.load":
        model, plan = _plan_and_load(params, path, out)
        out["plan_total_mib"] = plan.total_bytes / MiB
        options.update(plan.options)
    elif config == "memsave.reload":
        with memsave.empty_parameters():
            model = _model(_config(params))
        before = rss_bytes()
        reset_peak_rss()
        start = time.perf_counter()
        memsave.load(model, saved)
        out["load_s"] = time.perf_counter() - start
        out["load_peak_mib"] = (peak_rss_bytes() - before) / MiB
        options.update(model._memsave_options)
    else:
        raise ValueError(f"unknown config {config!r}")
    tensors = list(model.parameters()) + list(model.buffers())
    out["held_mib"] = WEIGHTS.held_bytes(tensors) / MiB
    out["formula_mib"] = out["held_mib"] + out["largest_fp32_mib"]
    out["overhead_mib"] = out["load_peak_mib"] - out["formula_mib"]
    if config != "fp32.load_state_dict":
        call = torch.compile(model, backend="memsave", options=options)
    gc.collect()
    before = rss_bytes()
    reset_peak_rss()
    with torch.no_grad():
        logits = output_tensor(call(tokens))
    out["call_peak_mib"] = (peak_rss_bytes() - before) / MiB
    out["output_crc"] = float(zlib.crc32(logits.float().numpy().tobytes()))
    _, tracked = measured_call(call, [tokens])
    out["measured_total_mib"] = (WEIGHTS.held_bytes(tensors) + tracked) / MiB
    return out


def _sections(results) -> str:
    import statistics

    def med(config: str, metric: str):
        values = [r["metrics"][metric] for r in results["runs"] if r["config"] == config and r.get("ok")
                  and metric in r.get("metrics", {})]
        return statistics.median(values) if values else None

    lines = ["", "## Loading against item 4's bound", "",
             "| config | fp32 MiB | budget MiB | held after loading | largest fp32 tensor | bound (held + largest) | "
             "peak RSS while loading | overhead | plan's total | measured weights + call | load s | plan s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for config in results["configs"]:
        cells = [med(config, m) for m in ("fp32_mib", "budget_mib", "held_mib", "largest_fp32_mib", "formula_mib",
                                          "load_peak_mib", "overhead_mib", "plan_total_mib", "measured_total_mib",
                                          "load_s", "plan_s")]
        lines.append(f"| {config} | " + " | ".join("–" if c is None else f"{c:.1f}" for c in cells) + " |")
    crcs = {config: med(config, "output_crc") for config in ("memsave.load", "memsave.reload")}
    same = None not in crcs.values() and len(set(crcs.values())) == 1
    lines += ["", f"The reloaded model's first call gives {'the same' if same else 'DIFFERENT'} logits (crc32) as the "
              "model compressed while loading."]
    return "\n".join(lines) + "\n"


BENCH = Benchmark(
    name="load",
    title="Compress while loading: peak RSS against the compressed size + the largest fp32 tensor",
    configs=CONFIGS,
    baseline="fp32.load_state_dict",
    measure=measure,
    metrics={"load_peak_mib": "lower", "held_mib": "lower", "call_peak_mib": "lower", "load_s": "lower"},
    params=PARAMS,
    repeats=3,
    timeout_s=3600.0,
    default_allocator=True,
    quick=QUICK,
    report=with_sections(_sections),
)

if __name__ == "__main__":
    main(BENCH)
