"""Module-level rank functions for the multi-process tests (spawn pickles targets by name).

Each worker builds the model on its rank from the same seed, computes the single-process
reference first (in eager, before compiling: compiling frees other stages' weights on this
rank), then runs the pipelined model and returns what the test compares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import memsave.distributed as md


def _build(model_name: str):
    if model_name == "decoder":
        from memsave.models import build_decoder

        model = build_decoder("tiny", n_layers=4)
        vocab = model.config.vocab_size
    elif model_name == "decoder-tied":  # lm_head.weight is embed_tokens.weight: read by two stages
        from memsave.models import build_decoder

        model = build_decoder("tiny", n_layers=4, tie_embeddings=True)
        vocab = model.config.vocab_size
    elif model_name == "hf-llama":
        from memsave.models import build_hf_llama

        model = build_hf_llama("tiny")
        vocab = model.config.vocab_size
    else:
        raise ValueError(model_name)
    return model, vocab


def _inputs(vocab: int, batch: int, seq: int):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    target = torch.randint(0, vocab, (batch, seq), generator=g)
    return ids, target


def lm_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def pipeline_inference(rank: int, world: int, model_name: str, options: dict, batch: int = 4, seq: int = 8):
    model, vocab = _build(model_name)
    ids, _ = _inputs(vocab, batch, seq)
    with torch.no_grad():
        expected = model(ids)
    compiled = torch.compile(model, backend="memsave", dynamic=True, options=options)
    with torch.no_grad():
        got = compiled(ids)
    runtime = md.last_runtime()
    return {
        "max_diff": (got - expected).abs().max().item(),
        "shape": tuple(got.shape),
        "stage": runtime.stage_index,
        "plan": runtime.describe(),
        "kept_bytes": runtime.kept_bytes,
        "released_bytes": runtime.released_bytes,
        "total_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def pipeline_training(rank: int, world: int, model_name: str, options: dict, batch: int = 4, seq: int = 8,
                      infer_first: bool = False):
    model, vocab = _build(model_name)
    ids, target = _inputs(vocab, batch, seq)
    logits = model(ids)
    expected_logits = logits.detach().clone()
    inference_diff = 0.0
    expected_loss = lm_loss(logits, target)
    expected_loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, backend="memsave", dynamic=True, options=options)
    if infer_first:  # a no_grad compile first: the training compile must keep its cuts
        with torch.no_grad():
            inference_diff = (compiled(ids) - expected_logits).abs().max().item()
    loss = md.train_step(compiled, ids, target=target, loss_fn=lm_loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    diffs = {n: (g - expected[n]).abs().max().item() for n, g in grads.items()}
    return {
        "loss_diff": abs(loss.item() - expected_loss.item()),
        "inference_diff": inference_diff,
        "grad_diffs": diffs,
        "grad_scale": max(g.abs().max().item() for g in expected.values()),
        "stage": md.last_runtime().stage_index,
        "n_params": len(expected),
    }


def pipeline_quantized_inference(rank: int, world: int, model_name: str, options: dict, batch: int = 4, seq: int = 8):
    """A compressed model, sharded: the reference is the same compression on one process."""
    reference_model, vocab = _build(model_name)
    ids, _ = _inputs(vocab, batch, seq)
    compression = {k: v for k, v in options.items() if k != "pipeline"}
    with torch.no_grad():
        expected = torch.compile(reference_model, backend="memsave", dynamic=True, options=compression)(ids)
    model, _ = _build(model_name)
    with torch.no_grad():
        fp32 = model(ids)
    compiled = torch.compile(model, backend="memsave", dynamic=True, options=options)
    with torch.no_grad():
        got = compiled(ids)
    from memsave.weights import is_released

    return {
        "max_diff": (got - expected).abs().max().item(),
        "quantization_error": (got - fp32).abs().max().item(),
        "stage": md.last_runtime().stage_index,
        # quantize released this stage's fp32 weights too: none of the model's linears is left
        "fp32_linear_bytes_held": sum(
            p.untyped_storage().nbytes() for n, p in model.named_parameters() if n.endswith("proj.weight")
        ),
        "released_any": any(is_released(p) for p in model.parameters()),
    }


def pipeline_scenarios(rank: int, world: int, model_name: str, scenarios: list[tuple[str, dict]]):
    """Several (mode, options) runs in one launch: starting ranks is the slow part of a test."""
    run = {
        "inference": pipeline_inference,
        "training": pipeline_training,
        "inference+training": lambda *a: pipeline_training(*a, infer_first=True),
        "quantized": pipeline_quantized_inference,
    }
    return [run[mode](rank, world, model_name, options) for mode, options in scenarios]


def return_rank(rank: int, world: int, offset: int):
    return (rank + offset, world)


def hang_on_rank(rank: int, world: int, bad_rank: int):
    import time

    if rank == bad_rank:
        time.sleep(3600)  # never returns: the launcher's deadline must end the run
    return rank


def raise_on_rank(rank: int, world: int, bad_rank: int):
    import torch.distributed as dist

    if rank == bad_rank:
        raise ValueError(f"boom from rank {rank}")
    dist.barrier()  # the others wait for the failed rank: without fault handling, a hang
    return rank


def mesh_pipeline(rank: int, world: int, pp_size: int, tp_size: int):
    """A pp x tp grid: the groups, a collective on each, and a pipeline over this rank's pp group
    (no tensor_parallel option here: the tp ranks run identical replicas; see
    pipeline_and_tensor_parallel for the split)."""
    import torch.distributed as dist

    mesh = md.init_mesh(pp_size, tp_size)
    try:
        ones = torch.ones(())
        dist.all_reduce(ones, group=mesh.tp_group)
        tp_sum = ones.item()
        ones = torch.ones(())
        dist.all_reduce(ones, group=mesh.pp_group)
        pp_sum = ones.item()
        result = pipeline_inference(rank, world, "decoder",
                                    {"pipeline": {"schedule": "1f1b", "microbatches": 2, "compile_stages": False}})
    finally:
        md.clear_mesh()
    return {"pp_ranks": mesh.pp_ranks, "tp_ranks": mesh.tp_ranks, "tp_sum": tp_sum, "pp_sum": pp_sum,
            "pp_rank": mesh.pp_rank, "tp_rank": mesh.tp_rank, "stage": result["stage"], "max_diff": result["max_diff"]}



def pipeline_and_tensor_parallel(rank: int, world: int, pipeline: dict, extra: dict, batch: int = 4, seq: int = 8):
    """A 2x2 grid: the decoder cut into 2 pipeline stages, each stage split across its 2
    tensor-parallel ranks, once with init_mesh's groups and once with groups given in the
    options; HF Llama with init_mesh's groups under the other schedule. Each: inference, then a train_step, against the single-process model (a split
    weight's gradient against its block of the full gradient)."""
    import torch.distributed as dist

    mesh = md.init_mesh(2, 2)
    try:
        results = {"mesh": _pp_tp_run({"pipeline": pipeline, "tensor_parallel": {}, **extra}, batch, seq)}
        # HF Llama on the same grid, under the other schedule.
        other = "gpipe" if pipeline.get("schedule", "1f1b") == "1f1b" else "1f1b"
        results["hf-llama"] = _pp_tp_run(
            {"pipeline": {**pipeline, "schedule": other}, "tensor_parallel": {}, **extra}, batch, seq, "hf-llama"
        )
        results["errors"] = _pp_tp_errors(pipeline, mesh)
    finally:
        md.clear_mesh()
    pp_groups, tp_groups = md.mesh_ranks(2, 2)
    made = [(dist.new_group(r), r) for r in pp_groups + tp_groups]  # every rank makes every group
    pp_group = next(g for g, r in made[:2] if rank in r)
    tp_group = next(g for g, r in made[2:] if rank in r)
    options = {"pipeline": {**pipeline, "group": pp_group}, "tensor_parallel": {"group": tp_group}, **extra}
    results["explicit"] = _pp_tp_run(options, batch, seq)
    results["pp_rank"], results["tp_rank"] = mesh.pp_rank, mesh.tp_rank
    return results


def _pp_tp_run(options: dict, batch: int, seq: int, model_name: str = "decoder") -> dict:
    import memsave
    from memsave.models import build_decoder, build_hf_llama
    from memsave.passes.dynamo.shard_tensor import _SHARDS

    # dropout 0 in both
    model = build_decoder("tiny", n_layers=2) if model_name == "decoder" else build_hf_llama("tiny")
    ids, target = _inputs(model.config.vocab_size, batch, seq)
    logits = model(ids)
    expected_loss = lm_loss(logits, target)
    expected_loss.backward()
    expected_logits = logits.detach().clone()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    compiled = torch.compile(model, backend="memsave", dynamic=True, options=options)
    with torch.no_grad():
        inference_diff = (compiled(ids) - expected_logits).abs().max().item()
    loss = md.train_step(compiled, ids, target=target, loss_fn=lm_loss)

    grad_diffs, split = {}, {}
    for (name, full), (_, param) in zip(model.named_parameters(), memsave.named_sharded_parameters(model)):
        if param.grad is None:
            continue
        want = expected[name]
        entry = _SHARDS.get(full)
        if entry is not None:  # this rank's block of the full gradient
            size = want.shape[entry.dim] // entry.world
            want = want.narrow(entry.dim, entry.rank * size, size)
            split[name] = (entry.dim, entry.rank, entry.world)
            assert param.shape == want.shape, (name, param.shape, want.shape)
        grad_diffs[name] = (param.grad - want).abs().max().item()
    return {
        "inference_diff": inference_diff,
        "loss_diff": abs(loss.item() - expected_loss.item()),
        "grad_diffs": grad_diffs,
        "split": split,
        "n_params": len(expected),
        "stage": md.last_runtime().stage_index,
    }


def _pp_tp_errors(pipeline: dict, mesh) -> dict:
    """Combinations that cannot work, refused at compile time with the reason."""
    from memsave.models import build_decoder

    bad = {
        "compile_stages": {"pipeline": {**pipeline, "compile_stages": False}, "tensor_parallel": {}},
        "same_group": {"pipeline": pipeline, "tensor_parallel": {"group": mesh.pp_group}},
    }
    messages = {}
    for name, options in bad.items():
        model = build_decoder("tiny", n_layers=2)
        ids, _ = _inputs(model.config.vocab_size, 4, 8)
        try:
            with torch.no_grad():
                torch.compile(model, backend="memsave", dynamic=True, options=options)(ids)
            messages[name] = None
        except Exception as e:  # Dynamo wraps the backend's OptionError
            messages[name] = str(e)
    return messages


def _meta_copy(model_name: str, reference):
    """The same architecture as `reference`, built on the meta device (no weights at all)."""
    with torch.device("meta"):
        if model_name.startswith("decoder"):
            from memsave.models.decoder import Decoder

            return Decoder(reference.config)
        from memsave.models.hf import HFCausalLM

        return HFCausalLM(type(reference.model)(reference.model.config))


def _held_bytes(model) -> int:
    tensors = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.untyped_storage().nbytes() for t in tensors.values())


def deferred_scenarios_by_model(rank: int, world: int, paths: dict[str, str], scenarios: list[tuple[str, str, dict]]):
    """Models built on meta and given storage-less weights (defer_weights): each rank reads only
    its stage's weights from the file paths[model_name] (save_weights of the seeded model)."""
    results = []
    for mode, model_name, options in scenarios:
        reference, vocab = _build(model_name)
        ids, target = _inputs(vocab, 4, 8)
        model = md.defer_weights(_meta_copy(model_name, reference))
        held_before = _held_bytes(model)
        if mode == "errors":
            results.append(_deferred_errors(model_name, reference, ids, options))
            continue
        pipeline = {**options["pipeline"], "weights": paths[model_name]}
        compiled = torch.compile(model, backend="memsave", dynamic=True, options={**options, "pipeline": pipeline})
        result = {"held_before": held_before}
        if mode == "inference":
            with torch.no_grad():
                result["max_diff"] = (compiled(ids) - reference(ids)).abs().max().item()
        else:
            expected_loss = lm_loss(reference(ids), target)
            expected_loss.backward()
            expected = {n: p.grad for n, p in reference.named_parameters()}
            loss = md.train_step(compiled, ids, target=target, loss_fn=lm_loss)
            # A second step without zero_grad: tied gradients must accumulate, not double.
            md.train_step(compiled, ids, target=target, loss_fn=lm_loss)
            result["loss_diff"] = abs(loss.item() - expected_loss.item())
            result["grad_diffs"] = {n: (p.grad / 2 - expected[n]).abs().max().item()
                                    for n, p in model.named_parameters() if p.grad is not None}
        runtime = md.last_runtime()
        result.update(
            stage=runtime.stage_index, kept_bytes=runtime.kept_bytes, materialized=runtime.materialized_bytes,
            held_after=_held_bytes(model), total_bytes=_held_bytes(reference),
            with_storage=sorted(n for n, p in model.named_parameters() if p.untyped_storage().nbytes()),
        )
        results.append(result)
    return results


def _deferred_errors(model_name: str, reference, ids, options) -> dict:
    """What a rank says when its stage's weights cannot be read."""
    sources = {
        "no_source": None,
        "missing": {"embed_tokens.weight": reference.embed_tokens.weight},
        "shape": lambda name: torch.zeros(3),
    }
    errors = {}
    for what, source in sources.items():
        model = md.defer_weights(_meta_copy(model_name, reference))
        pipeline = {**options["pipeline"], "weights": source}
        compiled = torch.compile(model, backend="memsave", dynamic=True, options={**options, "pipeline": pipeline})
        try:
            with torch.no_grad():
                compiled(ids)
            errors[what] = "no error"
        except Exception as e:  # Dynamo wraps the backend's error; its message carries ours
            errors[what] = str(e)
    plain = md.defer_weights(_meta_copy(model_name, reference))
    try:
        torch.compile(plain, backend="memsave", dynamic=True)(ids)
        errors["no_pipeline"] = "no error"
    except Exception as e:
        errors["no_pipeline"] = str(e)
    return errors
