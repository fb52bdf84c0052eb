"""Attention routing: eager matmul → softmax → matmul attention becomes SDPA only where it is the
same computation; the outputs and gradients match the eager graph to fp32 rounding."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import memsave
from memsave.models.decoder import build_decoder, decoder_inputs
from tests.helpers import LoweredGraphs

ATOL = 1e-5
FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _capture_notes(reports, stage="inference"):
    return [n for r in reports if r.stage == stage for rec in r.records if rec.name == "chunk_capture" for n in rec.notes]


def test_decoder_attention_routed_with_is_causal_and_no_score_matrix(monkeypatch):
    spy = LoweredGraphs(monkeypatch)
    model = build_decoder("tiny")
    (ids,) = decoder_inputs(model, 2, 24)
    expected = model(ids)
    compiled = torch.compile(model, backend="memsave", options={"codegen": "fx", "chunk": "attention"})
    with memsave.collect() as reports, torch.no_grad():
        out = compiled(ids)
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-5)
    assert "2 eager attention(s) routed" in _capture_notes(reports)[0]
    assert spy.count("inference", FLASH_CPU) == 2
    # is_causal: neither the (B, H, T, T) scores nor the (T, T) mask reaches the graph.
    assert not [s for s in spy.shapes("inference") if s[-2:] == (24, 24)]


def test_decoder_training_gradients_match_eager():
    model = build_decoder("tiny").train()
    twin = copy.deepcopy(model)
    ids, labels = decoder_inputs(model, 2, 24, labels=True)
    model(ids, labels).backward()
    loss = torch.compile(twin, backend="memsave", options={"codegen": "fx", "chunk": "attention"})(ids, labels)
    loss.backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=ATOL, rtol=1e-5, msg=name)


def test_active_dropout_is_left_alone(monkeypatch):
    spy = LoweredGraphs(monkeypatch)
    model = build_decoder("tiny", dropout=0.1).train()
    ids, labels = decoder_inputs(model, 1, 16, labels=True)
    compiled = torch.compile(model, backend="memsave", options={"codegen": "fx", "chunk": "attention"})
    with memsave.collect() as reports:
        compiled(ids, labels).backward()
    notes = _capture_notes(reports, "joint")
    assert any("left as is (2×): dropout p=0.1 is active" in n for n in notes)
    assert spy.count("forward", FLASH_CPU) == 0


class _Attention(torch.nn.Module):
    """Eager attention with the variations the matcher accepts or refuses."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.proj = torch.nn.Linear(16, 48)

    def forward(self, x, mask):
        b, t, _ = x.shape
        q, k, v = self.proj(x).view(b, t, 3, 2, 8).permute(2, 0, 3, 1, 4)  # each (B, 2, T, 8)
        if self.kind == "bool":  # a non-causal boolean mask, scaled by division
            s = (q @ k.transpose(-2, -1)) / math.sqrt(8)
            s = s.masked_fill(mask, float("-inf"))
        elif self.kind == "additive":  # HF style: a float mask added, scale a 0-d full()
            s = torch.matmul(q, k.transpose(-1, -2)) / torch.full([], 8**0.5, dtype=q.dtype)
            s = s + torch.where(mask, torch.finfo(q.dtype).min, 0.0)
        elif self.kind == "finite-fill":
            s = (q @ k.transpose(-2, -1)).masked_fill(mask, -1e4)
        elif self.kind == "scores-returned":
            s = q @ k.transpose(-2, -1) * 0.3
            return F.softmax(s, dim=-1) @ v, s
        p = F.softmax(s, dim=-1)
        return p @ v  # (B, 2, T, 8)


def _mask_inputs(t=11):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, t, 16, generator=g)
    mask = torch.rand(t, t, generator=g) < 0.4
    mask.fill_diagonal_(False)  # every query may attend to at least itself
    return x, mask


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_explicit_masks_are_passed_to_sdpa_exactly(kind, monkeypatch):
    spy = LoweredGraphs(monkeypatch)
    torch.manual_seed(0)
    module = _Attention(kind)
    twin = copy.deepcopy(module)
    x, mask = _mask_inputs()
    xr = x.clone().requires_grad_()
    expected = module(xr, mask)
    expected.square().sum().backward()
    xc = x.clone().requires_grad_()
    compiled = torch.compile(twin, backend="memsave", options={"codegen": "fx", "chunk": "attention"})
    with memsave.collect() as reports:
        out = compiled(xc, mask)
    out.square().sum().backward()
    assert "1 eager attention(s) routed" in _capture_notes(reports, "joint")[0]
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(xc.grad, xr.grad, atol=ATOL, rtol=1e-5)
    for p, q in zip(module.parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=ATOL, rtol=1e-5)
    assert not any(s[-2:] == (11, 11) and len(s) == 4 for s in spy.shapes("forward"))  # no (B, H, T, T) scores


@pytest.mark.parametrize(
    "kind, reason",
    [("finite-fill", "masked_fill with -10000.0, not -inf"), ("scores-returned", "also used elsewhere")],
)
def test_refusals_keep_the_eager_attention(kind, reason):
    torch.manual_seed(0)
    module = _Attention(kind)
    x, mask = _mask_inputs()
    expected = module(x, mask)
    compiled = torch.compile(module, backend="memsave", options={"codegen": "fx", "chunk": "attention"})
    with memsave.collect() as reports, torch.no_grad():
        out = compiled(x, mask)
    notes = _capture_notes(reports)
    assert len(notes) == 1 and reason in notes[0]
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-5)


def test_hf_gpt2_eager_attention_is_routed():
    from memsave.models import build_hf_gpt2, hf_inputs

    model = build_hf_gpt2("tiny")
    (ids,) = hf_inputs(model, 2, 16)
    expected = model(ids)
    compiled = torch.compile(model, backend="memsave", options={"codegen": "fx", "chunk": "attention"})
    with memsave.collect() as reports, torch.no_grad():
        out = compiled(ids)
    assert any("2 eager attention(s) routed" in n for n in _capture_notes(reports))
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=1e-5)
