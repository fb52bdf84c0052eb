"""MLP chunking for inference prefill: exact against the unchunked graph, lower measured peak, only
when a budget asks for it, refused in training."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import memsave
from memsave.memory.track import MemoryTracker
from memsave.models.decoder import build_decoder, decoder_inputs

ATOL = 1e-5


def _run(model, inputs, chunk, *, grad=False):
    compiled = torch.compile(model, backend="memsave", options={"codegen": "fx", "chunk": chunk})
    with memsave.collect() as reports, torch.set_grad_enabled(grad):
        out = compiled(*inputs)
    notes = [n for r in reports for rec in r.records if rec.name == "chunk_capture" for n in rec.notes]
    return compiled, out, notes


def test_decoder_mlps_chunked_exact_and_lower_peak():
    model = build_decoder("tiny")
    (ids,) = decoder_inputs(model, 2, 100)  # 200 tokens
    expected = model(ids)
    budget = 20_000  # bytes: 7 tokens of SwiGLU intermediates (3 × 176 fp32 each = 2112 B + ...)
    compiled, out, notes = _run(model, (ids,), {"targets": ("attention", "mlp"), "budget": budget})
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-5)
    mlp_notes = [n for n in notes if n.startswith("mlp")]
    assert len(mlp_notes) == 2 and all("200 tokens in 29 chunks of 7" in n for n in mlp_notes)
    with MemoryTracker("cpu") as chunked, torch.no_grad():
        compiled(ids)
    torch._dynamo.reset()
    plain, _, _ = _run(model, (ids,), {"targets": ("attention",), "budget": budget})
    with MemoryTracker("cpu") as unchunked, torch.no_grad():
        plain(ids)
    assert chunked.stats.peak_bytes < unchunked.stats.peak_bytes


def test_no_budget_no_mlp_chunking():
    model = build_decoder("tiny")
    (ids,) = decoder_inputs(model, 1, 64)
    _, _, notes = _run(model, (ids,), "auto")
    assert not [n for n in notes if n.startswith("mlp")]


def test_training_graph_is_refused_with_the_reason():
    model = build_decoder("tiny").train()
    ids, labels = decoder_inputs(model, 1, 64, labels=True)
    _, loss, notes = _run(model, (ids, labels), {"chunk_size": 8}, grad=True)
    assert any("2 MLP block(s) left as is: a training graph" in n for n in notes)
    loss.backward()  # still a working training graph
    assert model.lm_head.weight.grad is not None


class _GeluMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(12, 40)
        self.fc2 = torch.nn.Linear(40, 12)

    def forward(self, x):
        return x + self.fc2(F.gelu(self.fc1(x)))


@pytest.mark.parametrize("chunk_size, chunked", [(5, True), (1000, False)])
def test_plain_gelu_mlp_with_bias_ragged_chunks(chunk_size, chunked):
    torch.manual_seed(0)
    model = _GeluMLP()
    x = torch.randn(23, 12)  # 2-D input, 23 tokens: chunks of 5 leave a ragged last one
    expected = model(x)
    _, out, notes = _run(model, (x,), {"targets": "mlp", "chunk_size": chunk_size})
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-5)
    if chunked:
        # Intermediates per token: fc1's output and gelu's, 2 × 40 fp32 = 320 B.
        assert len(notes) == 1 and "23 tokens in 5 chunks of 5: intermediates 1.56 KiB at a time instead of 7.19 KiB" in notes[0]
    else:
        assert len(notes) == 1 and "fit the budget" in notes[0]
