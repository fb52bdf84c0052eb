"""Generated kernel source → a file named by its hash → an imported module.

Triton compiles a @triton.jit function from its source file ("@jit functions should be
defined in a Python file": `exec` of a string works only under the interpreter), so each
generated kernel is written to `<cache>/memsave_triton_<sha256[:20]>.py` and imported from
there. The same source always maps to the same file, which is reused (after checking its
text, so a half-written file from a killed process is rewritten); a changed template or spec
gives a new hash and a new file.

Cache directory: $MEMSAVE_TRITON_CACHE, else ~/.cache/memsave/triton.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

CACHE_ENV = "MEMSAVE_TRITON_CACHE"
MODULE_PREFIX = "memsave_triton_"

_lock = threading.Lock()
_modules: dict[Path, ModuleType] = {}


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "memsave" / "triton"


def source_hash(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:20]


def emit(source: str) -> Path:
    """Write `source` to its hash-named file (unless an identical one is there); its path."""
    directory = cache_dir()
    path = directory / f"{MODULE_PREFIX}{source_hash(source)}.py"
    try:
        if path.read_text() == source:
            return path
    except (FileNotFoundError, UnicodeDecodeError):
        pass
    try:
        directory.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: another process importing the file never sees it half-written.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp_", suffix=".py")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(source)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as e:
        raise OSError(
            f"memsave triton: cannot write generated kernel to {directory} ({e}); "
            f"set {CACHE_ENV} to a writable directory"
        ) from e
    return path


def load(source: str) -> ModuleType:
    """Import the module for `source` (emitting its file first); one module per file per process.

    @triton.jit reads TRITON_INTERPRET when the module is imported: a module loaded under the
    interpreter stays interpreted. Interpreted and compiled kernels come from different
    sources (the spec records `interpret`), hence different files and modules.
    """
    path = emit(source)
    with _lock:
        module = _modules.get(path)
        if module is None:
            name = path.stem
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)
            # Registered before running it, like a normal import: Triton and inspect look
            # functions' modules up by name.
            sys.modules[name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
            _modules[path] = module
    return module


# The head of every hand-written kernel module (chunked_ce.py, kv_attention.py): imports and the
# combine functions their tl.reduce calls take. Only Triton builtins (tl.full, tl.reduce with
# these, ...), never its @jit helpers (zeros, sum, max of triton.language.standard): those work
# under TRITON_INTERPRET=1 only when the variable was set before triton was imported (templates.py).
REDUCE_PREAMBLE = """
import triton
import triton.language as tl


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)

"""


@functools.cache
def load_kernels(name: str, body: str, interpret: bool) -> ModuleType:
    """The module of a hand-written kernel file: REDUCE_PREAMBLE then `body`, once per process
    and mode. A module loaded under the interpreter stays interpreted, so each mode has its own
    source (the mode is in its first line), hence its own file."""
    return load(f"# memsave {name}; interpret={interpret}\n{REDUCE_PREAMBLE}{body}")
