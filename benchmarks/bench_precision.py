"""Mixed precision: memory and error against fp32, on the built-in decoder and the real MiniLM.

Configs, named `<suite>.<variant>`, each in a fresh process (benchmarks/harness.py):

  decoder-infer.{fp32,bf16,fp16}   one no-grad forward of the built-in decoder through
                                   `torch.compile(backend="memsave", options={"precision": v})`
                                   (fp32: no precision option); error = SQNR (dB) of the logits
                                   against eager fp32 in the same process.
  decoder-train.{fp32,bf16,saved-bf16,saved-fp8,saved-int8,bf16-saved-bf16}
                                   one training step (forward, cross-entropy, backward);
                                   error = the lowest cosine over parameters between the
                                   step's gradients and eager fp32's.
  minilm.{fp32,bf16,fp16}          the real all-MiniLM-L6-v2 (memsave.models.minilm) embedding
                                   real sentences (`reference_sentences`, first lines of stdlib
                                   docstrings, as in bench_quant_fidelity.py); error = mean and
                                   min cosine per sentence of the mean-pooled embeddings against
                                   eager fp32.

Memory is measured: tracked_peak_mib is the peak of live CPU-allocator bytes during one call
after a warm-up call (`memsave.MemoryTracker`, Inductor's C++ buffers included); saved_mib
(training) the unique storages autograd holds for the backward, parameters excluded.
est_peak_mib is memsave's own estimate of the same call (benchmarks.harness.estimated_peak_mib:
the inference graph's estimated peak after all passes, or the training step's simulated
forward+backward peak). weights_mib (inference) is what the model's weights take after compiling: their storages plus
the copies memsave holds for them (`WEIGHTS.held_bytes`): in bf16/fp16 inference each weight
only matmuls read is stored narrow and its fp32 original released (precision weights="narrow").
In training the weights stay fp32 (master weights); mixed precision saves activation memory.

The harness's table compares every row to `decoder-infer.fp32`; the section after it
compares each suite to its own fp32 row.

    python benchmarks/bench_precision.py            # decoder "small", batch 4 x seq 256; 256 sentences
    python benchmarks/bench_precision.py --quick    # decoder "tiny", seq 64, FX codegen; 64 sentences
                                                    # -> docs/results/precision_quick.*
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import Benchmark, estimated_peak_mib, main, with_sections  # noqa: E402

SUITES = {
    "decoder-infer": ("fp32", "bf16", "fp16"),
    "decoder-train": ("fp32", "bf16", "saved-bf16", "saved-fp8", "saved-int8", "bf16-saved-bf16"),
    "minilm": ("fp32", "bf16", "fp16"),
}
CONFIGS = [f"{suite}.{v}" for suite, variants in SUITES.items() for v in variants]
PRECISION = {
    "fp32": None,
    "bf16": "bf16",
    "fp16": "fp16",
    "saved-bf16": "saved-bf16",
    "saved-fp8": "saved-fp8",
    "saved-int8": "saved-int8",
    "bf16-saved-bf16": {"compute": "bf16", "saved": "bf16"},
}
METRICS = {"tracked_peak_mib": "lower", "est_peak_mib": "lower", "weights_mib": "lower", "saved_mib": "lower", "sqnr_db": "higher", "cosine": "higher"}
PARAMS = {"decoder": "small", "batch": 4, "seq": 256, "sentences": 256, "minilm_batch": 32, "codegen": "inductor"}
QUICK = {"decoder": "tiny", "batch": 2, "seq": 64, "sentences": 64, "minilm_batch": 32, "codegen": "fx"}
MiB = 2**20


def _options(variant: str, codegen: str) -> dict:
    options = {"codegen": codegen}
    if PRECISION[variant] is not None:
        options["precision"] = PRECISION[variant]
    return options


def measure(config: str, params: dict) -> dict[str, float]:
    import torch

    torch.manual_seed(0)
    suite, variant = config.split(".")
    return {"decoder-infer": _decoder_infer, "decoder-train": _decoder_train, "minilm": _minilm}[suite](variant, params)


def _decoder_infer(variant: str, params: dict) -> dict[str, float]:
    import torch

    import memsave
    from memsave import MemoryTracker
    from memsave.models import build_decoder, decoder_inputs
    from memsave.report import sqnr_db

    model = build_decoder(params["decoder"])
    (x,) = decoder_inputs(model, batch=params["batch"], seq=params["seq"])
    compiled = torch.compile(model, backend="memsave", options=_options(variant, params["codegen"]))
    with torch.no_grad():
        reference = model(x)
        with memsave.collect() as reports:
            compiled(x)  # compile + warm up
        with MemoryTracker("cpu") as tracker:
            out = compiled(x)
    return {"tracked_peak_mib": tracker.stats.peak_bytes / MiB, "est_peak_mib": estimated_peak_mib(reports),
            "weights_mib": _weights_mib(model), "sqnr_db": min(sqnr_db(reference, out), 200.0)}


def _weights_mib(model) -> float:
    from memsave.weights import WEIGHTS

    return WEIGHTS.held_bytes([*model.parameters(), *model.buffers()]) / MiB


def _decoder_train(variant: str, params: dict) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    import memsave
    from memsave import MemoryTracker
    from memsave.models import build_decoder, decoder_inputs

    model = build_decoder(params["decoder"]).train()
    x, labels = decoder_inputs(model, batch=params["batch"], seq=params["seq"], labels=True)
    model(x, labels).backward()
    reference = [p.grad.clone() for p in model.parameters()]
    compiled = torch.compile(model, backend="memsave", options=_options(variant, params["codegen"]))
    model.zero_grad(set_to_none=True)
    with memsave.collect() as reports:
        compiled(x, labels).backward()  # compile + warm up
    model.zero_grad(set_to_none=True)
    with MemoryTracker("cpu", track_saved=True, exclude=list(model.parameters())) as tracker:
        compiled(x, labels).backward()
    cosine = min(F.cosine_similarity(a.flatten(), p.grad.flatten(), dim=0).item() for a, p in zip(reference, model.parameters()))
    return {
        "tracked_peak_mib": tracker.stats.peak_bytes / MiB,
        "est_peak_mib": estimated_peak_mib(reports),
        "saved_mib": tracker.stats.saved_bytes / MiB,
        "cosine": cosine,
    }


def _minilm(variant: str, params: dict) -> dict[str, float]:
    import torch
    import torch.nn.functional as F

    import memsave
    from memsave import MemoryTracker
    from memsave.models.minilm import load_minilm, minilm_inputs, reference_sentences

    model, tokenizer = load_minilm()
    ids, mask = minilm_inputs(tokenizer, reference_sentences(params["sentences"]))
    batch = min(params["minilm_batch"], len(ids))
    compiled = torch.compile(model, backend="memsave", options=_options(variant, params["codegen"]))
    with torch.no_grad():
        reference = torch.cat([model(ids[i:i + batch], mask[i:i + batch]) for i in range(0, len(ids), batch)])
        with memsave.collect() as reports:
            compiled(ids[:batch], mask[:batch])  # compile + warm up
        with MemoryTracker("cpu") as tracker:
            compiled(ids[:batch], mask[:batch])
        out = torch.cat([compiled(ids[i:i + batch], mask[i:i + batch]) for i in range(0, len(ids), batch)])
    cos = F.cosine_similarity(reference, out, dim=-1)
    return {"tracked_peak_mib": tracker.stats.peak_bytes / MiB, "est_peak_mib": estimated_peak_mib(reports),
            "weights_mib": _weights_mib(model), "cosine": cos.mean().item(), "min_cosine": cos.min().item()}


def per_suite(results: dict) -> str:
    """Each suite against its own fp32 row."""
    summary = results["summary"]
    lines = ["", "## Each suite against its own fp32", ""]
    for suite, variants in SUITES.items():
        base = summary.get(f"{suite}.fp32", {}).get("metrics", {})
        lines += [f"### {suite}", "", "| variant | tracked peak MiB | vs fp32 | memsave's estimate MiB | weights MiB | vs fp32 | saved MiB | vs fp32 | SQNR dB | cosine |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for v in variants:
            m = summary.get(f"{suite}.{v}", {}).get("metrics", {})

            def cell(metric, fmt="{:.2f}"):
                return fmt.format(m[metric]["median"]) if metric in m else "–"

            def ratio(metric):
                if metric not in m or metric not in base or not base[metric]["median"]:
                    return "–"
                return f"{m[metric]['median'] / base[metric]['median']:.2f}×"

            lines.append(f"| {v} | {cell('tracked_peak_mib')} | {ratio('tracked_peak_mib')} | {cell('est_peak_mib')} | {cell('weights_mib')} | "
                         f"{ratio('weights_mib')} | {cell('saved_mib')} | "
                         f"{ratio('saved_mib')} | {cell('sqnr_db', '{:.1f}')} | {cell('cosine', '{:.6f}')} |")
        lines.append("")
    return "\n".join(lines)


BENCH = Benchmark(
    name="precision",
    title="Mixed precision: memory and error vs fp32 (built-in decoder, real MiniLM)",
    configs=CONFIGS,
    baseline="decoder-infer.fp32",
    measure=measure,
    metrics=METRICS,
    params=PARAMS,
    quick=QUICK,
    repeats=1,  # memory and error are deterministic here; time is not measured
    plot=["tracked_peak_mib"],
    timeout_s=1800.0,
    report=with_sections(per_suite),
)


if __name__ == "__main__":
    main(BENCH)
