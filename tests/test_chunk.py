"""Chunked LM-head cross-entropy: the op against plain torch, the capture + chunk passes, refusals,
options. fp32 comparisons are tight: chunking only reorders fp32 sums."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import memsave
from memsave.config import CHUNK_DEFAULT_BUDGET, ChunkConfig, Config, OptionError
from memsave.memory.estimate import WORKSPACE
from memsave.models.decoder import build_decoder, decoder_inputs
from tests.helpers import LoweredGraphs
from memsave.ops.chunked_ce import linear_cross_entropy, reference

LCE = torch.ops.memsave.linear_cross_entropy.default
LCE_BW = torch.ops.memsave.linear_cross_entropy_backward.default
ATOL = 1e-5


def _problem(n=37, h=16, v=53, *, bias=True, ignore=-100, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=g, dtype=dtype) * 0.3).requires_grad_()
    b = torch.randn(v, generator=g, dtype=dtype).requires_grad_() if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::4] = ignore  # every 4th token ignored
    return hidden, weight, b, labels


def _grads(out, inputs, grad):
    inputs = [t for t in inputs if t is not None]
    return torch.autograd.grad(out, inputs, grad)


# -- the op -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [0, 1, 5, 36, 37, 100])  # 37 tokens: 5 and 36 leave a ragged last chunk
@pytest.mark.parametrize("bias", [True, False])
def test_op_matches_linear_then_cross_entropy(reduction, chunk, bias):
    hidden, weight, b, labels = _problem(bias=bias)
    loss, lse = linear_cross_entropy(hidden, weight, b, labels, -100, reduction, chunk, False)
    expected = reference(hidden, weight, b, labels, -100, reduction)
    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=1e-6)
    torch.testing.assert_close(lse, torch.logsumexp(F.linear(hidden, weight, b), -1), atol=ATOL, rtol=1e-6)
    grad = torch.randn_like(expected)
    for got, want in zip(_grads(loss, (hidden, weight, b), grad), _grads(expected, (hidden, weight, b), grad)):
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-5)


def test_ignore_index_is_a_real_class_id():
    # ignore_index 7 is also a valid vocabulary entry: tokens labelled 7 must not count.
    hidden, weight, b, labels = _problem(ignore=7)
    loss, _ = linear_cross_entropy(hidden, weight, b, labels, 7, "mean", 6, False)
    expected = reference(hidden, weight, b, labels, 7, "mean")
    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=1e-6)
    g_got = _grads(loss, (hidden,), torch.ones(()))[0]
    assert g_got[labels == 7].abs().max() == 0  # ignored tokens get no gradient


def test_all_tokens_ignored_gives_nan_mean_like_torch():
    hidden, weight, b, labels = _problem()
    labels[:] = -100
    loss, _ = linear_cross_entropy(hidden, weight, b, labels, -100, "mean", 8, False)
    assert torch.isnan(loss) and torch.isnan(reference(hidden, weight, b, labels))


def test_gradcheck_in_float64():
    hidden, weight, b, labels = _problem(n=9, h=4, v=7, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w, bb: linear_cross_entropy(h, w, bb, labels, -100, "mean", 4, False)[0], (hidden, weight, b)
    )


def test_only_the_wanted_gradients_are_computed():
    hidden, weight, _, labels = _problem(bias=False)
    weight.requires_grad_(False)  # a frozen lm head: no (V, H) gradient is made
    loss, _ = linear_cross_entropy(hidden, weight, None, labels, -100, "mean", 8, False)
    (gh,) = torch.autograd.grad(loss, hidden)
    lse = torch.logsumexp(F.linear(hidden, weight), -1).detach()
    _, gw, gb = torch.ops.memsave.linear_cross_entropy_backward(
        torch.ones(()), hidden.detach(), weight, None, labels, lse, -100, "mean", 8, [True, False, False]
    )
    assert gw.numel() == 0 and gb.numel() == 0
    torch.testing.assert_close(gh, torch.autograd.grad(reference(hidden, weight, None, labels), hidden)[0], atol=ATOL, rtol=1e-5)


def test_upcast_keeps_bf16_logits_and_returns_fp32():
    # HF's loss casts bf16 logits to fp32 first: the op computes each chunk's logits in bf16
    # (as the graph did) and everything after in fp32.
    hidden, weight, b, labels = _problem(dtype=torch.bfloat16, bias=False)
    loss, _ = linear_cross_entropy(hidden, weight, None, labels, -100, "mean", 8, True)
    assert loss.dtype == torch.float32
    # bf16 matmuls of different row counts may round differently (BLAS blocking), so compare
    # against the fp32 loss of the same bf16 logits at bf16's resolution, not fp32's.
    expected = F.cross_entropy(F.linear(hidden, weight).float(), labels)
    torch.testing.assert_close(loss, expected, atol=1e-2, rtol=1e-2)


def test_opcheck_schema_fake_and_autograd_registration():
    hidden, weight, b, labels = _problem(n=11)
    torch.library.opcheck(LCE, (hidden, weight, b, labels, -100, "sum", 4, False))
    lse = torch.logsumexp(F.linear(hidden, weight, b), -1).detach()
    torch.library.opcheck(LCE_BW, (torch.ones(()), hidden.detach(), weight.detach(), b.detach(), labels, lse, -100, "sum", 4, [True, True, True]))


# -- capture + chunk passes on the built-in decoder ---------------------------------------------


def _chunk_records(reports):
    return {r.stage: [rec for rec in r.records if rec.name in ("chunk_capture", "chunk")] for r in reports}


def test_decoder_inference_loss_is_chunked_and_exact(monkeypatch):
    spy = LoweredGraphs(monkeypatch)
    # A vocabulary large enough that the logits set the peak (and no other dim is 3000).
    model = build_decoder("tiny", max_seq_len=64, vocab_size=3000)
    ids, labels = decoder_inputs(model, 2, 41, labels=True)  # 82 tokens, more than hidden (64)
    expected = model(ids, labels)
    compiled = torch.compile(model, backend="memsave", options={"codegen": "fx", "chunk": {"targets": "loss", "chunk_size": 5}})
    with memsave.collect() as reports, torch.no_grad():
        loss = compiled(ids, labels)
    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=1e-6)
    assert LCE in spy.targets("inference")
    # No (tokens × vocab) tensor anywhere in what runs: only the (V, H) weight has a vocab dim.
    assert spy.most_rows_over("inference", 3000) == 64
    node = next(n for n in spy.graphs["inference"].graph.nodes if n.target is LCE)
    assert node.args[6] == 5
    records = _chunk_records(reports)["inference"]
    assert "fused" in records[0].notes[0] and "in chunks of 5" in records[1].notes[0]
    assert records[1].peak_activation_bytes_after < records[1].peak_activation_bytes_before
    assert records[1].error is not None and records[1].error.max_abs <= ATOL


@pytest.mark.parametrize("codegen", ["fx", "inductor"])
def test_decoder_training_gradients_match_eager(codegen, monkeypatch):
    spy = LoweredGraphs(monkeypatch)
    model = build_decoder("tiny", max_seq_len=64, vocab_size=300).train()
    twin = copy.deepcopy(model)
    ids, labels = decoder_inputs(model, 2, 41, labels=True)
    model(ids, labels).backward()
    compiled = torch.compile(twin, backend="memsave", options={"codegen": codegen, "chunk": {"targets": "loss", "chunk_size": 7}})
    loss = compiled(ids, labels)
    loss.backward()
    torch.testing.assert_close(loss, twin(ids, labels).detach(), atol=ATOL, rtol=1e-6)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=ATOL, rtol=1e-5, msg=name)
    assert LCE in spy.targets("forward") and LCE_BW in spy.targets("backward")
    assert spy.most_rows_over("backward", 300) == 64  # no full logits gradient either


def test_chunk_size_from_budget():
    model = build_decoder("tiny")
    ids, labels = decoder_inputs(model, 1, 64, labels=True)
    row = 256 * 4  # one token's fp32 logits
    compiled = torch.compile(model, backend="memsave", options={"codegen": "fx", "chunk": {"budget": 10 * row}})
    with memsave.collect() as reports, torch.no_grad():
        compiled(ids, labels)
    note = _chunk_records(reports)["inference"][1].notes[0]
    assert "in chunks of 10 " in note
    assert ChunkConfig().rows_for(row) == CHUNK_DEFAULT_BUDGET // row


class _HFStyleLM(torch.nn.Module):
    """`logits = lm_head(h); loss = F.cross_entropy(logits.view(-1, V), labels.view(-1), ...)`."""

    def __init__(self, vocab=97, hidden=24, **loss_kwargs):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.lm_head = torch.nn.Linear(hidden, vocab, bias=True)
        self.loss_kwargs = loss_kwargs
        self.return_logits = False

    def forward(self, ids, labels):
        logits = self.lm_head(torch.tanh(self.embed(ids)))  # (B, T, V)
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1), **self.loss_kwargs)
        return (loss, logits) if self.return_logits else loss


def _hf_inputs(vocab=97):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (3, 13), generator=g)
    labels = torch.randint(0, vocab, (3, 13), generator=g)
    labels[:, :4] = 5
    return ids, labels


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_hf_style_loss_with_bias_sum_none_and_custom_ignore_index(reduction):
    torch.manual_seed(0)
    model = _HFStyleLM(reduction=reduction, ignore_index=5)
    twin = copy.deepcopy(model)
    ids, labels = _hf_inputs()
    expected = model(ids, labels)
    expected.sum().backward()
    compiled = torch.compile(twin, backend="memsave", options={"codegen": "fx", "chunk": "tokens-4"})
    with memsave.collect() as reports:
        loss = compiled(ids, labels)
    loss.sum().backward()
    assert "fused" in _chunk_records(reports)["joint"][0].notes[0]
    torch.testing.assert_close(loss, expected, atol=ATOL, rtol=1e-5)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize(
    "loss_kwargs, returns_logits, reason",
    [
        ({}, True, "the logits are also used by"),
        ({"label_smoothing": 0.1}, False, "label_smoothing=0.1 is not supported"),
        ({"weight": torch.rand(97)}, False, "class weights"),
    ],
)
def test_refusals_leave_the_graph_as_is_and_say_why(loss_kwargs, returns_logits, reason, monkeypatch):
    spy = LoweredGraphs(monkeypatch)
    torch.manual_seed(0)
    model = _HFStyleLM(**loss_kwargs)
    model.return_logits = returns_logits
    ids, labels = _hf_inputs()
    expected = model(ids, labels)
    compiled = torch.compile(model, backend="memsave", options={"codegen": "fx", "chunk": "loss"})
    with memsave.collect() as reports, torch.no_grad():
        out = compiled(ids, labels)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-6)
    capture = _chunk_records(reports)["inference"][0]
    assert not capture.changed and reason in capture.notes[0]
    assert LCE not in spy.targets("inference")


# -- options ----------------------------------------------------------------------------------


def test_chunk_options_parse_and_refuse_clearly():
    assert Config(chunk="tokens-64").chunk.chunk_size == 64
    assert Config(chunk="budget-8").chunk.budget == 8 * 2**20
    assert Config(chunk="attention").chunk.targets == ("attention",)
    assert Config(chunk={"targets": ["mlp", "loss"]}).chunk.targets == ("loss", "mlp")
    assert Config(chunk="none").chunk is None
    with pytest.raises(OptionError, match="'tokens-<n>'"):
        Config(chunk="tokens")
    with pytest.raises(OptionError, match="valid choices: 'loss', 'attention', 'mlp'"):
        Config(chunk={"targets": ("logits",)})
    with pytest.raises(OptionError, match="not a positive int"):
        Config(chunk={"chunk_size": 0})
    with pytest.raises(OptionError, match="an int >= 1024"):
        Config(chunk={"budget": 10})
    with pytest.raises(OptionError, match="not both"):
        Config(chunk={"budget": 4096, "chunk_size": 8})


def test_workspace_declared_to_the_estimator_follows_the_chunk():
    hidden, weight, b, labels = _problem(n=40, v=50)

    class Node:  # the estimator reads only args and their meta["val"]
        def __init__(self, args):
            self.target = LCE
            self.args = [type("A", (), {"meta": {"val": a}})() if isinstance(a, torch.Tensor) else a for a in args]

    per_chunk = WORKSPACE[LCE](Node((hidden, weight, b, labels, -100, "mean", 8, False)))
    whole = WORKSPACE[LCE](Node((hidden, weight, b, labels, -100, "mean", 0, False)))
    assert per_chunk == 8 * 50 * 4 and whole == 40 * 50 * 4


def test_tied_embeddings_get_both_gradients():
    # lm_head.weight is embed_tokens.weight: the fused op's weight gradient adds to the embedding's.
    model = build_decoder("tiny", tie_embeddings=True).train()
    twin = copy.deepcopy(model)
    ids, labels = decoder_inputs(model, 2, 21, labels=True)
    model(ids, labels).backward()
    torch.compile(twin, backend="memsave", options={"codegen": "fx", "chunk": "tokens-8"})(ids, labels).backward()
    assert twin.lm_head.weight is twin.embed_tokens.weight
    torch.testing.assert_close(twin.embed_tokens.weight.grad, model.embed_tokens.weight.grad, atol=ATOL, rtol=1e-5)
