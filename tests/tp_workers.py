"""Spawned ranks for tests/test_shard_tensor.py (mp.spawn needs module-level targets).

`spawn(task, world, **kwargs)` starts `world` gloo ranks on this machine, runs the task
function named `task` on each and returns their results (a list by rank). Every collective has
a timeout (init_process_group's) and the whole run a deadline, so a rank that hangs fails the
test instead of blocking the suite.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import memsave
from memsave.models.decoder import build_decoder, decoder_inputs

DEADLINE_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(task: str, world: int, **kwargs) -> list:
    with tempfile.TemporaryDirectory() as out:
        port = free_port()
        context = mp.spawn(_rank_main, args=(world, port, task, kwargs, out), nprocs=world, join=False)
        deadline = time.monotonic() + DEADLINE_S
        try:
            while not context.join(timeout=1):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"tensor-parallel task {task!r} on {world} ranks ran past {DEADLINE_S} s")
        finally:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
        return [torch.load(os.path.join(out, f"{rank}.pt"), weights_only=False) for rank in range(world)]


def _rank_main(rank: int, world: int, port: int, task: str, kwargs: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # world ranks share 2 cores
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=150))
    try:
        result = TASKS[task](rank, world, **kwargs)
        torch.save(result, os.path.join(out, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def build(model: str, overrides: dict):
    """The models under test, seeded so every rank and the test process build the same weights."""
    if model == "decoder":
        m = build_decoder("tiny", **overrides)
        return m, decoder_inputs(m, batch=2, seq=8, labels=True)
    if model == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        from memsave.models.hf import LLAMA_SIZES, HFCausalLM, hf_inputs

        kwargs = dict(LLAMA_SIZES["tiny"], **overrides)
        config = LlamaConfig(**kwargs, rms_norm_eps=1e-5, attention_dropout=0.0, use_cache=False, attn_implementation="eager")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            m = HFCausalLM(LlamaForCausalLM(config)).eval()
        (ids,) = hf_inputs(m, batch=2, seq=8)
        return m, (ids,)
    raise ValueError(model)


def _shard_info(model) -> dict:
    from memsave.passes.dynamo.shard_tensor import _SHARDS

    info = {}
    for name, param in model.named_parameters():
        entry = _SHARDS.get(param)
        if entry is not None:
            info[name] = (entry.dim, entry.rank, entry.world)
    return info


def other_inputs(model: str, m) -> torch.Tensor:
    """Token ids of another shape (batch 3, 12 tokens) than `build`'s."""
    from memsave.models.hf import hf_inputs

    return decoder_inputs(m, batch=3, seq=12)[0] if model == "decoder" else hf_inputs(m, batch=3, seq=12)[0]


def run(
    rank: int, world: int, model: str, overrides: dict, options: dict, *, quantize: bool = False,
    new_shape: bool = False, lr: float = 0.5, tp_groups: list | None = None,
) -> dict:
    """Inference, then a training step with an optimizer on the shards, on one model; with
    `quantize`, int8 inference on a second copy. One process start for all of it: starting
    ranks costs more than the checks."""
    result = {}
    if tp_groups:  # e.g. [[0, 1], [2, 3]]: tensor parallel within each pair (a 2x2 grid's TP groups)
        groups = [dist.new_group(ranks) for ranks in tp_groups]  # every rank creates every group
        mine = next(g for g, ranks in zip(groups, tp_groups) if rank in ranks)
        tp = options["tensor_parallel"]
        tp = {"group": mine} if tp == "auto" else {**tp, "group": mine}
        options = {**options, "tensor_parallel": tp}
        result["tp_rank"], result["tp_world"] = dist.get_rank(mine), dist.get_world_size(mine)
    m, inputs = build(model, overrides)
    compiled = torch.compile(m, backend="memsave", options=options)
    with torch.no_grad(), memsave.collect() as reports:
        result["out"] = compiled(inputs[0])
    result["tp_records"] = [r.details for report in reports for r in report.records if r.name == "shard_tensor"]
    with torch.no_grad():
        result["again"] = compiled(inputs[0])  # the second call runs the compiled code alone
        if new_shape:  # a recompile, with dynamic batch/sequence sizes: shards are reused
            result["other_shape"] = compiled(other_inputs(model, m))
    result["shards"] = _shard_info(m)
    result["bytes"] = memsave.tp_parameter_bytes(m)

    m.train()  # recompiles: a training graph, with tp_copy where gradients need summing
    loss = compiled(*inputs) if model == "decoder" else compiled(inputs[0]).square().mean()
    loss.backward()
    params = dict(memsave.named_sharded_parameters(m))
    result["loss"] = loss.detach()
    result["grads"] = {name: p.grad.clone() for name, p in params.items()}
    torch.optim.SGD(memsave.sharded_parameters(m), lr=lr).step()
    result["stepped"] = {name: p.detach().clone() for name, p in params.items()}

    if quantize:
        q, _ = build(model, overrides)
        compiled_q = torch.compile(q, backend="memsave", options={**options, "quantize": "int8"})
        with torch.no_grad():
            result["int8_out"] = compiled_q(inputs[0])
        result["int8_shards"] = _shard_info(q)
    return result


def world_and_pairs(rank: int, world: int, pair_overrides: dict, **kwargs) -> dict:
    """`run` over the whole world, then `run` on another model split within rank pairs."""
    whole = run(rank, world, **kwargs)
    pairs = run(rank, world, **{**kwargs, "overrides": pair_overrides}, tp_groups=[[0, 1], [2, 3]])
    return {"world": whole, "pairs": pairs}


TASKS = {"run": run, "world_and_pairs": world_and_pairs}
