"""A real small causal LM, trained here: nothing can be downloaded, so fidelity of quantized
weights and caches is measured on a model that learned something, from text that ships with
Python.

Corpus: the docstrings of the standard library's own source files, read with ``ast`` (no module
is imported, so nothing runs), in path order. Files whose path hashes to 0 mod 10 are held out:
the held-out text is from modules the model never saw. Tokens are bytes (vocabulary 256), so
no tokenizer has to be trained or shipped.

Model: an HF ``LlamaForCausalLM`` (grouped-query attention, RoPE), built from a config and
trained with AdamW from a fixed seed for a fixed number of steps (a few minutes on two CPU
cores). The trained weights are cached outside the repository as safetensors, keyed by the
recipe, the Python version (the corpus is its standard library) and the corpus's hash.

    memsave lm              train if not cached, print the held-out perplexity and the path
    memsave lm --rebuild    train again
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import os
import sys
import sysconfig
import time
from pathlib import Path

import torch

HELD_OUT_MOD = 10  # files whose path hash is 0 mod this are held out


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that decides the trained weights (besides the corpus)."""

    layers: int = 4
    hidden: int = 256
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 688
    context: int = 256  # max positions; training windows are `seq` long
    seq: int = 128
    batch: int = 16
    steps: int = 600
    lr: float = 3e-3
    warmup: int = 20
    weight_decay: float = 0.1
    seed: int = 0

    def key(self, corpus_hash: str) -> str:
        text = json.dumps([dataclasses.asdict(self), corpus_hash, sys.version_info[:2]], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


DEFAULT_RECIPE = Recipe()


# ----------------------------------------------------------------------------- corpus


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return []  # e.g. lib2to3's deliberately broken test data
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    docs = (ast.get_docstring(n) for n in nodes)
    return [d.strip() for d in docs if d and d.strip()]


def _held_out(relative: str) -> bool:
    return int(hashlib.sha1(relative.encode()).hexdigest(), 16) % HELD_OUT_MOD == 0


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: bytes
    held_out: bytes

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.train + b"\0" + self.held_out).hexdigest()[:16]


_CORPUS: Corpus | None = None


def corpus() -> Corpus:
    """The standard library's docstrings as UTF-8 bytes, split by file into train and held out."""
    global _CORPUS
    if _CORPUS is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        train, held = [], []
        for path in _stdlib_files():
            docs = _docstrings(path)
            if docs:
                (held if _held_out(path.relative_to(root).as_posix()) else train).append("\n\n".join(docs))
        _CORPUS = Corpus("\n\n".join(train).encode(), "\n\n".join(held).encode())
    return _CORPUS


def encode(text: str) -> torch.Tensor:
    """Byte tokens of `text` (int64)."""
    return _tokens(text.encode())


def decode(tokens) -> str:
    return bytes(int(t) for t in tokens).decode("utf-8", errors="replace")


def _tokens(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


# ----------------------------------------------------------------------------- model


def build(recipe: Recipe = DEFAULT_RECIPE, *, attn_implementation: str = "eager"):
    """The untrained ``LlamaForCausalLM`` of `recipe` (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256, hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
        max_position_embeddings=recipe.context, rms_norm_eps=1e-5, attention_dropout=0.0, tie_word_embeddings=False,
        bos_token_id=None, eos_token_id=None, pad_token_id=None, attn_implementation=attn_implementation,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        return LlamaForCausalLM(config)


def _lr(step: int, recipe: Recipe) -> float:
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(recipe: Recipe = DEFAULT_RECIPE, data: bytes | None = None, *, log=None):
    """Train `recipe` on `data` (default: the corpus's training text); returns (model, losses)."""
    tokens = _tokens(corpus().train if data is None else data)
    if tokens.numel() < recipe.seq + 2:
        raise ValueError(f"training text of {tokens.numel()} bytes is shorter than one window of {recipe.seq + 1}")
    model = build(recipe).train()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=recipe.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    losses = []
    started = time.perf_counter()
    for step in range(recipe.steps):
        starts = torch.randint(0, tokens.numel() - recipe.seq - 1, (recipe.batch,), generator=gen)
        window = torch.stack([tokens[s : s + recipe.seq + 1] for s in starts.tolist()])
        for group in opt.param_groups:
            group["lr"] = _lr(step, recipe)
        # HF shifts the labels itself: position t predicts window[t + 1].
        loss = model(input_ids=window, labels=window, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if log and (step % 50 == 0 or step == recipe.steps - 1):
            log(f"step {step}/{recipe.steps}: loss {loss.item():.3f} ({time.perf_counter() - started:.0f} s)")
    return model.eval(), losses


# ----------------------------------------------------------------------------- evaluation


def held_out_tokens(n_bytes: int = 65536) -> torch.Tensor:
    """The first `n_bytes` of the held-out text (modules the model never saw)."""
    return _tokens(corpus().held_out[:n_bytes])


@torch.no_grad()
def perplexity(logits_of, tokens: torch.Tensor, window: int = 256, batch: int = 8) -> float:
    """exp(mean next-byte negative log-likelihood) over non-overlapping windows of `tokens`;
    `logits_of(input_ids (B, T)) -> (B, T, 256)` is any model: eager, compiled, quantized."""
    n = (tokens.numel() // window) * window
    windows = tokens[:n].view(-1, window)
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i : i + batch]
        logits = logits_of(ids).double()  # sums of many fp32 terms would drift in the 6th digit
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                                reduction="sum")
        total += nll.item()
        count += ids[:, 1:].numel()
    return math.exp(total / count)


def logits_fn(model):
    """`logits_of` for an HF causal LM (no cache)."""
    return lambda ids: model(input_ids=ids, use_cache=False).logits


# ----------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    root = os.environ.get("MEMSAVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "memsave"
    )
    return Path(root) / "docs_lm"


def path_for(recipe: Recipe | None = None) -> Path:
    """Where `recipe`'s trained model is (or will be) cached: a folder with model.safetensors,
    config.json and meta.json."""
    return cache_dir() / (recipe or DEFAULT_RECIPE).key(corpus().hash)


def save(model, folder: Path, meta: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / "model.safetensors.partial"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(partial))
    (folder / "config.json").write_text(model.config.to_json_string())
    (folder / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(partial, folder / "model.safetensors")  # last: a folder with it is complete


def load_folder(folder: Path, recipe: Recipe = DEFAULT_RECIPE, *, attn_implementation: str = "eager"):
    from safetensors.torch import load_file

    model = build(recipe, attn_implementation=attn_implementation)
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()


def load(recipe: Recipe | None = None, *, rebuild: bool = False, attn_implementation: str = "eager", log=None):
    """The trained model of `recipe`: from the cache, or trained now (a few CPU minutes) and
    cached. Returns (model, meta) where meta has the held-out perplexity and how it was made."""
    recipe = recipe or DEFAULT_RECIPE
    folder = path_for(recipe)
    if rebuild or not (folder / "model.safetensors").exists():
        threads = torch.get_num_threads()
        started = time.perf_counter()
        model, losses = train(recipe, log=log)
        seconds = time.perf_counter() - started
        ppl = perplexity(logits_fn(model), held_out_tokens())
        meta = {"recipe": dataclasses.asdict(recipe), "corpus": corpus().hash, "python": sys.version.split()[0],
                "train_bytes": len(corpus().train), "held_out_bytes": len(corpus().held_out),
                "parameters": sum(p.numel() for p in model.parameters()), "train_seconds": round(seconds, 1),
                "threads": threads, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                "held_out_perplexity": ppl, "held_out_bits_per_byte": math.log2(ppl)}
        save(model, folder, meta)
    meta = json.loads((folder / "meta.json").read_text())
    return load_folder(folder, recipe, attn_implementation=attn_implementation), meta
