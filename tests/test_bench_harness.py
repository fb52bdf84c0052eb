"""The benchmark harness, run through its real parent/child machinery on a tiny benchmark."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))  # benchmarks/ is not an installed package

from benchmarks import harness  # noqa: E402

TINY_BENCH = textwrap.dedent(
    '''
    import os
    import statistics
    import subprocess
    import sys
    import time
    from pathlib import Path

    from benchmarks.harness import (Benchmark, MiB, current_rss_bytes, main, peak_rss_bytes,
                                    reset_peak_rss, time_call)

    SIZES_MIB = {"small": 8, "big": 64}

    def measure(config, params):
        if config == "broken":
            raise RuntimeError("broken config on purpose")
        if config == "hang":
            # A grandchild too: the harness must kill the whole process group on timeout.
            sleeper = subprocess.Popen(["sleep", "120"])
            Path(os.environ["TINY_PIDFILE"]).write_text(f"{os.getpid()} {sleeper.pid}")
            time.sleep(120)
        import numpy  # not torch: its import would cost ~1.5 s per child

        numel = SIZES_MIB[config] * MiB // 8  # float64, every page written
        reset_peak_rss()
        before = current_rss_bytes()
        times = time_call(lambda: numpy.ones(numel), warmup=1, iters=3)
        torch = sys.modules.get("torch")  # imported by the harness only for a threads param
        return {
            "rss_growth_mib": (peak_rss_bytes() - before) / MiB,
            "time_ms": statistics.median(times),
            "pid": os.getpid(),
            "mmap_threshold_set": float(os.environ.get("MALLOC_MMAP_THRESHOLD_") == "131072"),
            "quick": float(bool(params.get("quick"))),
            "scale": params["scale"],
            "torch_threads": torch.get_num_threads() if torch else 0,
            "omp_threads": float(os.environ.get("OMP_NUM_THREADS", 0)),
        }

    BENCH = Benchmark(
        name="tiny",
        title="Tiny harness self-test",
        configs=["small", "big", "broken", "hang"],
        baseline="small",
        measure=measure,
        metrics={"rss_growth_mib": "lower", "time_ms": "lower"},
        params={"scale": 1},
        quick={"scale": 2},
        quick_configs=["small", "big"],
        repeats=3,
    )

    if __name__ == "__main__":
        main(BENCH)
    '''
)


def _run(tmp_path, *args, timeout=120):
    (tmp_path / "bench_tiny.py").write_text(TINY_BENCH)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TINY_PIDFILE=str(tmp_path / "pids"))
    return subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout
    )


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a killed child that nobody reaped yet is not running


def test_fresh_processes_interleaved_rss_ratios_and_failure(tmp_path):
    out = tmp_path / "out"
    proc = _run(tmp_path, "bench_tiny.py", "--repeats", "2", "--configs", "small,big,broken", "--out", str(out))
    # A failed config makes the whole benchmark fail, but the report is still written.
    assert proc.returncode == 1 and (out / "tiny.json").exists(), proc.stdout + proc.stderr
    assert "FAILED configs: broken" in proc.stderr

    for ext in ("md", "png", "json"):
        assert (out / f"tiny.{ext}").stat().st_size > 0
    results = json.loads((out / "tiny.json").read_text())
    runs = results["runs"]
    # Interleaved across repeats, not all repeats of one config back to back.
    assert [r["config"] for r in runs] == ["small", "big", "broken"] * 2
    ok = {c: [r["metrics"] for r in runs if r["config"] == c and r["ok"]] for c in ("small", "big", "broken")}
    assert len(ok["small"]) == 2 and len(ok["big"]) == 2 and ok["broken"] == []

    broken = [r for r in runs if r["config"] == "broken"]
    assert all("broken config on purpose" in r["error"] for r in broken), broken[0]["error"]

    # Every run was its own process, none of them this one.
    pids = [m["pid"] for c in ("small", "big") for m in ok[c]]
    assert len(set(pids)) == 4 and os.getpid() not in pids
    assert all(m["mmap_threshold_set"] == 1.0 for c in ("small", "big") for m in ok[c])

    # RSS measurement is real: 64 MiB vs 8 MiB allocations must show up as ~56 MiB more peak RSS.
    summary = results["summary"]
    small = summary["small"]["metrics"]["rss_growth_mib"]
    big = summary["big"]["metrics"]["rss_growth_mib"]
    assert big["median"] - small["median"] > 40, (small, big)
    assert min(m["rss_growth_mib"] for m in ok["big"]) > 55

    # Ratios are config median / baseline median.
    for metric in ("rss_growth_mib", "time_ms"):
        assert summary["small"]["metrics"][metric]["ratio"] == pytest.approx(1.0)
        expected = summary["big"]["metrics"][metric]["median"] / summary["small"]["metrics"][metric]["median"]
        assert summary["big"]["metrics"][metric]["ratio"] == pytest.approx(expected)
    assert summary["broken"] == {"runs": 2, "ok": 0, "metrics": {}}
    assert results["machine"]["logical_cores"] == os.cpu_count() and results["machine"]["torch"]

    md = (out / "tiny.md").read_text()
    assert "| broken | 0/2 FAILED | FAILED |" in md
    assert f"{summary['big']['metrics']['rss_growth_mib']['ratio']:.2f}×" in md
    assert "bench_tiny.py --repeats 2" in md and "## Machine" in md and "broken config on purpose" in md

    # The report can be redrawn from the JSON alone, through the benchmark's own command line.
    (out / "tiny.md").unlink()
    (out / "tiny.png").unlink()
    proc = _run(tmp_path, "bench_tiny.py", "--redraw", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (out / "tiny.md").read_text() == md and (out / "tiny.png").stat().st_size > 0


@pytest.mark.slow
def test_module_mode_quick_params_and_timeout_kills_process_group(tmp_path):
    out = tmp_path / "out"
    proc = _run(tmp_path, "-m", "bench_tiny", "--quick", "--configs", "hang", "--timeout", "10",
                "--param", "scale=3", "--param", "threads=1", "--out", str(out))
    # --quick writes <name>_quick.*, never over a full run's results.
    assert proc.returncode == 1 and (out / "tiny_quick.json").exists(), proc.stdout + proc.stderr
    assert not (out / "tiny.json").exists()
    results = json.loads((out / "tiny_quick.json").read_text())
    runs = {r["config"]: r for r in results["runs"]}
    assert list(runs) == ["small", "hang"], "the baseline always runs, --configs beats quick_configs, one repeat"
    assert runs["small"]["ok"], runs["small"]["error"]
    # The quick params (scale 2) are merged first, so --param still overrides them.
    assert runs["small"]["metrics"]["quick"] == 1.0 and runs["small"]["metrics"]["scale"] == 3
    assert results["params"] == {"scale": 3, "threads": 1, "quick": True}
    assert runs["small"]["metrics"]["torch_threads"] == 1.0 and runs["small"]["metrics"]["omp_threads"] == 1.0
    assert results["command"].startswith("python -m bench_tiny --quick")

    assert not runs["hang"]["ok"] and runs["hang"]["error"].startswith("timed out after 10 s")
    child, grandchild = map(int, (tmp_path / "pids").read_text().split())
    assert not _alive(child) and not _alive(grandchild)


PARTS_BENCH = textwrap.dedent(
    '''
    import os

    from benchmarks.harness import Benchmark, Part, main

    VALUES = {"a1": 1.0, "a2": 3.0, "b1": 2.0, "b2": 8.0}

    def measure(config, params):
        return {"value": VALUES[config] * params["scale"], "pid": os.getpid(), "tag": params.get("tag", 0)}

    def parts(params):
        return {"a": Part(["a1", "a2"], "a1"),
                "b": Part(["b1", "b2"], "b1", repeats=2, params={"tag": 7},
                          metrics={"value": "lower", "tag": "lower"})}

    BENCH = Benchmark(name="parts", title="Parts self-test", configs=["a1", "a2", "b1", "b2"], baseline="a1",
                      measure=measure, metrics={"value": "lower"}, params={"scale": 1}, repeats=1, parts=parts)

    if __name__ == "__main__":
        main(BENCH)
    '''
)


def test_parts_have_their_own_baselines_repeats_params_and_merge(tmp_path):
    (tmp_path / "bench_parts.py").write_text(PARTS_BENCH)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = tmp_path / "out"

    def run(*args):
        proc = subprocess.run([sys.executable, "bench_parts.py", "--out", str(out), *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads((out / "parts.json").read_text())

    results = run()
    # Part a (one repeat) then part b (its own two, interleaved), each child with its part's params.
    assert [r["config"] for r in results["runs"]] == ["a1", "a2", "b1", "b2", "b1", "b2"]
    assert [r["metrics"]["tag"] for r in results["runs"]] == [0, 0, 7, 7, 7, 7]
    assert results["parts"]["b"] == {"baseline": "b1", "configs": ["b1", "b2"], "repeats": 2,
                                     "params": {"tag": 7}, "metrics": ["value", "tag"]}
    summary = results["summary"]
    assert summary["a2"]["metrics"]["value"]["ratio"] == pytest.approx(3.0)  # vs a1, not vs b1
    assert summary["b2"]["metrics"]["value"]["ratio"] == pytest.approx(4.0)  # vs b1
    # Part b reports a metric of its own; part a's table cells for it stay empty.
    assert results["metrics"] == {"value": "lower", "tag": "lower"}
    assert "tag" in summary["b2"]["metrics"] and "tag" not in summary["a2"]["metrics"]
    md = (out / "parts.md").read_text()
    assert "| a1 (baseline) |" in md and "| b1 (baseline) |" in md and "| a2 | 1/1 |" in md
    assert "its part's baseline" in md

    # --configs b2: only part b runs, with its baseline; part a is left out.
    only_b = run("--configs", "b2")
    assert [r["config"] for r in only_b["runs"]] == ["b1", "b2", "b1", "b2"] and list(only_b["parts"]) == ["b"]

    # --merge: a2 measured again (scale 2) into the full run. Its part's baseline runs with it, so
    # part a is re-run whole and replaced, a1 included: its ratios are of one run; part b stays.
    full = out / "full.json"
    full.write_text(json.dumps(results))
    run("--configs", "a2", "--param", "scale=2", "--merge", str(full))
    merged = json.loads(full.read_text())
    assert [r["metrics"]["value"] for r in merged["runs"] if r["config"] == "a1"] == [2.0]
    assert [r["metrics"]["value"] for r in merged["runs"] if r["config"] == "a2"] == [6.0]
    assert merged["summary"]["a2"]["metrics"]["value"]["ratio"] == pytest.approx(3.0)
    b1 = [r["metrics"]["pid"] for r in merged["runs"] if r["config"] == "b1"]
    assert b1 == [r["metrics"]["pid"] for r in results["runs"] if r["config"] == "b1"]
    assert merged["summary"]["b2"]["metrics"]["value"]["ratio"] == pytest.approx(4.0)
    assert "then " in merged["command"] and "--merge" in merged["command"] and "baselines included" in merged["command"]
    assert "- Merged later: a1, a2 on " in (out / "full.md").read_text()  # where and when they ran
    assert (out / "full.md").read_text().count("(baseline)") == 2
    # Runs of a config without its part's baseline (a part not re-run whole): the baseline's
    # earlier runs stay, and the command says the ratios mix two runs.
    only_a2 = {**results, "configs": ["a2"], "runs": [dict(r, metrics=dict(r["metrics"], value=9.0))
                                                       for r in results["runs"] if r["config"] == "a2"],
               "command": "again"}
    mixed = harness.merge_into(json.loads(json.dumps(results)), only_a2)
    assert [r["metrics"]["value"] for r in mixed["runs"] if r["config"] == "a1"] == [1.0]
    assert mixed["summary"]["a2"]["metrics"]["value"]["ratio"] == pytest.approx(9.0)
    assert "their baselines' runs are the earlier ones" in mixed["command"]

    # --merge of a config the script gained after the earlier run: it joins its part there.
    older = json.loads(json.dumps(results))
    older["configs"].remove("a2")
    older["parts"]["a"]["configs"].remove("a2")
    older["runs"] = [r for r in older["runs"] if r["config"] != "a2"]
    del older["summary"]["a2"]
    path = out / "older.json"
    path.write_text(json.dumps(older))
    run("--configs", "a2", "--merge", str(path))
    grown = json.loads(path.read_text())
    assert grown["parts"]["a"]["configs"] == ["a1", "a2"] and "a2" in grown["configs"]
    assert grown["summary"]["a2"]["metrics"]["value"]["ratio"] == pytest.approx(3.0)

    # --merge of a part the script gained after the earlier run, run whole: it joins as a part.
    no_b = json.loads(json.dumps(results))
    del no_b["parts"]["b"]
    no_b["configs"] = [c for c in no_b["configs"] if not c.startswith("b")]
    no_b["runs"] = [r for r in no_b["runs"] if not r["config"].startswith("b")]
    metric = next(iter(no_b["metrics"]))
    del no_b["metrics"][metric]  # as if the script had gained its metric since
    path = out / "no_b.json"
    path.write_text(json.dumps(no_b))
    run("--configs", "b2", "--merge", str(path))
    joined = json.loads(path.read_text())
    assert joined["parts"]["b"]["baseline"] == "b1" and {"b1", "b2"} <= set(joined["configs"])
    assert metric in joined["metrics"]
    assert joined["summary"]["b2"]["metrics"]["value"]["ratio"] == pytest.approx(4.0)


def test_param_overrides_are_typed_and_checked():
    defaults = {"size": "small", "batch": 1, "lr": 0.5, "flag": False}
    parsed = harness._parse_overrides(defaults, ["size=1", "batch=4", "lr=2", "flag=true", "threads=2"])
    assert parsed == {"size": "1", "batch": 4, "lr": 2, "flag": True, "threads": 2}
    for bad in (["sise=big"], ["batch=two"], ["batch=2.5"], ["threads=0"], ["novalue"]):
        with pytest.raises(ValueError):
            harness._parse_overrides(defaults, bad)


def test_benchmark_declaration_is_validated():
    ok = dict(name="x", title="t", configs=["a", "b"], baseline="a", measure=lambda c, p: {}, metrics={"m": "lower"})
    assert harness.Benchmark(**ok).plot == ["m"]
    for bad in ({"baseline": "c"}, {"metrics": {"m": "smaller"}}, {"configs": ["a", "a"]}, {"plot": "n"},
                {"repeats": 0}, {"name": "a/b"}, {"params": {"f": object()}}, {"quick_configs": ["c"]}):
        with pytest.raises((ValueError, TypeError)):
            harness.Benchmark(**{**ok, **bad})


def test_number_formatting():
    assert harness._fmt(12345.67) == "12346"
    assert harness._fmt(12.3456) == "12.35"
    assert harness._fmt(0.0012) == "0.001200"
    assert harness._fmt(0) == "0"


def test_reset_peak_rss_sees_reused_heap_memory():
    # 32 KiB blocks live in glibc's heap; once freed they stay resident. Without the trim in
    # reset_peak_rss(), allocating them again would show no RSS growth at all.
    np = pytest.importorskip("numpy")
    blocks = [np.ones(4096) for _ in range(4000)]
    del blocks
    harness.reset_peak_rss()
    before = harness.current_rss_bytes()
    blocks = [np.ones(4096) for _ in range(2000)]  # 62.5 MiB
    growth = (harness.peak_rss_bytes() - before) / harness.MiB
    del blocks
    assert 50 < growth < 80, growth
