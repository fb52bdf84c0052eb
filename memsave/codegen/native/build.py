"""Build and load memsave's C kernels (linear.c) for this machine.

The source ships with the package and is compiled on first use with the C compiler Inductor
would use anyway (`$CC`, else `gcc`, else `cc`), for this CPU (`-march=native`), with OpenMP.
The shared object goes to a cache directory under a name that hashes the source, the flags,
the compiler's version and the CPU's feature flags, so a rebuilt package or another machine
sharing a home directory never loads a stale or foreign build. It is written to a temporary
file and renamed into place, so processes compiling at once (ranks of a distributed job) never
load a half-written file.

`library()` returns the loaded library, or None when there is no compiler or the build
failed; `unavailable_reason()` then says why, and the kernels that need it do not apply (the
reference ops run instead, and the report says which kernel ran).

OpenMP: the object links against `libgomp.so.1`, the soname torch's own OpenMP runtime has, so
the loader reuses torch's copy: one thread pool, sized by `torch.set_num_threads`.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("linear.c")
FLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-std=gnu11", "-shared", "-fPIC")

_failure: str | None = None


def cache_dir() -> Path:
    root = os.environ.get("MEMSAVE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "memsave"
    )
    return Path(root) / "native"


def compiler() -> str | None:
    for candidate in (os.environ.get("CC"), "gcc", "cc"):
        if candidate and shutil.which(candidate):
            return candidate
    return None


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


@functools.cache
def library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled kernels, built on first call; None (see unavailable_reason) if they cannot be.
    `extra_flags` builds a variant (tests build the portable C path with ("-mno-avx512f",))."""
    global _failure
    cc = compiler()
    if cc is None:
        _failure = "no C compiler found ($CC, gcc or cc)"
        return None
    flags = FLAGS + tuple(extra_flags)
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), " ".join(flags), _version(cc), _cpu_features(), platform.machine()]).encode()
    ).hexdigest()[:20]
    target = cache_dir() / f"memsave_linear_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            done = subprocess.run([cc, *flags, str(SOURCE), "-o", partial, "-lm"], capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                _failure = f"compiling {SOURCE.name} with {cc} failed: {done.stderr.strip()[-2000:]}"
                return None
            os.replace(partial, target)
        except (OSError, subprocess.SubprocessError) as e:
            _failure = f"compiling {SOURCE.name} with {cc} failed: {e}"
            return None
        finally:
            if os.path.exists(partial):
                os.unlink(partial)
    try:
        return ctypes.CDLL(str(target))
    except OSError as e:
        _failure = f"loading {target} failed: {e}"
        return None


def unavailable_reason() -> str | None:
    return None if library() is not None else _failure
