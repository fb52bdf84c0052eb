"""Training with a frozen base: weights that do not require grad are quantized in the training
graph like inference weights, their originals released; trainable adapters stay fp32; the
backward recomputes a dequantized weight where it needs one and never saves it."""

from __future__ import annotations

import copy

import pytest
import torch

import memsave
from memsave.config import QuantizeConfig
from memsave.ops.schemes import SCHEMES
from memsave.passes.aten.quantize import weight_codes

EXACT = {
    "int8": {"bits": 8, "group_size": None, "symmetric": True, "method": "rtn", "compute_dtype": "float32"},
    "int4": {"bits": 4, "group_size": 32, "symmetric": False, "method": "mse", "compute_dtype": "float32"},
    "nf4": {"scheme": "nf4", "bits": 4, "group_size": 64},
}


class Adapted(torch.nn.Module):
    """A frozen linear plus a trainable low-rank adapter (what peft's LoRA makes)."""

    def __init__(self, width: int, rank: int = 8):
        super().__init__()
        self.base = torch.nn.Linear(width, width).requires_grad_(False)
        self.lora_a = torch.nn.Linear(width, rank, bias=False)
        self.lora_b = torch.nn.Linear(rank, width, bias=False)
        torch.nn.init.normal_(self.lora_b.weight, std=0.02)

    def forward(self, x):
        return self.base(x) + self.lora_b(self.lora_a(x))


def _model(width=256, layers=3):
    torch.manual_seed(0)
    blocks = []
    for _ in range(layers):
        blocks += [Adapted(width), torch.nn.GELU()]
    return torch.nn.Sequential(*blocks)


def _dequantized_reference(model, options):
    """The plain-torch reference: each frozen weight replaced by dequantize(quantize(w))."""
    scheme = QuantizeConfig(**options)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for module in reference.modules():
            if isinstance(module, Adapted):
                w = module.base.weight
                group = w.shape[1] if scheme.group_size is None else scheme.group_size
                codes = weight_codes(w, scheme, group, cached=lambda key, build: build())
                rules = SCHEMES[codes.spec.scheme]
                w.copy_(rules.dequantize(codes.packed, *codes.params, *rules.dequantize_extra(codes.spec), w.shape[1], w.dtype))
    return reference


def _records(name):
    return [r for rep in memsave.recent_reports() for r in rep.records if r.name == name]


@pytest.mark.parametrize("bits, codegen", [("int8", "fx"), ("int8", "inductor"), ("int4", "fx"), ("nf4", "inductor")])
def test_frozen_weights_are_quantized_released_and_the_adapters_train_exactly(bits, codegen):
    torch._dynamo.reset()
    model = _model()
    reference = _dequantized_reference(model, EXACT[bits])
    x = torch.randn(16, 256)
    compiled = torch.compile(model, backend="memsave", options={"quantize": EXACT[bits], "codegen": codegen})
    loss = compiled(x).square().mean()
    loss.backward()
    expected = reference(x).square().mean()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-8, msg=name)
        elif name.endswith("weight"):
            assert p.untyped_storage().nbytes() == 0, f"{name}: the fp32 original is still held"
    quantized = [r for r in _records("quantize") if r.changed]
    assert quantized and all("lora" not in q for q in quantized[-1].details["quantized"])
    assert len(quantized[-1].details["quantized"]) == 3
    # The backward recomputes what it needs of the frozen weights: no dequantized weight is saved.
    (recompute,) = [r for r in _records("recompute")][-1:]
    assert recompute.details["saved_bytes"] < 256 * 256 * 4, recompute.notes


def test_a_training_step_holds_the_codes_not_the_weights():
    """Measured: the saved-for-backward bytes of a step hold no weight-sized tensor, and the
    frozen base costs its codes (int8: a quarter of fp32)."""
    torch._dynamo.reset()
    width = 512
    model = _model(width, layers=4)
    x = torch.randn(4, width)
    compiled = torch.compile(model, backend="memsave", options={"quantize": "int8"})
    compiled(x).square().mean().backward()
    base = [r for r in _records("release_weights") if r.changed][-1]
    assert base.details["released_bytes"] == 4 * width * width * 4
    trainable = [p for p in model.parameters() if p.requires_grad]
    _, stats = memsave.measure_peak(lambda: compiled(x).square().mean().backward(), track_saved=True, exclude=trainable)
    assert stats.saved_bytes < width * width * 4  # less than one fp32 weight: none is saved
    # A dequantized weight exists only while its matmul runs: the step's peak stays under two.
    assert stats.peak_bytes < 2 * width * width * 4 + sum(p.numel() * 4 for p in trainable), stats


def test_peft_lora_on_an_hf_llama_trains_with_an_int8_base():
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from memsave.models.hf import build_hf_llama

    torch._dynamo.reset()
    base = build_hf_llama("tiny").model
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    model.train()
    ids = torch.randint(0, base.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="memsave", options={"quantize": EXACT["int8"], "codegen": "fx"})
    loss = compiled(input_ids=ids, labels=ids).loss
    loss.backward()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    assert all(p.grad is not None for p in lora.values())
    released = [r for r in _records("release_weights") if r.changed][-1].details["released"]
    assert any("q_proj.base_layer.weight" in n for n in released) and any("o_proj.weight" in n for n in released)
    # Against the fp32 base: the int8 base moves the loss and the adapters' gradients a little.
    ref_loss = reference(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-2 * abs(ref_loss.item())
    for n, q in reference.named_parameters():
        if q.requires_grad and q.grad.abs().max() > 0:
            cos = torch.nn.functional.cosine_similarity(lora[n].grad.flatten(), q.grad.flatten(), dim=0)
            assert cos > 0.99, (n, cos)


def test_with_recompute_chunking_and_mixed_precision():
    """The decoder with its linears frozen (norms and embeddings trained): the frozen base is
    quantized beside recompute at its minimum and the chunked LM-head loss, gradients equal to
    the dequantized reference; with bf16 compute as well, they stay close to it."""
    from memsave.models.decoder import build_decoder, decoder_inputs

    def frozen():
        model = build_decoder("tiny").train()
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.requires_grad_(False)
        return model

    ids, labels = decoder_inputs(build_decoder("tiny"), batch=2, seq=16, labels=True)
    reference = frozen()
    with torch.no_grad():
        for name, module in reference.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":  # see below: the chunked loss keeps it
                w = module.weight
                codes = weight_codes(w, QuantizeConfig(**EXACT["int8"]), w.shape[1], cached=lambda key, build: build())
                rules = SCHEMES[codes.spec.scheme]
                w.copy_(rules.dequantize(codes.packed, *codes.params, *rules.dequantize_extra(codes.spec), w.shape[1], w.dtype))
    reference(ids, labels).backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
    for extra, exact in (({}, True), ({"precision": "bf16"}, False)):
        torch._dynamo.reset()
        model = frozen()
        options = {"quantize": EXACT["int8"], "recompute": "budget-min", "chunk": {"targets": "loss", "chunk_size": 8},
                   "codegen": "fx", **extra}
        torch.compile(model, backend="memsave", options=options)(ids, labels).backward()
        # The LM head feeds the chunked loss op (memsave::linear_cross_entropy), which reads its
        # weight as it is: left unquantized. Every other frozen linear holds only its codes.
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear):
                assert (m.weight.untyped_storage().nbytes() == 0) == (name != "lm_head"), name
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if exact:
                diff = (p.grad - expected[name]).abs().max().item()
                assert diff <= 1e-6 + 1e-4 * expected[name].abs().max().item(), (name, diff, expected[name].abs().max().item())
            else:
                cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), expected[name].flatten(), dim=0)
                assert cos > 0.99, (name, cos)
        names = [r.name for rep in memsave.recent_reports() for r in rep.records if r.changed]
        assert {"quantize", "recompute", "chunk"} <= set(names)
        if not exact:
            assert "mixed_precision" in names
