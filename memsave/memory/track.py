"""Measured memory: the peak of live tensor bytes during a real call, eager or compiled.

Note [Why the profiler and not a TorchDispatchMode]
A TorchDispatchMode on the stack makes Dynamo fall back to eager, so a tracker built on one
measures eager code even when the user called a compiled model; and Inductor's CPU kernels
allocate their buffers in C++, out of a dispatch mode's sight. The allocator itself sees
everything: with `profile_memory=True` the c10 CPU allocator reports every allocation and
free (pointer, size, time) to the profiler, Inductor's C++ buffers included, and the
profiler does not change which code Dynamo runs. We replay those events in time order to get
the peak of (allocated − freed) bytes since the block began.

Blocks allocated before the block began and freed inside it are not reported by the CPU
allocator (it only knows sizes it saw), so start tracking before the tensors whose frees you
want counted (e.g. around forward *and* backward of a training step).

On CUDA, `torch.cuda.max_memory_allocated` gives the same number directly.

Saved-for-backward bytes are counted with `torch.autograd.graph.saved_tensors_hooks`, which
sees what any backend saves (eager autograd and AOTAutograd's compiled functions alike).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

# Kineto prints "profiler_start/stop" lines on every profile at its default level; level 6
# silences them. Must be set before the first profiler use, after `import torch` is fine.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")


@dataclass(frozen=True)
class MemoryStats:
    device: str
    peak_bytes: int  # peak of live bytes allocated inside the block, above the level at its start
    end_bytes: int  # bytes allocated inside the block and still alive at its end
    n_allocations: int  # allocation events seen (CPU only; -1 on CUDA)
    saved_bytes: int | None = None  # unique storage bytes saved for backward (track_saved=True)

    @property
    def peak_mib(self) -> float:
        return self.peak_bytes / 2**20


class MemoryTracker:
    """Context manager measuring peak live bytes of a block, on CPU or CUDA.

        with MemoryTracker() as tracker:
            out = compiled(x)
        tracker.stats.peak_bytes

    device: "cpu", "cuda", or None to pick CUDA when available.
    track_saved: also sum the bytes of unique storages saved for backward in the block.
    exclude: tensors whose storages are not counted as saved (pass the model's parameters:
        autograd saves weights for the backward of matmuls, but they are not activations).
    """

    def __init__(self, device: str | None = None, *, track_saved: bool = False, exclude=()):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in ("cpu", "cuda"):
            raise ValueError(f"MemoryTracker: device must be 'cpu' or 'cuda', got {device!r}")
        self.device = device
        self.track_saved = track_saved
        self.stats: MemoryStats | None = None
        self._saved: dict[int, int] = {}
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude if isinstance(t, torch.Tensor)}
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> MemoryTracker:
        if self.track_saved:
            self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack))
        if self.device == "cuda":
            torch.cuda.synchronize()
            self._cuda_start = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            from torch.profiler import ProfilerActivity, profile

            if torch.autograd.profiler._is_profiler_enabled:
                raise RuntimeError("MemoryTracker: a profiler is already running; nested tracking is not supported")
            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._stack.enter_context(self._prof)
        return self

    def __exit__(self, *exc) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - self._cuda_start
            end = torch.cuda.memory_allocated() - self._cuda_start
            self._stack.close()
            self.stats = MemoryStats("cuda", max(peak, 0), end, -1, self._saved_total())
            return
        self._stack.close()
        peak, end, n = _replay_allocations(self._prof)
        self.stats = MemoryStats("cpu", peak, end, n, self._saved_total())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._excluded:
            self._saved[storage.data_ptr()] = storage.nbytes()
        return t

    def _saved_total(self) -> int | None:
        return sum(self._saved.values()) if self.track_saved else None


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t


def _replay_allocations(prof) -> tuple[int, int, int]:
    """Peak and final running sum of CPU allocation events, in time order."""
    from torch._C._profiler import _EventType

    events: list[tuple[int, int]] = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        # Other devices are measured by their own allocator's statistics, not here.
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            events.append((node.start_time_ns, node.extra_fields.alloc_size))
        stack.extend(node.children)
    events.sort(key=lambda e: e[0])
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak, live, len(events)


def measure_peak(
    fn: Callable[..., Any], *args: Any, device: str | None = None, track_saved: bool = False, exclude=(), **kwargs: Any
):
    """Run `fn(*args, **kwargs)` once under a MemoryTracker; returns (result, MemoryStats)."""
    with MemoryTracker(device, track_saved=track_saved, exclude=exclude) as tracker:
        result = fn(*args, **kwargs)
    return result, tracker.stats


def live_tensor_bytes(tensors) -> int:
    """Bytes of the unique storages behind some tensors (e.g. a module's parameters)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())
