"""Shared benchmark harness: one fresh process per run, interleaved repeats, medians, ratios.

A benchmark script declares a :class:`Benchmark` and calls :func:`main`::

    from benchmarks.harness import Benchmark, main

    def measure(config: str, params: dict) -> dict[str, float]:
        ...  # runs in a fresh process: build, warm up, measure
        return {"time_ms": ..., "peak_rss_mib": ...}

    BENCH = Benchmark(name="foundation", title="...", configs=["eager", "memsave"],
                      baseline="eager", measure=measure,
                      metrics={"time_ms": "lower", "peak_rss_mib": "lower"},
                      params={"size": "small"}, repeats=5)

    if __name__ == "__main__":
        main(BENCH)

The parent process re-runs the same script as ``<script> --worker <config> --params <json>``
once per config per repeat, in the order A, B, C, A, B, C, ... so that drift on a shared
machine hits every config alike. Each child prints its metrics as one JSON line behind
:data:`RESULT_MARKER`. The parent writes ``<out>/<name>.json`` (raw runs), ``.md`` and ``.png``.
``<script> --redraw`` rewrites the ``.md`` and ``.png`` from the JSON; ``--quick``, ``--configs``
and ``--merge`` are the same on every script (:func:`main` is the one command line).
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "docs" / "results"
RESULT_MARKER = "@@memsave-bench-result@@ "
MiB = 1024 * 1024

# Params the harness itself understands, allowed even when a benchmark does not declare them.
HARNESS_PARAMS = ("threads", "quick")

# Fixed glibc mmap threshold: blocks >= 128 KiB are mmap'd and unmapped on free. Without it
# glibc raises the threshold dynamically (up to 32 MiB) after the first large free, keeps
# later frees in its heap, and RSS then overstates what the program really holds.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "KINETO_LOG_LEVEL": "6", "PYTHONUNBUFFERED": "1"}

_NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")  # safe in file names, argv and markdown tables
_STDERR_TAIL_LINES = 30
MACHINE_INFO_TIMEOUT_S = 300.0


# --------------------------------------------------------------------------- declaration


@dataclass(frozen=True)
class Part:
    """Configs compared with a baseline of their own, run as one interleaved block (e.g. one
    model's variants against its eager run, or a speed part beside a fidelity part). ``repeats``
    is the part's default (``--repeats`` and ``--quick`` override it); ``params`` are overrides
    its children get (e.g. ``threads``); ``metrics`` replace the benchmark's for this part."""

    configs: Sequence[str]
    baseline: str
    repeats: int | None = None
    params: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, str] | None = None


@dataclass
class Benchmark:
    """One benchmark: which configs to compare, how to measure one run, what to report.

    ``metrics`` maps each reported metric to the direction that is better ("lower" or
    "higher"); ``measure`` may return further values (kept in the JSON, not in the table).
    ``params`` are passed to ``measure`` and can be overridden with ``--param key=value``.
    ``plot`` names the metric(s) to draw; by default every metric in ``metrics``.

    A benchmark with a report of its own passes ``report`` (results -> markdown; see
    :func:`with_sections`) and/or ``draw`` (results, png path). ``--quick`` runs one repeat of
    ``quick_configs`` (default: all) with ``quick`` merged into the params and writes
    ``<name>_quick.*``. ``parts(params)`` splits the configs into :class:`Part` s, each with its
    own baseline (by default one part: every config against ``baseline``).
    """

    name: str
    title: str
    configs: Sequence[str]
    baseline: str
    measure: Callable[[str, dict], Mapping[str, float]]
    metrics: Mapping[str, str]
    params: Mapping[str, Any] = field(default_factory=dict)
    repeats: int = 5
    plot: str | Sequence[str] | None = None
    timeout_s: float = 600.0
    # True: children run with the C allocator's default settings, as a user's process does
    # (no MALLOC_* variables: neither CHILD_ENV's fixed mmap threshold nor the parent's own).
    # For benchmarks whose question is what the operating system sees.
    default_allocator: bool = False
    report: Callable[[Mapping], str] | None = None
    draw: Callable[[Mapping, Path], None] | None = None
    quick: Mapping[str, Any] = field(default_factory=dict)
    quick_configs: Sequence[str] | None = None
    parts: Callable[[Mapping[str, Any]], Mapping[str, Part]] | None = None

    def __post_init__(self) -> None:
        self.configs = list(self.configs)
        unknown = [c for c in self.quick_configs or () if c not in self.configs]
        if unknown:
            raise ValueError(f"quick_configs {unknown} are not among the configs {self.configs}")
        self.metrics = dict(self.metrics)
        self.params = dict(self.params)
        if not _NAME_RE.match(self.name):
            raise ValueError(f"benchmark name {self.name!r} must match {_NAME_RE.pattern}")
        if not self.configs or len(set(self.configs)) != len(self.configs):
            raise ValueError(f"configs must be non-empty and unique, got {self.configs}")
        for config in self.configs:
            if not _NAME_RE.match(config):
                raise ValueError(f"config name {config!r} must match {_NAME_RE.pattern}")
        if self.baseline not in self.configs:
            raise ValueError(f"baseline {self.baseline!r} is not one of the configs {self.configs}")
        if not self.metrics:
            raise ValueError("metrics must name at least one metric")
        for metric, direction in self.metrics.items():
            if direction not in ("lower", "higher"):
                raise ValueError(f"metric {metric!r}: direction must be 'lower' or 'higher', got {direction!r}")
        self.plot = [self.plot] if isinstance(self.plot, str) else list(self.plot or self.metrics)
        unknown = [m for m in self.plot if m not in self.metrics]
        if unknown:
            raise ValueError(f"plot names metrics not in metrics: {unknown}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        json.dumps(self.params)  # params travel to the child as JSON; fail here, not there


# --------------------------------------------------------------------------- helpers for measure()


def _proc_status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise RuntimeError(f"{key} not found in /proc/self/status (needs Linux)")


def _malloc_trim() -> None:
    # Freed allocations below the mmap threshold stay in glibc's heap and still count as
    # RSS; later allocations reuse them without raising RSS, so a peak measured from such
    # a baseline understates growth. malloc_trim(0) hands those free pages back first.
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
        pass


def reset_peak_rss() -> None:
    """Return freed heap memory to the OS, then restart the peak-RSS counter (VmHWM) from the current RSS."""
    _malloc_trim()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_bytes() -> int:
    """Peak resident set size since process start or the last :func:`reset_peak_rss`."""
    return _proc_status_bytes("VmHWM")


def current_rss_bytes() -> int:
    """Current resident set size."""
    return _proc_status_bytes("VmRSS")


def estimated_peak_mib(reports) -> float | None:
    """memsave's estimated peak for the call that made `reports` (memsave.collect()): the joint
    graphs' simulated forward+backward peak (after narrowing saved activations, if a precision
    option did; else the recompute record's), or the inference graphs' last estimate."""
    joint = []
    for report in reports:
        if report.stage != "joint":
            continue
        records = {rec.name: rec for rec in report.records}
        if "narrow_saved" in records:
            joint.append(records["narrow_saved"].peak_activation_bytes_after)
        elif "recompute" in records:
            joint.append(records["recompute"].details["peak_activation_bytes"])
    if joint:
        return sum(joint) / MiB
    inference = [r.records[-1].peak_activation_bytes_after for r in reports if r.stage == "inference" and r.records]
    return sum(inference) / MiB if inference else None


def _cuda_sync() -> Callable[[], None]:
    # Only synchronize when the benchmark already uses CUDA: calling into torch.cuda from a
    # CPU benchmark would create a CUDA context, which costs hundreds of MiB of RSS.
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.synchronize
    return lambda: None


def time_call(fn: Callable[[], Any], warmup: int = 2, iters: int = 10) -> list[float]:
    """Milliseconds of each of ``iters`` calls of ``fn`` after ``warmup`` calls.

    Waits for CUDA work when CUDA is in use. Report the median of the returned list.
    """
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    for _ in range(warmup):
        fn()
    sync = _cuda_sync()  # decided after warmup, which may be what first touches CUDA
    sync()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    # Metadata instead of import: importing transformers alone takes seconds.
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _ram_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """What the numbers were measured on: CPU, cores, RAM, GPU, library versions, date."""
    info = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "available_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": _ram_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "gpu": None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import torch
    except ImportError:
        return info
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        name = torch.cuda.get_device_name(0)
        info["gpu"] = name if count == 1 else f"{count} x {name}"
        info["cuda"] = torch.version.cuda
    return info


# --------------------------------------------------------------------------- child side


def _emit(payload: dict) -> None:
    # Leading newline: C-level output without a trailing newline must not swallow the marker.
    sys.stdout.flush()
    print("\n" + RESULT_MARKER + json.dumps(payload), flush=True)


def _check_metrics(metrics: Any) -> dict[str, float]:
    if not isinstance(metrics, Mapping):
        raise TypeError(f"measure() must return a dict of metric -> number, got {type(metrics).__name__}")
    checked = {}
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(f"metric names must be strings, got {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"metric {key!r} must be a finite number, got {value!r}")
        checked[key] = float(value)
    return checked


def _run_worker(bench: Benchmark, config: str, params: dict) -> None:
    if config not in bench.configs:
        raise SystemExit(f"unknown config {config!r}; expected one of {bench.configs}")
    if params.get("threads") is not None:
        import torch

        torch.set_num_threads(int(params["threads"]))
    _emit(_check_metrics(bench.measure(config, params)))


def _machine_info_script() -> str:
    # Collected in a child so the parent never creates a CUDA context of its own.
    return "import benchmarks.harness as h; h._emit(h.machine_info())"


# --------------------------------------------------------------------------- parent side


def _child_env(params: Mapping[str, Any], default_allocator: bool = False) -> dict[str, str]:
    env = dict(os.environ, **CHILD_ENV)
    if default_allocator:
        env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
    # The repo root on the path lets a script anywhere (even in a temp dir) import benchmarks.*
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
    if params.get("threads") is not None:
        env["OMP_NUM_THREADS"] = str(int(params["threads"]))
    return env


def _entry_point(bench: Benchmark) -> list[str]:
    """How to start the benchmark script again: ``-m pkg.mod`` or the script's path."""
    module = sys.modules[bench.measure.__module__]
    if module.__name__ != "__main__":
        return ["-m", module.__name__]
    spec = getattr(module, "__spec__", None)
    if spec is not None and spec.name:  # started with python -m
        return ["-m", spec.name]
    return [os.path.abspath(module.__file__)]


def _wait_unreaped(pid: int, timeout_s: float) -> bool:
    """Wait for ``pid`` to exit without reaping it; False on timeout.

    While the child stays a zombie its pid, and so its process-group id, cannot be reused,
    which makes the killpg() that follows safe.
    """
    deadline = time.monotonic() + timeout_s
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def _tail(text: str, lines: int = _STDERR_TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def run_child(cmd: Sequence[str], env: Mapping[str, str], timeout_s: float) -> dict:
    """Run one child; return ``{"ok", "metrics", "error", "wall_s"}``. Never raises for child failures."""
    # Files, not pipes: a grandchild (e.g. an Inductor compile worker) that inherits a pipe
    # would keep it open after the child exits and hang the read.
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd), stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=dict(env), start_new_session=True
        )
        try:
            finished = _wait_unreaped(proc.pid, timeout_s)
        finally:
            # Kill the whole group: leftover grandchildren must not eat CPU during the next run.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            returncode = proc.wait()
        wall_s = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")

    error = None
    metrics = None
    if not finished:
        error = f"timed out after {timeout_s:g} s"
    elif returncode != 0:
        error = f"exited with code {returncode}"
    else:
        found = [line.partition(RESULT_MARKER)[2] for line in stdout.splitlines() if RESULT_MARKER in line]
        if len(found) != 1:
            error = f"expected exactly one result line on stdout, found {len(found)}"
        else:
            try:
                metrics = json.loads(found[0])
            except json.JSONDecodeError as exc:
                error = f"unreadable result line: {exc}"
    if error is not None:
        tail = _tail(stderr) or _tail(stdout)
        error = error + ("\n" + tail if tail else "")
    return {"ok": error is None, "metrics": metrics, "error": error, "wall_s": round(wall_s, 3)}


def summarize(runs: Sequence[dict], configs: Sequence[str], baseline: str, metrics: Mapping[str, str]) -> dict:
    """Per config: runs ok/total, and per metric median/min/max/n and the ratio to the baseline median."""
    summary = {}
    for config in configs:
        mine = [r for r in runs if r["config"] == config]
        ok = [r for r in mine if r["ok"]]
        stats = {}
        for metric in metrics:
            values = [r["metrics"][metric] for r in ok if metric in r["metrics"]]
            if values:
                stats[metric] = {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}
        summary[config] = {"runs": len(mine), "ok": len(ok), "metrics": stats}
    for config in configs:
        for metric, stat in summary[config]["metrics"].items():
            base = summary[baseline]["metrics"].get(metric)
            # No ratio to or from an infinite median (an SQNR of identical outputs is inf).
            finite = base is not None and math.isfinite(base["median"]) and math.isfinite(stat["median"])
            stat["ratio"] = stat["median"] / base["median"] if finite and base["median"] != 0 else None
    return summary


def collect_machine_info(env: Mapping[str, str]) -> dict:
    # Its own timeout: --timeout is about one benchmark run, not about importing torch.
    info = run_child([sys.executable, "-c", _machine_info_script()], env, MACHINE_INFO_TIMEOUT_S)
    if not info["ok"]:
        raise RuntimeError(f"could not collect machine info in a child process: {info['error']}")
    return info["metrics"]


def run_benchmark(
    bench: Benchmark,
    *,
    configs: Sequence[str] | None = None,
    repeats: int | None = None,
    params: Mapping[str, Any] | None = None,
    timeout_s: float | None = None,
    command: str = "",
    machine: dict | None = None,
) -> dict:
    """Run every config ``repeats`` times, interleaved, each in a fresh process; return the results
    dict. ``machine``: the machine record if the caller has it already (else collected here)."""
    configs = list(configs or bench.configs)
    if bench.baseline not in configs:
        raise ValueError(f"configs {configs} must include the baseline {bench.baseline!r}")
    repeats = bench.repeats if repeats is None else repeats
    params = dict(bench.params if params is None else params)
    timeout_s = bench.timeout_s if timeout_s is None else timeout_s
    env = _child_env(params, bench.default_allocator)

    if machine is None:
        machine = collect_machine_info(env)

    entry = _entry_point(bench)
    runs = []
    total = repeats * len(configs)
    for repeat in range(repeats):
        for config in configs:  # interleaved: A, B, C, A, B, C, ...
            print(f"[{len(runs) + 1}/{total}] {config} (repeat {repeat + 1}/{repeats}) ... ", end="", flush=True)
            cmd = [sys.executable, *entry, "--worker", config, "--params", json.dumps(params)]
            run = {"config": config, "repeat": repeat, **run_child(cmd, env, timeout_s)}
            runs.append(run)
            if run["ok"]:
                shown = ", ".join(f"{m}={_fmt(run['metrics'][m])}" for m in bench.metrics if m in run["metrics"])
                print(f"{shown} ({run['wall_s']:.1f} s)", flush=True)
                missing = [m for m in bench.metrics if m not in run["metrics"]]
                if missing:
                    print(f"    warning: measure() did not return {missing}", flush=True)
            else:
                print("FAILED: " + run["error"].replace("\n", "\n    "), flush=True)

    return {
        "name": bench.name,
        "title": bench.title,
        "command": command,
        "machine": machine,
        "params": params,
        "repeats": repeats,
        "configs": configs,
        "baseline": bench.baseline,
        "metrics": dict(bench.metrics),
        "plot": list(bench.plot),
        "runs": runs,
        "summary": summarize(runs, configs, bench.baseline, bench.metrics),
    }


# --------------------------------------------------------------------------- reports


def _fmt(value: float) -> str:
    """About four significant digits, never scientific notation (RSS in MiB can be 5 digits)."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    decimals = max(0, 3 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def _fence(text: str) -> str:
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def failed_configs(results: Mapping) -> list[str]:
    return [c for c, s in results["summary"].items() if s["ok"] < s["runs"]]


def render_markdown(results: Mapping) -> str:
    base = results["baseline"]
    metrics = results["metrics"]
    machine = results["machine"]
    lines = [f"# {results['title']}", ""]
    if results.get("command"):
        lines += [f"Command: `{results['command']}`", ""]
    lines += [
        "## Machine",
        "",
        f"- CPU: {machine.get('cpu')} ({machine.get('available_cores')} of {machine.get('logical_cores')} logical cores available)",
        f"- RAM: {machine.get('ram_gib')} GiB",
        f"- GPU: {machine.get('gpu') or 'none'}" + (f" (CUDA {machine['cuda']})" if machine.get("cuda") else ""),
        f"- OS: {machine.get('os')}",
        f"- Python {machine.get('python')}, torch {machine.get('torch')}, triton {machine.get('triton') or '-'}, "
        f"transformers {machine.get('transformers') or '-'}",
        f"- Date: {machine.get('date')}",
    ]
    for merged in results.get("merged_runs", []):  # configs measured again later (--merge)
        other = merged["machine"]
        lines.append(f"- Merged later: {', '.join(merged['configs'])} on {other.get('cpu')}, {other.get('date')}")
    lines += [
        "",
        "## Parameters",
        "",
    ]
    lines += [f"- {key}: `{json.dumps(value)}`" for key, value in results["params"].items()] or ["- (none)"]
    lines += [
        "",
        "## Results",
        "",
        f"Each config ran {results['repeats']} time(s), each run in a fresh process, configs interleaved. "
        f"Cells: median (min–max) over the runs. Ratios: config median / `{base}` median of this same run.",
        "",
    ]
    baselines = {base}
    if results.get("parts"):
        parts = results["parts"]
        baselines = {p["baseline"] for p in parts.values()}
        lines[-2] = ("Parts, run one after another, configs interleaved within a part: "
                     + "; ".join(f"{name} ({len(p['configs'])} configs x {p['repeats']} run(s), baseline `{p['baseline']}`)"
                                 for name, p in parts.items())
                     + ". Each run in a fresh process. Cells: median (min–max) over the runs. "
                       "Ratios: config median / its part's baseline median of this same run.")
        base = "baseline"
    header = ["config", "runs"]
    for metric, direction in metrics.items():
        header += [f"{metric} ({direction} is better)", f"vs {base}"]
    lines += ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (2 * len(metrics))]
    for config in results["configs"]:
        s = results["summary"][config]
        runs = f"{s['ok']}/{s['runs']}" + (" FAILED" if s["ok"] < s["runs"] else "")
        row = [f"{config} (baseline)" if config in baselines else config, runs]
        for metric in metrics:
            stat = s["metrics"].get(metric)
            if stat is None:
                row += ["FAILED" if s["ok"] == 0 else "–", "–"]
                continue
            value = _fmt(stat["median"])
            if stat["n"] > 1:
                value += f" ({_fmt(stat['min'])}–{_fmt(stat['max'])})"
            row += [value, "–" if stat["ratio"] is None else f"{stat['ratio']:.2f}×"]
        lines.append("| " + " | ".join(row) + " |")

    # Identical errors of one config (the usual case: it fails every time) are shown once.
    failures: dict[tuple[str, str], list[int]] = {}
    for run in results["runs"]:
        if not run["ok"]:
            failures.setdefault((run["config"], run["error"]), []).append(run["repeat"] + 1)
    if failures:
        lines += ["", "## Failures", ""]
        for (config, error), repeats in failures.items():
            which = "repeat" + ("s " if len(repeats) > 1 else " ") + ", ".join(map(str, repeats))
            lines += [f"### {config}, {which}", "", _fence(error), ""]
    return "\n".join(lines).rstrip() + "\n"


def render_plot(results: Mapping, path: Path) -> None:
    """Bar chart per plotted metric: median per config, min–max error bars, ratio on top."""
    # Figure + Agg canvas directly: no pyplot, so no global backend state to fight with.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = results["plot"]
    configs = results["configs"]
    base = results["baseline"]
    width = max(3.5, 0.9 * len(configs) + 1.5)
    fig = Figure(figsize=(width * len(metrics), 4.2))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics):
        for x, config in enumerate(configs):
            stat = results["summary"][config]["metrics"].get(metric)
            if stat is None:
                ax.text(x, 0, "failed", ha="center", va="bottom", color="tab:red")
                continue
            median = stat["median"]
            if not math.isfinite(median):
                ax.text(x, 0, _fmt(median), ha="center", va="bottom")
                continue
            ax.bar(x, median, color="tab:gray" if config == base else "tab:blue",
                   yerr=[[median - stat["min"]], [stat["max"] - median]], capsize=4)
            if stat["ratio"] is not None:
                ax.annotate(f"{stat['ratio']:.2f}×", (x, stat["max"]), ha="center", va="bottom",
                            xytext=(0, 2), textcoords="offset points", fontsize=8)
        ax.set_xticks(range(len(configs)), configs, rotation=30 if len(configs) > 4 else 0)
        ax.set_xlim(-0.6, len(configs) - 0.4)  # keep room for configs that drew no bar
        ax.set_title(f"{metric} ({results['metrics'][metric]} is better)", fontsize=10)
        ax.margins(y=0.12)
    fig.suptitle(f"{results['title']}\nmedian of {results['repeats']} fresh-process run(s), "
                 f"min–max bars, ratio vs {base} (grey)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_report(
    results: Mapping,
    out_dir: Path | str,
    *,
    name: str | None = None,
    markdown: Callable[[Mapping], str] | None = None,
    plot: Callable[[Mapping, Path], None] | None = None,
) -> dict[str, Path]:
    """Write ``<name>.json`` (raw), ``<name>.md`` and ``<name>.png`` into ``out_dir``; a
    benchmark with a report of its own passes its `markdown` and `plot` renderers."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or results["name"]
    paths = {ext: out_dir / f"{name}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["md"].write_text((markdown or render_markdown)(results))
    (plot or render_plot)(results, paths["png"])
    return paths


# --------------------------------------------------------------------------- command line


def _parse_overrides(defaults: Mapping[str, Any], items: Sequence[str]) -> dict:
    """Apply ``key=value`` overrides; values are typed like the declared default."""
    params = dict(defaults)
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--param expects KEY=VALUE, got {item!r}")
        if key not in params and key not in HARNESS_PARAMS:
            raise ValueError(f"unknown param {key!r}; this benchmark has {sorted(params) + list(HARNESS_PARAMS)}")
        default = params.get(key)
        if isinstance(default, str):
            params[key] = raw  # strings stay strings: size=1 means "1", not 1
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            if default is not None:
                raise ValueError(f"param {key!r} expects {type(default).__name__}, got {raw!r}") from None
            value = raw
        if default is not None and not isinstance(value, type(default)) and not (
            isinstance(default, float) and isinstance(value, int)
        ):
            raise ValueError(f"param {key!r} expects {type(default).__name__}, got {raw!r}")
        params[key] = value
    threads = params.get("threads")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"param 'threads' must be a positive integer, got {threads!r}")
    return params


def _display_command(bench: Benchmark, argv: Sequence[str]) -> str:
    entry = _entry_point(bench)
    if entry[0] != "-m":
        try:
            entry = [os.path.relpath(entry[0])]
        except ValueError:
            pass
    return shlex.join(["python", *entry, *argv])


def add_run_arguments(parser: argparse.ArgumentParser, bench: Benchmark) -> None:
    """The options every benchmark command line has."""
    parser.add_argument("--repeats", type=int,
                        help=f"fresh-process runs per config (default {bench.repeats}, or each part's own)")
    parser.add_argument("--configs", help=f"comma-separated subset of {','.join(bench.configs)}; "
                                          "the baseline (each chosen part's) always runs")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a param (repeatable); defaults: {json.dumps(bench.params)}")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: docs/results)")
    parser.add_argument("--timeout", type=float, help=f"seconds per child run (default {bench.timeout_s:g})")
    quick = f"; params {json.dumps(dict(bench.quick))}" if bench.quick else ""
    parser.add_argument("--quick", action="store_true",
                        help=f"a smoke test: one repeat{quick}"
                             f"{'; configs ' + ','.join(bench.quick_configs) if bench.quick_configs else ''}; "
                             f"writes {bench.name}_quick.*")
    parser.add_argument("--redraw", type=Path, nargs="*", metavar="JSON",
                        help="measure nothing: rewrite the .md and .png of these results files "
                             "(default: <out>/<name>.json)")
    parser.add_argument("--merge", type=Path, metavar="JSON",
                        help="put this run's configs into an earlier results file in place of their runs "
                             "(its baselines' runs kept) and rewrite that file's report")


def parse_configs(parser: argparse.ArgumentParser, text: str, known: Sequence[str]) -> list[str]:
    """`--configs a,b`: the names, or a parser error naming the unknown ones and the choices."""
    wanted = [c.strip() for c in text.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in known]
    if unknown:
        parser.error(f"unknown config(s) {unknown}; choose from {list(known)}")
    return wanted


def failed_exit_code(results: Mapping) -> int:
    """1 (after naming them on stderr) if any config failed, else 0."""
    failed = failed_configs(results)
    if failed:
        print(f"FAILED configs: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def select_parts(bench: Benchmark, params: Mapping[str, Any], wanted: Sequence[str] | None) -> dict[str, Part]:
    """The parts to run, each cut to the wanted configs and its baseline (declared order); a part
    with none of the wanted configs is left out. One unnamed part when the benchmark has none."""
    parts = dict(bench.parts(params)) if bench.parts else {"": Part(bench.configs, bench.baseline)}
    chosen, directions = {}, dict(bench.metrics)
    for name, part in parts.items():
        clash = [m for m, d in (part.metrics or {}).items() if directions.setdefault(m, d) != d]
        if clash:  # one results file has one direction per metric
            raise ValueError(f"part {name!r}: metrics {clash} have another direction elsewhere in the benchmark")
        stray = [c for c in part.configs if c not in bench.configs]
        if stray or part.baseline not in part.configs:
            raise ValueError(f"part {name!r}: configs {stray} are not the benchmark's, or its baseline "
                             f"{part.baseline!r} is not among its configs")
        if wanted is not None and not any(c in wanted for c in part.configs):
            continue
        configs = [c for c in part.configs if wanted is None or c in wanted or c == part.baseline]
        chosen[name] = Part(configs, part.baseline, part.repeats, dict(part.params), part.metrics)
    return chosen


def run_parts(bench: Benchmark, parts: Mapping[str, Part], *, repeats: int | None = None,
              params: Mapping[str, Any] | None = None, timeout_s: float | None = None, command: str = "") -> dict:
    """run_benchmark over each part in turn (configs interleaved within a part); several parts
    give one results dict whose ``parts`` records each part's baseline, configs, repeats and
    params, and whose ratios are each against its own part's baseline."""
    params = dict(bench.params if params is None else params)
    if list(parts) == [""]:
        return run_benchmark(bench, configs=parts[""].configs, repeats=repeats, params=params,
                             timeout_s=timeout_s, command=command)
    merged: dict = {}
    machine = collect_machine_info(_child_env(params, bench.default_allocator))  # once for all parts
    for name, part in parts.items():
        metrics = dict(part.metrics or bench.metrics)
        sub = Benchmark(name=bench.name, title=bench.title, configs=part.configs, baseline=part.baseline,
                        measure=bench.measure, metrics=metrics, params=bench.params,
                        plot=[m for m in bench.plot if m in metrics] or None, timeout_s=bench.timeout_s,
                        default_allocator=bench.default_allocator)
        part_repeats = repeats if repeats is not None else (part.repeats or bench.repeats)
        print(f"== part {name}: {len(part.configs)} configs x {part_repeats} repeat(s)", flush=True)
        r = run_benchmark(sub, configs=part.configs, repeats=part_repeats, params={**params, **part.params},
                          timeout_s=timeout_s, command=command, machine=machine)
        if not merged:
            merged = {**r, "params": params, "runs": [], "configs": [], "metrics": {}, "summary": {},
                      "plot": list(bench.plot), "parts": {}}
        merged["runs"] += r["runs"]
        merged["configs"] += r["configs"]
        merged["metrics"].update(r["metrics"])
        merged["summary"].update(r["summary"])
        merged["repeats"] = max(merged["repeats"], r["repeats"])
        merged["parts"][name] = {"baseline": part.baseline, "configs": r["configs"], "repeats": r["repeats"],
                                 "params": dict(part.params), "metrics": list(r["metrics"])}
    merged["plot"] = [m for m in bench.plot if m in merged["metrics"]] or list(merged["metrics"])
    return merged


def resummarize(results: dict) -> dict:
    """``results["summary"]`` computed again from its runs, each part against its own baseline."""
    parts = results.get("parts") or {"": {"baseline": results["baseline"], "configs": results["configs"]}}
    results["summary"] = {}
    for part in parts.values():
        metrics = {m: results["metrics"][m] for m in part.get("metrics", results["metrics"])}
        results["summary"].update(summarize(results["runs"], part["configs"], part["baseline"], metrics))
    return results


def merge_into(earlier: dict, new: Mapping) -> dict:
    """`new`'s configs in `earlier` in place of their runs: a config re-run after a fix. A part re-run
    whole (every config of it, its baseline with them) replaces the part, baseline included, so its
    ratios are of one run. Otherwise a baseline's runs stay the earlier ones (the other configs of
    its part were measured against them) and the re-run configs' ratios mix two runs: the command
    says so."""
    parts = earlier.get("parts") or {"": {"baseline": earlier["baseline"], "configs": earlier["configs"]}}
    whole = {p["baseline"] for p in parts.values() if set(p["configs"]) <= set(new["configs"])}
    baselines = {p["baseline"] for p in parts.values()} - whole
    rerun = [c for c in new["configs"] if c not in baselines]
    unknown = [c for c in rerun if c not in earlier["configs"]]
    new_parts = new.get("parts") or {"": {"baseline": new["baseline"], "configs": new["configs"]}}
    for config in unknown:
        # A config added to the script since the earlier run joins its part there (same baseline);
        # a part added since, run whole (its baseline with it), joins as a part.
        name = next((n for n, p in new_parts.items() if config in p["configs"]), None)
        if name is not None and name not in parts and "parts" in earlier and \
                set(new_parts[name]["configs"]) <= set(new["configs"]):
            parts[name] = {**new_parts[name], "configs": []}
        if name is None or name not in parts or parts[name]["baseline"] != new_parts[name]["baseline"]:
            raise ValueError(f"--merge: configs {unknown} are not in the earlier results ({earlier['configs']})")
        for configs in (parts[name]["configs"], earlier["configs"]):
            if config not in configs:  # one list when the benchmark has no parts
                configs.append(config)
    for metric, better in new.get("metrics", {}).items():  # a metric the script gained since
        earlier.setdefault("metrics", {}).setdefault(metric, better)
    earlier["runs"] = [r for r in earlier["runs"] if r["config"] not in rerun]
    earlier["runs"] += [r for r in new["runs"] if r["config"] in rerun]
    replaced = "those configs' runs, baselines included" if whole else "those configs' runs; their baselines' runs are the earlier ones"
    earlier["command"] += f"; then {new['command']} (replacing {replaced})"
    # Where and when the merged configs ran (the Machine section is the first run's).
    earlier.setdefault("merged_runs", []).append({"configs": rerun, "machine": new.get("machine", {})})
    return resummarize(earlier)


def write_outputs(bench: Benchmark, results: Mapping, out_dir: Path, name: str | None = None) -> dict[str, Path]:
    """The benchmark's report of ``results``: <name>.json, .md (``bench.report``) and .png (``bench.draw``)."""
    return write_report(results, out_dir, name=name, markdown=bench.report, plot=bench.draw)


def main(bench: Benchmark, argv: Sequence[str] | None = None) -> None:
    """The command line of every benchmark script (run, --quick, --configs, --redraw, --merge, and
    the children's --worker); exits non-zero if any config failed."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=bench.title)
    add_run_arguments(parser, bench)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker is not None:
        _run_worker(bench, args.worker, json.loads(args.params or "{}"))
        return
    name = f"{bench.name}_quick" if args.quick else bench.name
    if args.redraw is not None:
        for path in args.redraw or [args.out / f"{name}.json"]:
            paths = write_outputs(bench, json.loads(path.read_text()), path.parent, path.stem)
            print("redrew " + ", ".join(str(p) for p in paths.values() if p.suffix != ".json"))
        return

    try:
        params = _parse_overrides({**bench.params, **bench.quick} if args.quick else bench.params, args.param)
    except ValueError as exc:
        parser.error(str(exc))
    repeats = args.repeats
    if args.quick:
        repeats = 1
        params["quick"] = True
    if repeats is not None and repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    if args.timeout is not None and args.timeout <= 0:
        parser.error(f"--timeout must be > 0 seconds, got {args.timeout:g}")
    wanted = parse_configs(parser, args.configs, bench.configs) if args.configs else None
    if wanted is None and args.quick:
        wanted = bench.quick_configs
    parts = select_parts(bench, params, wanted)

    results = run_parts(dataclasses.replace(bench, name=name), parts, repeats=repeats, params=params,
                        timeout_s=args.timeout, command=_display_command(bench, argv))
    out = args.out
    if args.merge is not None:
        try:
            results, out, name = merge_into(json.loads(args.merge.read_text()), results), args.merge.parent, args.merge.stem
        except Exception:
            # The measurements are not lost: this run's own report, then the reason.
            kept = write_outputs(bench, results, out, f"{name}_unmerged")
            print(f"kept this run as {kept['json']}", file=sys.stderr)
            raise
    paths = write_outputs(bench, results, out, name)
    print()
    table = render_markdown(results).split("## Results", 1)[1].split("## Failures", 1)[0]
    print(table.strip())
    print("\nwrote " + ", ".join(str(p) for p in paths.values()))
    if failed_exit_code(results):
        sys.exit(1)


def run_median(results: Mapping, config: str, metric: str) -> float | None:
    """Median of `metric` over the config's successful runs (reported metrics and the JSON-only
    ones a measure returns beside them alike); None when no run has it. For report sections."""
    values = [r["metrics"][metric] for r in results["runs"] if r["config"] == config and r["ok"] and metric in r["metrics"]]
    return statistics.median(values) if values else None


def with_sections(extra_sections: Callable[[Mapping], str]) -> Callable[[Mapping], str]:
    """A ``report`` for a Benchmark: the harness's markdown followed by ``extra_sections(results)``."""

    def report(results: Mapping) -> str:
        return render_markdown(results) + extra_sections(results)

    return report
