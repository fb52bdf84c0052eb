"""Memory planning: planned vs measured vs lower-bound peak, and Inductor's own result.

Configs, named `<model>.<variant>`, each in a fresh process (benchmarks/harness.py):

  models   decoder (built-in Llama-style decoder), mlp (built-in MLP), gpt2 (a Hugging Face
           GPT2LMHeadModel of a small shape, eager attention): one no-grad forward each;
           decoder-train: one training step (forward, loss, backward).
  variants fx          memsave with codegen "fx" (plain FX code, frees after last use), no plan;
           fx-plan     the same plus options {"plan_memory": "on"}: in-place reuse of dying
                       inputs, needless layout copies dropped;
           inductor    torch.compile(model) with Inductor (its own buffer planning and reuse);
           memsave-inductor-plan  memsave, codegen "inductor", {"plan_memory": "report"}: the
                       plan's numbers for the ATen graph Inductor receives.

Metrics (MiB):
  measured_peak_mib  peak of live CPU-allocator bytes during one call after a warm-up call
                     (`memsave.MemoryTracker`; Inductor's C++ buffers included);
  planned_peak_mib   plan_memory's arena size (greedy by size) for the graph that runs;
  lower_bound_mib    plan_memory's lower bound: most bytes alive at one program point.
For training, planned and lower bound are the larger of the forward's and the backward's
(the backward's saved activations counted until their last use); the measured step peak also
holds the parameter gradients.

    python benchmarks/bench_plan_memory.py            # decoder "small" batch 4 x seq 256, ...
    python benchmarks/bench_plan_memory.py --quick    # tiny sizes -> docs/results/plan_memory_quick.*
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from benchmarks.harness import Benchmark, main, with_sections  # noqa: E402

MODELS = ("decoder", "mlp", "gpt2", "decoder-train")
VARIANTS = ("fx", "fx-plan", "inductor", "memsave-inductor-plan")
CONFIGS = [f"{m}.{v}" for m in MODELS for v in VARIANTS]
METRICS = {"measured_peak_mib": "lower", "planned_peak_mib": "lower", "lower_bound_mib": "lower"}
PARAMS = {"decoder": "small", "batch": 4, "seq": 256, "mlp_batch": 256, "gpt2_seq": 128}  # the tiny GPT-2 has 128 positions
QUICK = {"decoder": "tiny", "batch": 2, "seq": 64, "mlp_batch": 32, "gpt2_seq": 64}
MiB = 2**20


def _model(name: str, params: dict):
    from memsave.models import build_decoder, build_hf_gpt2, build_mlp, decoder_inputs, hf_inputs, mlp_inputs

    if name.startswith("decoder"):
        model = build_decoder(params["decoder"])
        train = name == "decoder-train"
        inputs = decoder_inputs(model, batch=params["batch"], seq=params["seq"], labels=train)
        return (model.train() if train else model), inputs
    if name == "mlp":
        model = build_mlp()
        return model, mlp_inputs(model, batch=params["mlp_batch"])
    model = build_hf_gpt2()
    return model, hf_inputs(model, batch=params["batch"], seq=params["gpt2_seq"])


def _compile(model, variant: str):
    import torch

    if variant == "inductor":
        return torch.compile(model)
    options = {"fx": {"codegen": "fx"}, "fx-plan": {"codegen": "fx", "plan_memory": "on"},
               "memsave-inductor-plan": {"codegen": "inductor", "plan_memory": "report"}}[variant]
    return torch.compile(model, backend="memsave", options=options)


def measure(config: str, params: dict) -> dict[str, float]:
    import torch

    import memsave
    from memsave import MemoryTracker

    name, variant = config.split(".")
    torch.manual_seed(0)
    model, inputs = _model(name, params)
    compiled = _compile(model, variant)
    train = name == "decoder-train"

    def call():
        if train:
            model.zero_grad(set_to_none=True)
            compiled(*inputs).backward()
        else:
            with torch.no_grad():
                compiled(*inputs)

    with memsave.collect() as reports:
        call()  # compile + warm up
    with MemoryTracker("cpu") as tracker:
        call()
    result = {"measured_peak_mib": tracker.stats.peak_bytes / MiB}
    plans = [r.details for report in reports for r in report.records if r.name == "plan_memory"]
    if plans:
        result["planned_peak_mib"] = max(d["planned_peak_bytes"] for d in plans) / MiB
        result["lower_bound_mib"] = max(d["lower_bound_bytes"] for d in plans) / MiB
        result["inplace_ops"] = sum(len(d["inplace"]) for d in plans)
        result["layout_ops_removed"] = sum(len(d["layout_removed"]) for d in plans)
    return result


def per_model(results: dict) -> str:
    """Each model against its own `fx` row (the harness's ratios are all vs decoder.fx)."""
    summary = results["summary"]
    lines = ["", "## Each model against its own unplanned FX run", "",
             "| model | variant | measured MiB | vs fx | planned MiB | lower bound MiB | measured / lower bound |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for model in MODELS:
        base = summary.get(f"{model}.fx", {}).get("metrics", {}).get("measured_peak_mib")
        for variant in VARIANTS:
            m = summary.get(f"{model}.{variant}", {}).get("metrics", {})
            get = lambda k: m[k]["median"] if k in m else None  # noqa: E731
            measured, planned, lower = get("measured_peak_mib"), get("planned_peak_mib"), get("lower_bound_mib")
            fmt = lambda v: "–" if v is None else f"{v:.2f}"  # noqa: E731
            vs = "–" if measured is None or not base else f"{measured / base['median']:.2f}×"
            over = "–" if measured is None or not lower else f"{measured / lower:.2f}"
            lines.append(f"| {model} | {variant} | {fmt(measured)} | {vs} | {fmt(planned)} | {fmt(lower)} | {over} |")
    return "\n".join(lines) + "\n"


BENCH = Benchmark(
    name="plan_memory",
    title="Memory planning: planned vs measured vs lower-bound peak, and Inductor",
    configs=CONFIGS,
    baseline="decoder.fx",
    measure=measure,
    metrics=METRICS,
    params=PARAMS,
    quick=QUICK,
    repeats=1,  # allocation peaks are deterministic for a fixed graph and input
    plot=["measured_peak_mib"],
    timeout_s=1800.0,
    report=with_sections(per_model),
)


if __name__ == "__main__":
    main(BENCH)
