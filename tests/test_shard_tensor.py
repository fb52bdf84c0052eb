"""Tensor parallelism (memsave/passes/dynamo/shard_tensor.py): spawned gloo ranks on the CPU must
reproduce the single-process model — outputs, gradients and an optimizer step — in fp32.

Each spawning test starts its ranks once and checks inference, training and the optimizer
step on them (process start dominates the cost). The reference is the same seeded model run
eagerly in the test process.
"""

from __future__ import annotations

import pytest
import torch

import memsave
from memsave.config import Config, OptionError
from memsave.ops.affine import dequantize_affine, quantize_weight
from memsave.passes.dynamo.shard_tensor import TensorParallelError
import tp_workers
from tp_workers import build, spawn

# Under `pytest -n 2` the multi-process tests run one after another on one worker: ranks of two
# of them at once would oversubscribe the cores past their deadlines.
pytestmark = pytest.mark.xdist_group("distributed")

ATOL = 1e-5
OPTIONS = {"tensor_parallel": "auto", "codegen": "fx", "debug": False}
LR = 0.5
COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW = ("o_proj", "down_proj")


def _block(full: torch.Tensor, shard_info: tuple) -> torch.Tensor:
    dim, rank, world = shard_info
    size = full.shape[dim] // world
    return full.narrow(dim, rank * size, size)


def _reference(model: str, overrides: dict):
    m, inputs = build(model, overrides)
    with torch.no_grad():
        out = m(inputs[0])
    m.train()
    loss = m(*inputs) if model == "decoder" else m(inputs[0]).square().mean()
    loss.backward()
    grads = {name: p.grad.clone() for name, p in m.named_parameters()}
    torch.optim.SGD(m.parameters(), lr=LR).step()
    stepped = {name: p.detach().clone() for name, p in m.named_parameters()}
    return out, loss.detach(), grads, stepped


def _check_ranks(results: list, model: str, overrides: dict, world: int, vocab_parallel: bool = False) -> None:
    out, loss, grads, stepped = _reference(model, overrides)
    n_linears = len(COLUMN) + len(ROW)
    vocab = ("lm_head", "embed_tokens") if vocab_parallel else ()
    n_layers = build(model, overrides)[0].config.num_hidden_layers if model == "llama" else build(model, overrides)[0].config.n_layers
    for rank, r in enumerate(results):
        # Which weights were split, and how: every attention/MLP linear, the LM head kept whole.
        shards = r["shards"]
        assert len(shards) == n_linears * n_layers + len(vocab)
        for name, (dim, shard_rank, shard_world) in shards.items():
            kind = name.split(".")[-2]
            assert (shard_rank, shard_world) == (r.get("tp_rank", rank), world)
            assert dim == (0 if kind in COLUMN + vocab else 1), name
        assert not any(("lm_head" in n or "embed" in n) and not vocab or "norm" in n for n in shards)

        torch.testing.assert_close(r["out"], out, atol=ATOL, rtol=0)
        torch.testing.assert_close(r["again"], out, atol=ATOL, rtol=0)
        torch.testing.assert_close(r["loss"], loss, atol=ATOL, rtol=0)
        assert set(r["grads"]) == set(grads)
        for name, grad in r["grads"].items():
            expected = _block(grads[name], shards[name]) if name in shards else grads[name]
            assert grad.shape == expected.shape, name
            torch.testing.assert_close(grad, expected, atol=ATOL, rtol=0, msg=lambda m: f"{name}: {m}")
            expected_step = _block(stepped[name], shards[name]) if name in shards else stepped[name]
            torch.testing.assert_close(r["stepped"][name], expected_step, atol=ATOL, rtol=0)
    # Replicated parameters (norms, embeddings, LM head) get the same gradient on every rank.
    for name in grads:
        if name not in results[0]["shards"]:
            for r in results[1:]:
                assert torch.equal(r["grads"][name], results[0]["grads"][name]), name


def _check_bytes(results: list, world: int) -> None:
    for r in results:
        b = r["bytes"]
        assert b["sharded"] == b["full_of_sharded"] // world  # each rank holds exactly 1/N of the split weights
        assert b["held"] == b["sharded"] + b["replicated"]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_decoder_two_ranks_match_single_process_and_int8_shards_are_exact():
    overrides: dict = {}
    results = spawn("run", 2, model="decoder", overrides=overrides, options=OPTIONS, quantize=True, new_shape=True, lr=LR)
    _check_ranks(results, "decoder", overrides, 2)
    m, _ = build("decoder", overrides)
    with torch.no_grad():
        expected_other = m(tp_workers.other_inputs("decoder", m))
    for r in results:  # the recompile for a new input shape (dynamic sizes) still splits right
        torch.testing.assert_close(r["other_shape"], expected_other, atol=ATOL, rtol=0)
    _check_bytes(results, 2)
    # The split is in the compile's report, like any pass: per layer q, k, v, gate, up by
    # columns, o and down by rows; this rank holds half of the split weights' bytes.
    n_layers = m.config.n_layers
    for rank, r in enumerate(results):
        (record,) = r["tp_records"]
        assert (record["rank"], record["world"]) == (rank, 2)
        assert (record["column"], record["row"], record["vocab"]) == (5 * n_layers, 2 * n_layers, 0)
        assert record["split_bytes_after"] * 2 == record["split_bytes_before"] > 0
    # int8 after sharding quantizes each rank's shard on its own: per output channel of the
    # shard. The reference model holds exactly that: each split weight's blocks quantized one
    # by one and put back together, the LM head (kept whole) quantized whole.
    m, inputs = build("decoder", overrides)
    shards = results[0]["int8_shards"]
    with torch.no_grad():
        for name, param in m.named_parameters():
            if name.endswith(".weight") and param.dim() == 2 and "embed" not in name:
                if name in shards:
                    dim = shards[name][0]
                    blocks = [_int8(b) for b in param.chunk(2, dim=dim)]
                    param.copy_(torch.cat(blocks, dim=dim))
                else:
                    param.copy_(_int8(param))
        expected = m(inputs[0])
    for r in results:
        torch.testing.assert_close(r["int8_out"], expected, atol=ATOL, rtol=0)


def _int8(w: torch.Tensor) -> torch.Tensor:
    packed, scale, offset = quantize_weight(w, 8)
    return dequantize_affine(packed, scale, offset, 8, w.shape[1], w.shape[1], w.dtype)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_decoder_four_ranks_with_gqa_and_vocab_parallel_and_two_rank_groups_match_single_process():
    """Four ranks: the whole world with vocab_parallel (embedding and LM head split by
    vocabulary rows), then another model split within the pairs {0, 1} and {2, 3} (the
    tensor-parallel groups of a 2x2 grid, passed as options["tensor_parallel"]["group"])."""
    overrides = {"n_heads": 8, "n_kv_heads": 4, "n_layers": 1}  # 4 KV heads: one per rank
    pair_overrides = {"n_layers": 1}
    options = {**OPTIONS, "tensor_parallel": {"vocab_parallel": True}}
    results = spawn("world_and_pairs", 4, model="decoder", overrides=overrides, pair_overrides=pair_overrides,
                    options=options, lr=LR)
    whole = [r["world"] for r in results]
    _check_ranks(whole, "decoder", overrides, 4, vocab_parallel=True)
    _check_bytes(whole, 4)
    assert all(r["bytes"]["replicated"] == 3 * 64 * 4 for r in whole)  # only the 3 norms (hidden 64, fp32)
    pairs = [r["pairs"] for r in results]
    assert [(r["tp_rank"], r["tp_world"]) for r in pairs] == [(0, 2), (1, 2), (0, 2), (1, 2)]
    _check_ranks(pairs, "decoder", pair_overrides, 2, vocab_parallel=True)
    _check_bytes(pairs, 2)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_hf_llama_two_ranks_match_single_process():
    overrides = {"num_hidden_layers": 1}
    results = spawn("run", 2, model="llama", overrides=overrides, options=OPTIONS, lr=LR)
    _check_ranks(results, "llama", overrides, 2)


def test_check_before_spawning_names_sizes_that_do_not_divide():
    m, inputs = build("decoder", {})  # 4 query heads, 2 key/value heads
    summary = memsave.check_tensor_parallel(m, inputs[0], world_size=2)
    assert sorted(n.split(".")[-2] for n in summary["column_parallel"]) == sorted(COLUMN * 2)
    assert sorted(n.split(".")[-2] for n in summary["row_parallel"]) == sorted(ROW * 2)
    assert list(summary["replicated"]) == ["lm_head.weight"]
    torch._dynamo.reset()
    with pytest.raises(TensorParallelError, match=r"(?s)cannot be split across 4 ranks.*is 2, which does not divide by 4"):
        memsave.check_tensor_parallel(m, inputs[0], world_size=4)
    torch._dynamo.reset()
    with pytest.raises(TensorParallelError, match=r"is 176, which does not divide by 3"):
        memsave.check_tensor_parallel(m, inputs[0], world_size=3)


def test_backend_raises_before_any_collective_on_a_fake_process_group():
    """The same check inside the backend: a fake 4-rank group (one process) is enough, as the
    error comes before any collective runs."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    m, inputs = build("decoder", {})
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    try:
        compiled = torch.compile(m, backend="memsave", options=OPTIONS)
        with pytest.raises(TensorParallelError, match=r"is 2, which does not divide by 4"):
            compiled(inputs[0])
    finally:
        dist.destroy_process_group()
    assert all(p.untyped_storage().nbytes() > 0 for p in m.parameters())  # nothing released


def test_options():
    assert Config.from_options({"tensor_parallel": "auto"}).tensor_parallel.include == ("*",)
    config = Config.from_options({"tensor_parallel": {"exclude": "layers.0.*"}}).tensor_parallel
    assert config.exclude == ("layers.0.*",) and config.group is None
    with pytest.raises(OptionError, match="unknown key 'heads'"):
        Config.from_options({"tensor_parallel": {"heads": 2}})
    with pytest.raises(OptionError, match="expected a torch.distributed ProcessGroup"):
        Config.from_options({"tensor_parallel": {"group": 3}})
    with pytest.raises(OptionError, match="valid choices: 'none', 'auto'"):
        Config.from_options({"tensor_parallel": "megatron"})


def test_without_torch_distributed_the_error_says_how_to_launch():
    m, inputs = build("decoder", {})
    with pytest.raises(TensorParallelError, match="torchrun --nproc-per-node N"):
        torch.compile(m, backend="memsave", options=OPTIONS)(inputs[0])



def test_hf_llama_with_sdpa_attention_splits_every_attention_and_mlp_linear():
    from memsave.models.hf import build_hf_llama, hf_inputs

    m = build_hf_llama("tiny", attn_implementation="sdpa")
    summary = memsave.check_tensor_parallel(m, hf_inputs(m, batch=2, seq=8)[0], world_size=2)
    assert sorted(n.split(".")[-2] for n in summary["column_parallel"]) == sorted(COLUMN * 2)
    assert sorted(n.split(".")[-2] for n in summary["row_parallel"]) == sorted(ROW * 2)
    assert list(summary["replicated"]) == ["model.lm_head.weight"]


class _CumsumMLP(torch.nn.Module):
    """up → cumsum over the features → down: cumsum mixes the features, so no split is exact."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(8, 16)
        self.down = torch.nn.Linear(16, 8)
        self.other_up = torch.nn.Linear(8, 16, bias=False)
        self.other_down = torch.nn.Linear(16, 8, bias=False)

    def forward(self, x):
        return self.down(torch.cumsum(self.up(x), -1)) + self.other_down(torch.relu(self.other_up(x)))


def test_an_op_without_a_rule_keeps_its_linears_whole_and_the_rest_is_split():
    m = _CumsumMLP()
    x = torch.randn(2, 8)
    summary = memsave.check_tensor_parallel(m, x, world_size=2)
    assert summary["column_parallel"] == ["other_up.weight"]
    assert summary["row_parallel"] == ["other_down.weight"]
    assert "cumsum" in summary["replicated"]["up.weight"]
    torch._dynamo.reset()
    summary = memsave.check_tensor_parallel(m, x, world_size=2, exclude=["other_down.*"])
    assert summary["column_parallel"] == [] and summary["row_parallel"] == []
    assert "include/exclude" in summary["replicated"]["other_down.weight"]
