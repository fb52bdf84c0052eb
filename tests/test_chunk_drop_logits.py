"""options['chunk']['logits'] = 'drop': an HF causal LM returns its logits beside the loss, so
its loss cannot run over chunks (the logits must exist in full to be returned). With 'drop', a
training graph returns an empty tensor in their place and the loss is fused: same loss and
gradients, a lower measured step peak. Graphs without gradients keep their logits."""

from __future__ import annotations

import pytest
import torch

import memsave
from memsave.memory.track import MemoryTracker

transformers = pytest.importorskip("transformers")

VOCAB, SEQ = 4096, 128


def _llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      use_cache=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).train()


def _ids():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))


def _loss_records(reports):
    return [r for rep in reports for r in rep.records if r.name == "chunk_capture"]


def _step(run, model, ids):
    model.zero_grad(set_to_none=True)
    with MemoryTracker("cpu") as tracker:
        out = run(input_ids=ids, labels=ids)
        out.loss.backward()
    return out, tracker.stats.peak_bytes


@pytest.mark.parametrize("codegen", ["fx", "inductor"])
def test_dropped_logits_fuse_the_loss_with_the_same_gradients(codegen):
    torch._dynamo.reset()
    ids = _ids()
    reference = _llama()
    want = reference(input_ids=ids, labels=ids)
    want.loss.backward()
    peaks = {}
    for logits in ("keep", "drop"):
        torch._dynamo.reset()
        model = _llama()
        with memsave.collect() as reports:
            compiled = torch.compile(model, backend="memsave",
                                     options={"codegen": codegen, "chunk": {"targets": ["loss"], "logits": logits}})
            out, _ = _step(compiled, model, ids)
        _, peaks[logits] = _step(compiled, model, ids)
        notes = "\n".join(line for r in _loss_records(reports) for line in r.notes)
        if logits == "keep":
            assert out.logits.shape == (2, SEQ, VOCAB)
            assert "also used by the graph output" in notes and "'drop' returns an empty tensor" in notes
        else:
            assert out.logits.numel() == 0  # what the option promises, said in the report
            assert "fused" in notes and "are an empty tensor" in notes
        torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-5)
        for (name, p), q in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    # The (2, 128, 4096) fp32 logits are 4 MiB; kept, they (their gradient, their log-softmax)
    # are held whole during the step.
    assert peaks["drop"] <= peaks["keep"] - 4 * 2**20, peaks
    torch._dynamo.reset()


def test_graphs_without_gradients_keep_their_logits():
    torch._dynamo.reset()
    model = _llama().eval()
    ids = _ids()
    compiled = torch.compile(model, backend="memsave",
                             options={"codegen": "fx", "chunk": {"targets": ["loss"], "logits": "drop"}})
    with torch.no_grad():
        out = compiled(input_ids=ids, labels=ids)
        want = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, SEQ, VOCAB)
    torch.testing.assert_close(out.logits, want.logits, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def test_a_bad_logits_choice_names_the_valid_ones():
    with pytest.raises(memsave.config.OptionError, match="logits.*'keep', 'drop'"):
        memsave.config.Config.from_options({"chunk": {"logits": "discard"}})
