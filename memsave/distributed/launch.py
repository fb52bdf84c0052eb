"""Start N ranks on this machine, and make one rank's failure everyone's, quickly.

`launch(fn, nprocs, args)` spawns `nprocs` processes (torch.multiprocessing, "spawn": a fresh
interpreter per rank, as torchrun gives), initializes the default process group in each
(gloo on CPUs, NCCL when every rank has a GPU) with a timeout, calls `fn(rank, world_size,
*args)` and returns the ranks' return values in rank order. It is what the tests and
`memsave demo --nproc N` use; users can equally run their script under
`torchrun --nproc-per-node N`.

Faults. A rank that raises sends its traceback to the parent and exits at once with status
1 (`os._exit`: a normal exit would wait in the process group's destructor for peers that are
themselves waiting for it). The parent, on the first failure, gives the others `grace_s` to
finish, then terminates them (SIGTERM, then SIGKILL), and raises `RankFailed` with the failing
rank's error text. Every rank thus exits non-zero within about `grace_s` + a few seconds of
the first error, never hangs: the whole run is also bounded by `timeout_s`, and collectives by
the process group's timeout.
"""

from __future__ import annotations

import datetime
import os
import queue
import socket
import time
import traceback
from typing import Any, Callable, Sequence

import torch
import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    """A rank raised (or died, or the run timed out); the message holds its error."""

    def __init__(self, message: str, rank: int | None, exitcodes: dict[int, int | None]):
        super().__init__(message)
        self.rank, self.exitcodes = rank, exitcodes


def free_port() -> int:
    """A TCP port free now on localhost (each launch gets its own: tests never collide)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    fn: Callable[..., Any],
    nprocs: int,
    args: Sequence[Any] = (),
    *,
    timeout_s: float = 120.0,
    pg_timeout_s: float = 60.0,
    grace_s: float = 5.0,
    backend: str | None = None,
    threads: int = 1,
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` on `nprocs` fresh processes; results in rank order.

    `fn` must be a module-level function (spawn pickles it by name). `threads` is each rank's
    torch.set_num_threads (ranks sharing a machine's cores would otherwise oversubscribe it).
    """
    if isinstance(nprocs, bool) or not isinstance(nprocs, int) or nprocs < 1:
        raise ValueError(f"memsave.distributed.launch: nprocs must be a positive integer, got {nprocs!r}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nprocs else "gloo"
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(rank, nprocs, port, backend, pg_timeout_s, threads, fn, tuple(args), results, errors),
            daemon=True,
        )
        for rank in range(nprocs)
    ]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    outputs: dict[int, Any] = {}
    failure: tuple[int | None, str] | None = None
    try:
        while True:
            while not results.empty():
                rank, value = results.get()
                outputs[rank] = value
            if not errors.empty():
                failure = errors.get()
                break
            codes = [p.exitcode for p in procs]
            if all(c == 0 for c in codes):
                break
            dead = [r for r, c in enumerate(codes) if c not in (None, 0)]
            if dead:
                # Died without reporting (killed, segfault): give its report a moment to land.
                time.sleep(0.5)
                failure = errors.get() if not errors.empty() else (dead[0], f"rank {dead[0]} exited with status {codes[dead[0]]}")
                break
            if time.monotonic() > deadline:
                waiting = [r for r in range(nprocs) if r not in outputs]
                failure = (None, f"timed out after {timeout_s:.0f} s; ranks without a result: {waiting}")
                break
            time.sleep(0.05)
        if failure is not None:
            _stop(procs, grace_s)
            codes = {r: p.exitcode for r, p in enumerate(procs)}
            rank, text = failure
            where = f"rank {rank} of {nprocs} failed" if rank is not None else f"{nprocs}-rank run failed"
            raise RankFailed(f"{where}: {text}\nexit codes: {codes}", rank, codes)
        while not results.empty():
            rank, value = results.get()
            outputs[rank] = value
        for p in procs:
            p.join()
        return [outputs.get(r) for r in range(nprocs)]
    finally:
        _stop(procs, 0.0)


def _stop(procs, grace_s: float) -> None:
    end = time.monotonic() + grace_s
    for p in procs:
        p.join(max(0.0, end - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(2.0)
        if p.is_alive():
            p.kill()
            p.join(2.0)


def _rank_main(rank, world, port, backend, pg_timeout_s, threads, fn, args, results, errors) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    try:
        torch.set_num_threads(threads)
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=pg_timeout_s))
        value = fn(rank, world, *args)
        results.put((rank, value))
    except BaseException as e:  # noqa: BLE001 - every error must reach the parent
        errors.put((rank, f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        os._exit(1)
    try:
        dist.barrier()
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the result is in; a peer that died is the parent's business
        os._exit(1)
    os._exit(0)
