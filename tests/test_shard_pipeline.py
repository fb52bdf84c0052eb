"""Pipeline split and runtime.

In one process: the split of the decoder's Dynamo graph (stage graphs run one after another
reproduce the model; every parameter lives in exactly one stage; one hidden state crosses each
cut), memory balancing, and errors. On 2 and 4 spawned gloo ranks: outputs and gradients of
GPipe and 1F1B runs against the single-process model, for the built-in decoder and HF Llama.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch

import memsave.distributed as md
from memsave.graph.inputs import describe_inputs
from memsave.config import Config, OptionError, PipelineConfig
from memsave.distributed.runtime import _graph_inputs
from memsave.distributed.validate import check_pipeline
from memsave.models import build_decoder
from memsave.passes.dynamo import shard_pipeline
from memsave.passes.dynamo.shard_pipeline import fold_lifted_scalars, split_graph

sys.path.insert(0, str(Path(__file__).parent))
import distributed_workers as workers  # noqa: E402  (module-level spawn targets)

# Under `pytest -n 2` the multi-process tests run one after another on one worker: ranks of two
# of them at once would oversubscribe the cores past their deadlines.
pytestmark = pytest.mark.xdist_group("distributed")

ATOL = 1e-5  # fp32: a pipeline reorders nothing inside a stage, so only summation order differs


def _capture(model, *inputs):
    """The Dynamo graph memsave's backend would get, its input descriptions and real inputs."""
    captured = []

    def backend(gm, example_inputs):
        described = _graph_inputs(gm, example_inputs, describe_inputs(gm, example_inputs))
        fold_lifted_scalars(gm, described, example_inputs)
        captured.append((gm, described, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend, dynamic=True, fullgraph=True)(*inputs)
    return captured[0]


def _run_stages(plan, described, real):
    """Run the stage graphs one after another in this process, as the ranks would."""
    value = {d.name: v for d, v in zip(described, real)}
    acts = [value[n] for n in plan.stages[0].inputs]
    for stage in plan.stages:
        args = [value[w] for w in stage.weights] + [int(value[s]) for s in stage.scalars] + acts
        acts = list(stage.gm(*args))
    return acts


@pytest.fixture(scope="module")
def decoder_graph():
    model = build_decoder("tiny", n_layers=4)
    ids = torch.randint(0, 256, (4, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids)
    gm, described, real = _capture(model, ids)
    return gm, described, real, expected


@pytest.mark.parametrize("stages", [2, 4])
def test_stage_graphs_run_in_sequence_reproduce_the_model(decoder_graph, stages):
    gm, described, real, expected = decoder_graph
    plan = split_graph(gm, described, PipelineConfig(schedule="gpipe"), stages, training=False)
    assert len(plan.stages) == stages
    with torch.no_grad():
        (got,) = _run_stages(plan, described, real)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # Every parameter in exactly one stage; buffers (RoPE tables) may be in several.
    params = [d.name for d in described if d.kind == "parameter"]
    owners = {p: [s.index for s in plan.stages if p in s.weights] for p in params}
    assert all(len(o) == 1 for o in owners.values()), owners
    # Only the hidden state (B, T, h) crosses each cut: the RoPE tables and the causal mask are
    # recomputed per stage, not sent.
    for stage in plan.stages[1:]:
        (name,) = stage.inputs
        assert tuple(stage.gm.graph.find_nodes(op="placeholder", target=name)[0].meta["example_value"].shape[1:]) == (8, 64)


def test_named_split_points_cut_where_asked(decoder_graph):
    gm, described, real, expected = decoder_graph
    plan = split_graph(gm, described, PipelineConfig(split_points=("layers.3",)), 2, training=False)
    stage0 = {d.weight for d in described if d.name in plan.stages[0].weights}
    stage1 = {d.weight for d in described if d.name in plan.stages[1].weights}
    assert "layers.2.mlp.down_proj.weight" in stage0 and "layers.3.mlp.down_proj.weight" in stage1
    assert "embed_tokens.weight" in stage0 and "lm_head.weight" in stage1
    with torch.no_grad():
        (got,) = _run_stages(plan, described, real)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_balancing_minimizes_the_largest_stage_and_knows_1f1b_positions(decoder_graph):
    gm, described, _, _ = decoder_graph
    kinds = {d.name: d for d in described}
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    local = shard_pipeline._batch_independent(gm, kinds)
    candidates = shard_pipeline._candidate_starts(nodes)
    assert [m for _, m in candidates] == ["layers.1", "layers.2", "layers.3"]
    for training, schedule, microbatches in [(False, "gpipe", 2), (True, "1f1b", 2), (True, "gpipe", 4)]:
        weights, acts, crossing = shard_pipeline._segment_costs(gm, nodes, [p for p, _ in candidates], local, kinds)

        def largest(cuts):
            bounds = [0, *cuts, len(weights)]
            costs = []
            for s in range(len(bounds) - 1):
                a, b = bounds[s], bounds[s + 1]
                held = shard_pipeline._in_flight(s, 2, microbatches, schedule, training)
                cut_in = crossing[a - 1] if a > 0 else 0
                cut_out = crossing[b - 1] if b < len(weights) else 0
                costs.append(sum(weights[a:b]) + (held * sum(acts[a:b]) + cut_in + cut_out) / microbatches)
            return max(costs)

        chosen = shard_pipeline._balanced_starts(gm, nodes, candidates, 2, local, kinds, training, microbatches, schedule)
        chosen_cut = [candidates.index(c) + 1 for c in chosen]
        best = min(largest([c]) for c in range(1, len(weights)))
        assert largest(chosen_cut) == best
    # Uniform layers, inference: the middle. 1F1B training: the first stage keeps two micro-batches
    # in flight, the last one, so the first stage gets fewer layers.
    inference = split_graph(gm, described, PipelineConfig(schedule="gpipe"), 2, training=False)
    training = split_graph(gm, described, PipelineConfig(schedule="1f1b", microbatches=2), 2, training=True)
    assert inference.stages[1].first_module == "layers.2"
    assert training.stages[1].first_module == "layers.1"
    assert [r["in_flight"] for r in training.rows] == [2, 1]
    assert "stage 1: [layers.1, end)" in training.describe()


def test_bad_pipeline_options_are_clear_errors(decoder_graph):
    gm, described, _, _ = decoder_graph
    with pytest.raises(OptionError, match="5 stages need 4 cuts, but the graph has only 3 block boundaries"):
        split_graph(gm, described, PipelineConfig(schedule="gpipe"), 5, training=False)
    with pytest.raises(OptionError, match="no module 'layers.9' in the graph; block boundaries: layers.1, layers.2, layers.3"):
        split_graph(gm, described, PipelineConfig(split_points=("layers.9",)), 2, training=False)
    with pytest.raises(OptionError, match="must name modules in the order they run"):
        split_graph(gm, described, PipelineConfig(split_points=("layers.3", "layers.1")), 3, training=False)
    with pytest.raises(OptionError, match="schedule '1f1b' needs microbatches >= stages, got 2 < 4"):
        Config.from_options({"pipeline": {"stages": 4, "microbatches": 2}})
    with pytest.raises(OptionError, match="2 split_points make 3 stages, but stages=2"):
        Config.from_options({"pipeline": {"stages": 2, "split_points": ["layers.1", "layers.2"]}})
    with pytest.raises(OptionError, match="'schedule'.*valid choices: 'gpipe', '1f1b'"):
        Config.from_options({"pipeline": {"schedule": "zero-bubble"}})
    with pytest.raises(OptionError, match=r"\['group'\]: expected a torch.distributed ProcessGroup or None.*got list"):
        Config.from_options({"pipeline": {"group": [0, 2]}})
    assert Config.from_options({"pipeline": "1f1b-2x8"}).pipeline == PipelineConfig(stages=2, microbatches=8)


def test_check_pipeline_refuses_a_batch_that_does_not_divide():
    model = build_decoder("tiny", n_layers=4)
    ids = torch.zeros(6, 8, dtype=torch.long)
    with pytest.raises(OptionError, match="batch 6 does not divide into 4 micro-batches"):
        check_pipeline(model, (ids,), {"pipeline": {"microbatches": 4}}, 2)
    with pytest.raises(OptionError, match="3 stages need 3 ranks .* but 2 were asked for"):
        check_pipeline(model, (ids,), {"pipeline": {"stages": 3, "schedule": "gpipe"}}, 2)


def test_mesh_lays_out_pipeline_by_tensor_parallel_ranks():
    pp_groups, tp_groups = md.mesh_ranks(2, 2)
    assert tp_groups == [[0, 1], [2, 3]]  # rank = pp_rank * tp_size + tp_rank
    assert pp_groups == [[0, 2], [1, 3]]
    assert md.mesh_ranks(4, 1) == ([[0, 1, 2, 3]], [[0], [1], [2], [3]])
    for pp, tp in itertools.product([1, 2, 4], [1, 2]):
        pp_g, tp_g = md.mesh_ranks(pp, tp)
        assert sorted(r for g in pp_g for r in g) == list(range(pp * tp)) == sorted(r for g in tp_g for r in g)
    with pytest.raises(OptionError, match="tp_size must be a positive integer"):
        md.mesh_ranks(2, 0)


# -- on spawned ranks (gloo) ---------------------------------------------------------------

FAST = {"codegen": "fx", "recompute": "none"}  # the stage compile through memsave, without Inductor's C++


def _check(results, world, *, modes):
    assert len(results) == world
    for rank, per_rank in enumerate(results):
        for mode, r in zip(modes, per_rank):
            assert r["stage"] == rank
            if mode in ("inference", "quantized"):
                assert r["max_diff"] <= ATOL, (rank, r)
            if mode == "quantized":
                assert r["fp32_linear_bytes_held"] == 0 and r["released_any"], (rank, r)
                assert r["quantization_error"] > 1e-4, (rank, r)  # it was quantized, not fp32
            if mode.endswith("training"):
                assert r["loss_diff"] <= ATOL and r["inference_diff"] <= ATOL, (rank, r)
                assert r["grad_diffs"], "this rank's stage got no gradients"
                assert max(r["grad_diffs"].values()) <= ATOL, (rank, r["grad_diffs"])
    for mode_index, mode in enumerate(modes):
        if mode.endswith("training"):  # every parameter got its gradient on exactly one rank
            names = [n for per_rank in results for n in per_rank[mode_index]["grad_diffs"]]
            assert len(names) == len(set(names)) == results[0][mode_index]["n_params"]


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_pipeline_on_2_ranks_matches_one_process_decoder():
    scenarios = [
        ("inference", {"pipeline": {"schedule": "gpipe", "microbatches": 2}, **FAST}),
        ("inference", {"pipeline": {"schedule": "1f1b", "microbatches": 4, "compile_stages": False}}),
        ("training", {"pipeline": {"schedule": "gpipe", "microbatches": 4, "compile_stages": False}}),
    ]
    results = md.launch(workers.pipeline_scenarios, 2, ("decoder", scenarios), timeout_s=650)
    _check(results, 2, modes=[m for m, _ in scenarios])
    # Each rank holds about half of the weights (the RoPE buffers are in both).
    inference = results[0][0]
    for per_rank in results:
        assert per_rank[0]["kept_bytes"] <= inference["total_bytes"] / 2 * 1.05 + 2 * 128 * 16 * 4


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_pipeline_on_2_ranks_keeps_its_cuts_for_training_and_shards_a_quantized_decoder():
    scenarios = [
        # Inference first (cut at layers.2), then training, whose own plan would cut at layers.1:
        # the second compile must keep the first one's cuts (the other weights are freed).
        ("inference+training", {"pipeline": {"schedule": "1f1b", "microbatches": 2}, **FAST}),
        # Composition: int8 weights, then sharded (each rank quantizes its own stage).
        ("quantized", {"quantize": "int8", "pipeline": {"schedule": "gpipe", "microbatches": 2}, **FAST}),
    ]
    results = md.launch(workers.pipeline_scenarios, 2, ("decoder", scenarios), timeout_s=650)
    _check(results, 2, modes=[m for m, _ in scenarios])


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_pipeline_on_4_ranks_matches_one_process_decoder():
    scenarios = [
        ("inference", {"pipeline": {"schedule": "1f1b", "microbatches": 4}, **FAST}),
        ("training", {"pipeline": {"schedule": "1f1b", "microbatches": 4, "compile_stages": False}}),
    ]
    results = md.launch(workers.pipeline_scenarios, 4, ("decoder", scenarios), timeout_s=650)
    _check(results, 4, modes=[m for m, _ in scenarios])


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_pipeline_on_2_ranks_matches_one_process_hf_llama():
    scenarios = [
        ("inference", {"pipeline": {"schedule": "gpipe", "microbatches": 2, "compile_stages": False}}),
        ("training", {"pipeline": {"schedule": "1f1b", "microbatches": 2}, **FAST}),
    ]
    results = md.launch(workers.pipeline_scenarios, 2, ("hf-llama", scenarios), timeout_s=650)
    _check(results, 2, modes=[m for m, _ in scenarios])


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_pipeline_over_the_pp_groups_of_a_2x2_mesh():
    results = md.launch(workers.mesh_pipeline, 4, (2, 2), timeout_s=650)
    for rank, r in enumerate(results):
        assert r["tp_ranks"] == ((0, 1) if rank < 2 else (2, 3))
        assert r["pp_ranks"] == ((0, 2) if rank % 2 == 0 else (1, 3))
        assert (r["pp_rank"], r["tp_rank"]) == (rank // 2, rank % 2)
        assert r["tp_sum"] == 2 and r["pp_sum"] == 2
        assert r["stage"] == rank // 2  # the stage is the rank's place in its pipeline group
        assert r["max_diff"] <= ATOL, (rank, r)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_pipeline_and_tensor_parallel_on_a_2x2_grid_match_one_process_decoder_and_hf_llama():
    # Stage 0 on ranks {0, 1}, stage 1 on ranks {2, 3}; within a stage the linears are split in
    # two. Groups from init_mesh, then the same run with both groups given in the options; and
    # HF Llama with init_mesh's groups under GPipe.
    pipeline = {"schedule": "1f1b", "microbatches": 2}
    results = md.launch(workers.pipeline_and_tensor_parallel, 4, (pipeline, FAST), timeout_s=540)
    for rank, r in enumerate(results):
        assert (r["pp_rank"], r["tp_rank"]) == (rank // 2, rank % 2)
        for how in ("mesh", "explicit"):
            run = r[how]
            assert run["stage"] == rank // 2
            assert run["inference_diff"] <= ATOL and run["loss_diff"] <= ATOL, (rank, how, run)
            assert max(run["grad_diffs"].values()) <= ATOL, (rank, how, run["grad_diffs"])
            # This stage's 7 linears (q, k, v, o, gate, up, down) are split: this rank's block.
            split = run["split"]
            assert len(split) == 7 and all(s[1:] == (rank % 2, 2) for s in split.values()), (rank, split)
            assert {n.split(".")[1] for n in split} == {str(rank // 2)}
        assert "compile_stages" in r["errors"]["compile_stages"]
        assert "must share only this rank" in r["errors"]["same_group"]
        llama = r["hf-llama"]
        assert llama["stage"] == rank // 2
        assert llama["inference_diff"] <= ATOL and llama["loss_diff"] <= ATOL, (rank, llama)
        assert max(llama["grad_diffs"].values()) <= ATOL, (rank, llama["grad_diffs"])
        # Its stage's q/k/v/o and gate/up/down are split too: 7 per layer.
        assert llama["split"] and len(llama["split"]) % 7 == 0, (rank, llama["split"])
        assert all(s[1:] == (rank % 2, 2) for s in llama["split"].values()), (rank, llama["split"])
    for how in ("mesh", "explicit", "hf-llama"):  # every parameter got its gradient on one tp pair
        names = [n for r in results for n in r[how]["grad_diffs"]]
        assert len(set(names)) == results[0][how]["n_params"]
        assert all(names.count(n) == 2 for n in set(names))


@pytest.mark.slow
@pytest.mark.timeout(700)
def test_deferred_weights_each_rank_materializes_only_its_stage_and_tied_weights_sum(tmp_path):
    # The models are built on meta with storage-less weights (defer_weights); each rank reads its
    # own stage's weights from a save_weights file. Scenarios: the decoder in inference, HF
    # Llama in inference, the tied-embedding decoder trained for two steps (embed_tokens.weight
    # is read by stage 0 and by the last stage's LM head: its gradient is the sum of both), and
    # the errors for sources that lack a stage's weights.
    paths = {}
    for name in ("decoder", "decoder-tied", "hf-llama"):
        paths[name] = str(tmp_path / f"{name}.pt")
        md.save_weights(workers._build(name)[0], paths[name])
    gpipe = {"pipeline": {"schedule": "gpipe", "microbatches": 2}, **FAST}
    plain = {"pipeline": {"schedule": "1f1b", "microbatches": 2, "compile_stages": False}}
    results = md.launch(workers.deferred_scenarios_by_model, 2, (paths, [
        ("inference", "decoder", gpipe),
        ("inference", "hf-llama", plain),
        ("training", "decoder-tied", plain),
        ("errors", "decoder", plain),
    ]), timeout_s=650)
    for rank, (decoder, llama, tied, errors) in enumerate(results):
        for run in (decoder, llama, tied):
            assert run["stage"] == rank
            assert run["held_before"] == 0
            # What this rank holds is its stage's weights, every byte read from the file.
            assert run["held_after"] == run["kept_bytes"] == run["materialized"] > 0, (rank, run)
            assert run["held_after"] < run["total_bytes"], (rank, run)
        for run in (decoder, llama):  # about half each (RoPE tables are in both)
            assert run["held_after"] <= run["total_bytes"] * 0.55 + 2 * 128 * 16 * 4, (rank, run)
        assert decoder["max_diff"] <= ATOL and llama["max_diff"] <= ATOL, (rank, decoder, llama)
        assert tied["loss_diff"] <= ATOL and max(tied["grad_diffs"].values()) <= ATOL, (rank, tied)
        # The tied weight is on both ranks, with the whole gradient.
        assert "embed_tokens.weight" in tied["grad_diffs"] and "embed_tokens.weight" in tied["with_storage"]
        assert "options['pipeline']['weights']" in errors["no_source"] and "defer_weights" in errors["no_source"]
        assert "is not in" in errors["missing"] and "save_weights" in errors["missing"]
        assert "has shape (3,)" in errors["shape"]
        assert "built without storage" in errors["no_pipeline"]
    decoder_params = {n for r in results for n in r[0]["with_storage"]}
    assert decoder_params == set(dict(workers._build("decoder")[0].named_parameters()))
    tied_grads = [n for r in results for n in r[2]["grad_diffs"]]
    assert set(tied_grads) == set(dict(workers._build("decoder-tied")[0].named_parameters()))


def test_weight_source_fills_deferred_weights_from_a_file_and_gives_its_pages_back(tmp_path):
    from memsave.distributed.deferred import WeightSource, deferred_name, is_deferred, materialize

    model = build_decoder("tiny", n_layers=2, tie_embeddings=True)
    path = tmp_path / "w.pt"
    md.save_weights(model, path)
    empty = md.defer_weights(build_decoder("tiny", n_layers=2, tie_embeddings=True, device="meta"))
    assert empty.lm_head.weight is empty.embed_tokens.weight  # still tied
    tensors = {id(t): t for t in [*empty.parameters(), *empty.buffers()]}.values()
    assert all(is_deferred(t) and t.untyped_storage().nbytes() == 0 for t in tensors)
    source = WeightSource(path)
    copied = sum(materialize(t, deferred_name(t), source) for t in tensors)
    expected = dict(model.named_parameters()) | dict(model.named_buffers())
    got = dict(empty.named_parameters()) | dict(empty.named_buffers())
    assert got.keys() == expected.keys() and all(torch.equal(got[n], expected[n]) for n in expected)
    assert copied == sum(t.numel() * t.element_size() for t in tensors)
    if sys.platform.startswith("linux"):  # the file's pages were given back as each was copied...
        assert source.pages_dropped == copied
    # ... and reading the file again faults them in from it: the same values, not zeros.
    assert torch.equal(source.get("layers.1.mlp.down_proj.weight"), expected["layers.1.mlp.down_proj.weight"])
    source.close()
    with pytest.raises(OptionError, match="is not in"):
        WeightSource({"x": torch.zeros(1)}).get("embed_tokens.weight")
    with pytest.raises(OptionError, match="expected a file path"):
        PipelineConfig(weights=3)
