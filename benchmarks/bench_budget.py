"""Fit a budget: memsave.plan's quality beside every uniform configuration at the same bytes.

Model: the small causal LM trained here on Python's docstrings (memsave.models.docs_lm; `memsave
lm` trains and caches it), quality = perplexity per byte on held-out modules (lower is better).
Each config is one fresh process (benchmarks/harness.py, default allocator):

  lm.fp32                 the model as trained (the baseline)
  lm.<name>               a uniform configuration, {"quantize": "<name>"}: "int8", "int4" (memsave's
                          int4: g64 asym GPTQ), and int4 g32/g128 GPTQ, g64 RTN and MSE, int3 and
                          int2 g32 GPTQ (GPTQ with the same calibration batches the plans get)
  lm.torchao-int8         torchao's int8 weight-only (quantize_, eager)
  lm.plan-<p>             memsave.plan at a budget of p % of the fp32 weight bytes, plus the working
                          memory of one call that the planner measures: options=plan.options

Per config: `ppl` (held-out perplexity per byte), `weight_mib` (memsave's count of the bytes the
weights hold after compiling: WEIGHTS.held_bytes; torchao and fp32: storage bytes),
`planned_weight_mib` (the plan's own count, plans only), `call_peak_mib` (live tensor bytes of
one call above the weights, memsave.MemoryTracker), `budget_mib` (plans), `total_mib`
(weight_mib + call_peak_mib: what the budget bounds), `rss_growth_mib` (process RSS after
compiling and two calls, minus before the model was loaded: weights, calibration statistics,
compiled code and allocator slack together), `predicted_error` (the plan's prediction of the model
output's relative change for this configuration's forms: per layer its output noise times its
measured gain, summed; fp32 0).

    python benchmarks/bench_budget.py              # -> docs/results/budget.{json,md,png}
    python benchmarks/bench_budget.py --quick      # 4 configs, a short held-out text
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import MiB, Benchmark, main, with_sections  # noqa: E402

# The option strings themselves ("int4" is memsave's int4: g64 asym GPTQ).
UNIFORM = ["int8", "int4", "int4-g128-asym-gptq", "int4-g32-asym-gptq", "int4-g64-asym-rtn", "int4-g64-asym-mse",
           "int3-g32-asym-gptq", "int2-g32-asym-gptq"]
# uniform config -> the plan's candidate form that stores the same codes (for its predicted error)
SAME_FORM = {"int8": "int8", "int4": "int4-g64", "int4-g128-asym-gptq": "int4-g128", "int4-g32-asym-gptq": "int4-g32",
             "int3-g32-asym-gptq": "int3-g32", "int2-g32-asym-gptq": "int2-g32"}
PLAN_PERCENTS = [50, 33, 25, 20, 16, 14, 12, 10]
CONFIGS = (["lm.fp32"] + [f"lm.{u}" for u in UNIFORM] + ["lm.torchao-int8"]
           + [f"lm.plan-{p}" for p in PLAN_PERCENTS])
QUICK_CONFIGS = ["lm.fp32", "lm.int8", "lm.int4", "lm.plan-25"]
PARAMS = {"held_out_bytes": 65536, "eval_batch": 4, "window": 256, "calib_batches": 8, "codegen": "inductor"}
QUICK = {"held_out_bytes": 8192}


def _warm_up(variant: str, params: dict) -> None:
    """A tiny model of the same class prepared the same way and called, so transformers' and
    torchao's imports and Dynamo's, Inductor's and memsave's one-time setup are in the RSS
    before the measured model is loaded, not in its growth."""
    import gc

    import torch

    from memsave.models import docs_lm

    tiny = docs_lm.build(docs_lm.Recipe(layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64, context=64)).eval()
    ids = torch.zeros(1, 16, dtype=torch.long)
    run = tiny
    if variant.startswith("torchao"):
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(tiny, Int8WeightOnlyConfig())
    elif variant != "fp32":
        run = torch.compile(tiny, backend="memsave", options={"quantize": "int8", "codegen": params["codegen"]})
    with torch.no_grad():
        run(input_ids=ids, use_cache=False)
    del tiny, run
    torch._dynamo.reset()
    gc.collect()


def measure(config: str, params: dict) -> dict[str, float]:
    import torch

    import memsave
    from memsave.budget.planner import working_bytes
    from memsave.memory.process import rss_bytes
    from memsave.models import docs_lm
    from memsave.weights import WEIGHTS

    torch.manual_seed(0)
    variant = config.split(".", 1)[1]
    _warm_up(variant, params)
    rss0 = rss_bytes()
    model, meta = docs_lm.load()
    weights = list(model.parameters())
    fp32 = sum(p.numel() * p.element_size() for p in weights)
    window, batch = params["window"], params["eval_batch"]
    tokens = docs_lm.held_out_tokens(params["held_out_bytes"])
    train = docs_lm.corpus().train
    step = len(train) // params["calib_batches"]
    calibration = [(docs_lm._tokens(train[i * step : i * step + batch * window]).view(batch, window),)
                   for i in range(params["calib_batches"])]
    # Planning measures each layer's effect on the output with the example: training text, never
    # the held-out text the perplexity is measured on.
    example = calibration[0][0]
    out: dict[str, float] = {"fp32_weight_mib": fp32 / MiB, "lm_trained_ppl": meta["held_out_perplexity"]}

    def logits(fn):
        return lambda ids: fn(input_ids=ids, use_cache=False).logits

    run = model
    plan = None
    if variant.startswith("torchao"):
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(model, Int8WeightOnlyConfig())
    elif variant != "fp32":
        memsave.calibrate(model, calibration, progress=False, hessian=True)
        if variant.startswith("plan-"):
            share = int(variant.split("-")[1]) / 100
            budget = int(share * fp32) + working_bytes(model, (example,))
            plan = memsave.plan(model, example, budget=budget)
            options = plan.options
            out["budget_mib"] = budget / MiB
            out["planned_weight_mib"] = plan.weight_bytes / MiB
            out["planned_total_mib"] = plan.total_bytes / MiB
            out["predicted_error"] = plan.predicted_error
            out["plan_dense_layers"] = float(sum(layer.form == "dense" for layer in plan.layers))
            out["plan_pruned_layers"] = float(sum("prune" in layer.settings for layer in plan.layers))
            out["plan_low_rank_layers"] = float(sum("factorize" in layer.settings for layer in plan.layers))
        else:
            options = {"quantize": variant}
            form = SAME_FORM.get(variant)
            if form is not None:  # the planner's own score of this uniform choice
                from memsave.budget.candidates import DENSE, FORMS_BY_NAME

                scored = memsave.plan(model, example, budget=10 * fp32 + 2**30, forms=(DENSE, FORMS_BY_NAME[form]))
                out["predicted_error"] = sum(layer.candidates[form][1] for layer in scored.layers
                                             if not layer.embedding and form in layer.candidates)
        run = torch.compile(model, backend="memsave", options={**options, "codegen": params["codegen"]})
    with torch.no_grad():
        run(input_ids=example, use_cache=False)  # compile
        from memsave.memory.track import MemoryTracker

        with MemoryTracker("cpu") as tracker:
            run(input_ids=example, use_cache=False)
        out["call_peak_mib"] = tracker.stats.peak_bytes / MiB
        out["ppl"] = docs_lm.perplexity(logits(run), tokens, window=window, batch=batch)
    if variant.startswith("torchao") or variant == "fp32":
        out["weight_mib"] = sum(t.untyped_storage().nbytes() for t in _tensors(model)) / MiB
    else:
        out["weight_mib"] = WEIGHTS.held_bytes(weights) / MiB
    from memsave.calibrate import CALIBRATION

    out["calibration_mib"] = sum(
        sum(t.numel() * t.element_size() for t in (s.mean_abs, s.sample, s.gram, s.sq_mean) if t is not None)
        for s in {id(v): v for v in CALIBRATION.values()}.values()) / MiB
    out["total_mib"] = out["weight_mib"] + out["call_peak_mib"]
    out["rss_growth_mib"] = (rss_bytes() - rss0) / MiB
    if plan is None and "predicted_error" not in out and variant == "fp32":
        out["predicted_error"] = 0.0
    return out


def _tensors(model):
    """Every storage the model's parameters and buffers hold (torchao's subclasses: their parts)."""
    seen, found = set(), []
    for t in list(model.parameters()) + list(model.buffers()):
        parts = [t]
        if hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            parts = [getattr(t, n) for n in names]
        for p in parts:
            ptr = p.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                found.append(p)
    return found


def _median(results: dict, config: str, metric: str):
    """Median over the config's runs, for the reported metrics and the JSON-only ones alike."""
    values = [r["metrics"][metric] for r in results["runs"] if r["config"] == config and r["ok"] and metric in r["metrics"]]
    return statistics.median(values) if values else None


def _spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for rank, i in enumerate(order):
            r[i] = float(rank)
        return r

    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.mean(rx), statistics.mean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry))


def sections(results: dict) -> str:
    ran = [c for c in results["configs"] if _median(results, c, "ppl") is not None]
    plans = [c for c in ran if ".plan-" in c]
    uniform = [c for c in ran if c not in plans and not c.endswith("fp32")]
    fp32 = _median(results, "lm.fp32", "ppl")
    lines = ["", "## Plans against the uniform configurations", "",
             "Best uniform = the lowest perplexity among uniform configurations whose measured weight bytes fit the "
             "plan's weight share of the budget (budget minus the planner's measured working memory).", "",
             "| plan | budget MiB | weights MiB (plan's count / measured) | call peak MiB | total MiB | within budget "
             "| ppl | best uniform that fits | its ppl | plan better |", "|---|---:|---:|---:|---:|---|---:|---|---:|---|"]
    better = 0
    for c in plans:
        budget, weights, ppl = (_median(results, c, m) for m in ("budget_mib", "weight_mib", "ppl"))
        planned, peak, total = (_median(results, c, m) for m in ("planned_weight_mib", "call_peak_mib", "total_mib"))
        share = int(c.split("-")[1]) / 100 * _median(results, c, "fp32_weight_mib")
        fits = [(u, _median(results, u, "ppl")) for u in uniform if (_median(results, u, "weight_mib") or 1e18) <= share]
        best = min(fits, key=lambda t: t[1]) if fits else None
        verdict = "–" if best is None else ("yes" if ppl < best[1] else ("equal" if ppl == best[1] else "NO"))
        better += best is not None and ppl < best[1]
        lines.append(f"| {c} | {budget:.2f} | {planned:.2f} / {weights:.2f} | {peak:.2f} | {total:.2f} | "
                     f"{'yes' if total <= budget else 'NO'} | {ppl:.5f} | {best[0] if best else 'none fits'} | "
                     f"{best[1]:.5f} | {verdict} |" if best else
                     f"| {c} | {budget:.2f} | {planned:.2f} / {weights:.2f} | {peak:.2f} | {total:.2f} | "
                     f"{'yes' if total <= budget else 'NO'} | {ppl:.5f} | none fits | – | (meets a budget no uniform "
                     f"configuration meets) |")
    lines += ["", f"Plan strictly better than the best uniform configuration that fits: {better} of {len(plans)} budgets."]
    scored = [c for c in ran if _median(results, c, "predicted_error") is not None and fp32 is not None]
    if len(scored) >= 3:
        pred = [_median(results, c, "predicted_error") for c in scored]
        meas = [_median(results, c, "ppl") - fp32 for c in scored]
        lines += ["", f"Predicted error ranks measured perplexity increase with Spearman ρ = {_spearman(pred, meas):.3f} "
                  f"over {len(scored)} configurations (plans and uniform configurations, fp32 included)."]
    lines += ["", "RSS growth includes what a process holds beside the weights: the calibration statistics "
              "(`calibration_mib` in the JSON: Gram matrices of every linear's inputs, kept while their weights "
              "live), compiled code and allocator slack.", ""]
    return "\n".join(lines)


def draw(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for kind, marker in (("plan", "o-"), ("uniform", "s"), ("other", "^")):
        pts = []
        for c in results["configs"]:
            x, y = _median(results, c, "weight_mib"), _median(results, c, "ppl")
            is_plan = ".plan-" in c
            group = "plan" if is_plan else ("other" if "torchao" in c or c.endswith("fp32") else "uniform")
            if x is not None and y is not None and group == kind:
                pts.append((x, y, c.split(".", 1)[1]))
        pts.sort()
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, label={"plan": "memsave.plan", "uniform":
                    "uniform memsave", "other": "fp32 / torchao int8"}[kind])
            for x, y, name in pts:
                ax.annotate(name, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("weight MiB (measured)")
    ax.set_ylabel("held-out perplexity per byte")
    ax.set_title("docs LM: quality vs bytes", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


BENCH = Benchmark(
    name="budget",
    title="Fit a budget: memsave.plan vs uniform quantization at the same bytes (docs LM, held-out perplexity)",
    configs=CONFIGS,
    baseline="lm.fp32",
    measure=measure,
    metrics={"ppl": "lower", "weight_mib": "lower", "total_mib": "lower", "rss_growth_mib": "lower"},
    params=PARAMS,
    quick=QUICK,
    quick_configs=QUICK_CONFIGS,
    repeats=1,  # quality and bytes are deterministic; no time is measured
    timeout_s=1200.0,
    default_allocator=True,
    report=with_sections(sections),
    draw=draw,
)


if __name__ == "__main__":
    main(BENCH)
