"""The process as the operating system sees it: resident memory, and giving freed memory back.

memsave frees the full-precision weights it compressed; whether the process's RSS then falls
depends on the C allocator. glibc's malloc (every Linux user's default) keeps freed memory
in its heap unless the free block sits at the top of the heap: after the first large block
that was mmapped is freed, glibc raises its mmap threshold (dynamically, up to 32 MiB), so
later tensors come from the heap, and their memory stays in the process after they die.
Measured on an HF Llama (204 MiB of fp32 weights, int8): RSS 2.1x the fp32 weight bytes
after compiling, 0.6x after `malloc_trim(0)`.

Note [What memsave does to its host's allocator]
memsave calls `malloc_trim(0)` (`give_back`) after it frees weights and after compiling a
graph. That only returns pages that are already free (glibc madvises them away, top of heap
or not; the next allocation faults fresh pages in): it never changes what the program holds
or how it allocates afterwards, costs a few milliseconds (2.5 ms measured with a 300 MiB
heap), and is what a host would call itself. memsave does not call `mallopt` (e.g.
M_MMAP_THRESHOLD = 128 KiB, what `MALLOC_MMAP_THRESHOLD_` sets): that would change how every
later allocation of the whole process is served — every tensor of 128 KiB or more mmapped
and unmapped, page faults on each reuse — for the rest of the process's life, a decision
for the application, not for a library inside it. `give_back` does nothing where the C
library is not glibc (musl, macOS: no `malloc_trim`).

RSS is read from /proc/self/statm (Linux); elsewhere the readers return None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading
import time
import warnings
from dataclasses import dataclass

import torch

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_lock = threading.Lock()
_trim = None  # the C function, once looked up; False when there is none
TRIMS = {"calls": 0, "seconds": 0.0}  # how often give_back trimmed, and what it cost (reports, tests)


def rss_bytes() -> int | None:
    """The process's resident set size now (bytes), or None where /proc is not available."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_bytes() -> int | None:
    """VmHWM: the peak RSS since the process started or since `reset_peak_rss()`."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Restart VmHWM from the current RSS (writes 5 to /proc/self/clear_refs). For benchmarks
    and tests: a library must not call it, since it resets the host's own peak too."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim():
    global _trim
    if _trim is None:
        _trim = False
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            # gnu_get_libc_version exists only in glibc; musl has no malloc_trim at all.
            if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "malloc_trim"):
                libc.malloc_trim.argtypes = [ctypes.c_size_t]
                libc.malloc_trim.restype = ctypes.c_int
                _trim = libc.malloc_trim
        except OSError:
            pass
    return _trim


def can_give_back() -> bool:
    return bool(_malloc_trim())


def give_back() -> bool:
    """Return the C heap's free pages to the operating system (glibc `malloc_trim(0)`); see
    Note [What memsave does to its host's allocator]. False where there is no such call."""
    trim = _malloc_trim()
    if not trim:
        return False
    start = time.perf_counter()
    with _lock:
        trim(0)
    TRIMS["calls"] += 1
    TRIMS["seconds"] += time.perf_counter() - start
    return True


MAPPED_MIN_BYTES = 1 << 20


def mapped_zeros(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A zero-filled CPU tensor in its own anonymous memory mapping, outside the C heap.

    For large buffers memsave keeps a while and then frees in the middle of other work (the
    calibration statistics): freed, a mapping goes back to the OS at once (munmap), where a
    heap block would leave a hole that later allocations fault back in and never return.
    Smaller than MAPPED_MIN_BYTES, or where mmap is missing: an ordinary tensor. The storage
    cannot be resized."""
    count = 1
    for n in shape:
        count *= n
    nbytes = count * torch.empty(0, dtype=dtype).element_size()
    if nbytes < MAPPED_MIN_BYTES:
        return torch.zeros(shape, dtype=dtype)
    try:
        buffer = mmap.mmap(-1, nbytes)  # anonymous: zero-filled pages, faulted in on first touch
    except (OSError, ValueError):
        return torch.zeros(shape, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "The given buffer is not writable": it is
        return torch.frombuffer(buffer, dtype=dtype, count=count).view(shape)


@dataclass(frozen=True)
class ProcessMemory:
    """The process's RSS around one compile, beside memsave's own count of what it holds."""

    rss_before: int | None  # bytes, when the graph reached memsave's passes
    rss_after: int | None  # bytes, after lowering (and giving freed memory back)
    held_bytes: int  # WeightCache.held_bytes of the graph's weights: originals left + compressed forms

    @property
    def growth(self) -> int | None:
        if self.rss_before is None or self.rss_after is None:
            return None
        return self.rss_after - self.rss_before
