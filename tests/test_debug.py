"""Pass-by-pass debugging: the debug directory, TORCH_TRACE artifacts, explain and the CLI."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import memsave
from memsave.cli import main as cli_main
from memsave.explain import explain
from memsave.models import build_decoder, build_mlp, decoder_inputs


def test_debug_dir_has_code_after_every_pass_and_the_table(tmp_path):
    model = build_mlp()
    x = torch.randn(4, 64, requires_grad=True)
    compiled = torch.compile(model, backend="memsave", options={"debug_dir": str(tmp_path), "codegen": "fx"})
    compiled(x).sum().backward()
    folders = sorted(os.listdir(tmp_path))
    assert [f.split("_", 2)[2] for f in folders] == ["backward", "forward", "joint"]
    joint = tmp_path / next(f for f in folders if f.endswith("joint"))
    assert sorted(os.listdir(joint)) == ["00_input.py", "01_cleanup.py", "02_select_kernels.py", "report.md"]
    code = (joint / "01_cleanup.py").read_text()
    assert "after: cleanup" in code and "torch.ops.aten.addmm" in code
    table = (joint / "report.md").read_text()
    assert "| pass | changed | nodes ± | weight bytes | est. peak activation bytes | error vs. original |" in table
    assert "| recompute |" in table and "saves" in table
    forward = (tmp_path / next(f for f in folders if f.endswith("forward")) / "report.md").read_text()
    assert "| cleanup | no | +0/−0 |" in forward and "exact" in forward


def test_debug_dir_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEMSAVE_DEBUG_DIR", str(tmp_path))
    with torch.no_grad():
        torch.compile(build_mlp(), backend="memsave", options={"codegen": "fx"})(torch.randn(2, 64))
    (folder,) = os.listdir(tmp_path)
    assert folder.endswith("_inference")
    assert (tmp_path / folder / "report.md").exists()


def test_torch_trace_has_one_artifact_per_pass(tmp_path):
    code = textwrap.dedent(
        """
        import torch
        model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        with torch.no_grad():
            torch.compile(model, backend="memsave", options={"codegen": "fx"})(torch.randn(2, 8))
        """
    )
    env = {**os.environ, "TORCH_TRACE": str(tmp_path / "trace")}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
    (log,) = os.listdir(tmp_path / "trace")
    text = (tmp_path / "trace" / log).read_text()
    for name in ("_inference_00_input", "_inference_01_cleanup", "_inference_report"):
        assert f'"name": "memsave_graph' in text and name in text
    tlparse = os.path.join(os.path.dirname(sys.executable), "tlparse")
    if os.path.exists(tlparse):  # tlparse ships in the dev extra; read it as a user would
        subprocess.run([tlparse, str(tmp_path / "trace" / log), "-o", str(tmp_path / "out"), "--no-browser"],
                       check=True, capture_output=True, timeout=120)
        files = [f for _, _, fs in os.walk(tmp_path / "out") for f in fs if f.startswith("memsave_graph")]
        assert any("01_cleanup" in f for f in files) and any("report" in f for f in files)


def test_explain_reports_passes_memory_and_error():
    model = build_decoder("tiny")
    report = explain(model, *decoder_inputs(model, batch=2, seq=16), codegen="fx")
    (graph,) = report.graphs
    assert graph.stage == "inference" and [r.name for r in graph.records] == ["cleanup", "select_kernels"]
    assert graph.records[0].error.short() == "exact"  # cleanup changed nothing numerically
    # Nothing lossy ran: only fp32 rounding differs (decompositions reorder some arithmetic).
    assert report.output_error.sqnr_db > 100 and report.output_error.max_abs < 1e-5
    assert report.eager.peak_bytes > 0 and report.compiled.peak_bytes > 0
    assert report.weight_bytes == sum(p.numel() * 4 for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    text = str(report)
    assert "graph" in text and "peak live tensor bytes" in text and "output error vs eager:" in text


def test_explain_training_compares_gradients():
    model = build_mlp()
    report = explain(model, torch.randn(8, 64), train=True, codegen="fx")
    assert [g.stage for g in report.graphs] == ["joint", "forward", "backward"]
    assert report.grad_error is not None and report.grad_error.max_abs < 1e-5
    assert report.eager.saved_bytes > 0 and report.compiled.saved_bytes > 0


def test_cli_explain_builtin_model(capsys):
    assert cli_main(["explain", "mlp", "-o", "codegen=fx", "-o", "recompute=none"]) == 0
    out = capsys.readouterr().out
    assert "**graph" in out and "| cleanup |" in out and "output error vs eager" in out


def test_cli_explain_model_from_a_file(tmp_path, capsys):
    (tmp_path / "mymodel.py").write_text(
        textwrap.dedent(
            """
            import torch

            def make():
                model = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3))
                return model, (torch.randn(5, 6),)
            """
        )
    )
    assert cli_main(["explain", f"{tmp_path / 'mymodel.py'}:make", "-o", "codegen=fx", "--train"]) == 0
    out = capsys.readouterr().out
    assert "(joint)" in out and "(backward)" in out and "gradient error vs eager" in out


def test_cli_rejects_bad_options_and_models(capsys):
    with pytest.raises(SystemExit) as info:
        cli_main(["explain", "mlp", "-o", "recompute=checkpoint"])
    assert info.value.code == 2
    assert "valid choices: 'none', 'min-cut', 'sqrt', 'selective'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="unknown model 'nope'; valid names: decoder-tiny"):
        cli_main(["explain", "nope"])


def test_cli_lists_models(capsys):
    assert cli_main(["models"]) == 0
    assert "decoder-small" in capsys.readouterr().out


def test_recent_reports_are_kept():
    with torch.no_grad():
        torch.compile(build_mlp(), backend="memsave", options={"codegen": "fx"})(torch.randn(2, 64))
    assert memsave.recent_reports()[-1].stage == "inference"
