"""The small causal LM trained on Python's docstrings: corpus, training, perplexity, cache."""

import dataclasses
import math

import pytest
import torch

from memsave.cli import main as cli_main
from memsave.models import docs_lm

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

# A recipe small enough to train in seconds: the same code path as the real one.
TINY = docs_lm.Recipe(layers=1, hidden=32, heads=2, kv_heads=1, intermediate=64, context=64, seq=32, batch=4,
                      steps=40, lr=1e-2, warmup=4)


def test_corpus_is_split_by_file_and_deterministic():
    c = docs_lm.corpus()
    assert len(c.train) > 500_000 and len(c.held_out) > 20_000
    held = set(c.held_out.split(b"\n\n")) - {b""}
    train = set(c.train.split(b"\n\n"))
    # Whole files go one way: a docstring paragraph found in both is shared text (license
    # boilerplate, "Return self."), not a file in both splits; most held-out text is unseen.
    assert len(held - train) > 0.8 * len(held)
    docs_lm._CORPUS = None  # read again from the source files
    assert docs_lm.corpus().hash == c.hash


def test_bytes_round_trip():
    text = "naïve → café"
    assert docs_lm.decode(docs_lm.encode(text)) == text and docs_lm.encode(text).max() < 256


def test_perplexity_of_a_uniform_model_is_the_vocabulary():
    tokens = docs_lm.held_out_tokens(4096)
    uniform = lambda ids: torch.zeros(*ids.shape, 256)  # noqa: E731
    assert docs_lm.perplexity(uniform, tokens, window=64) == pytest.approx(256.0, rel=1e-6)
    # A model that puts all its mass on the true next byte has perplexity 1.
    def oracle(ids):
        logits = torch.full((*ids.shape, 256), -1e4)
        logits[:, :-1].scatter_(-1, ids[:, 1:, None], 0.0)
        return logits
    assert docs_lm.perplexity(oracle, tokens, window=64) == pytest.approx(1.0, abs=1e-6)


def test_training_learns_and_the_cache_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSAVE_CACHE_DIR", str(tmp_path))
    torch.manual_seed(123)  # training must not depend on the global RNG
    model, meta = docs_lm.load(TINY)
    assert meta["recipe"] == dataclasses.asdict(TINY) and meta["parameters"] == sum(p.numel() for p in model.parameters())
    # Learned something: far below the 256 of knowing nothing (bytes of English text).
    assert meta["held_out_perplexity"] < 40, meta
    assert meta["held_out_bits_per_byte"] == pytest.approx(math.log2(meta["held_out_perplexity"]))
    folder = docs_lm.path_for(TINY)
    assert folder.parent == tmp_path / "docs_lm" and (folder / "model.safetensors").exists()
    # The cached weights load bit for bit, and a second load trains nothing.
    again, meta2 = docs_lm.load(TINY)
    assert meta2 == meta
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    # Training is seeded: the same recipe trains the same weights.
    retrained, _ = docs_lm.train(TINY)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), retrained.state_dict().values()))


def test_command_trains_once_and_reports(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEMSAVE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(docs_lm, "DEFAULT_RECIPE", dataclasses.replace(TINY, steps=5))
    assert cli_main(["lm"]) == 0
    out = capsys.readouterr().out
    assert "training the docs LM" in out and "held-out perplexity" in out and str(tmp_path) in out
    assert cli_main(["lm"]) == 0
    assert "training" not in capsys.readouterr().out  # cached


def test_short_training_text_is_refused():
    with pytest.raises(ValueError, match="shorter than one window"):
        docs_lm.train(TINY, b"too short")
