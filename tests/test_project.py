"""The project as a new user meets it: the README's claims and the main job."""

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from memsave.config import DEFAULT_RECIPE, options_table_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_readme_options_table_is_the_real_one():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- options-table -->\n(.*?)\n<!-- /options-table -->", readme, re.S).group(1)
    assert block == options_table_markdown()


def test_readme_states_the_default_recipe():
    readme = (ROOT / "README.md").read_text()
    assert str(DEFAULT_RECIPE).replace("'", '"') in readme


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    command = re.search(r"\*\*Set up and run the tests\*\*.*?```sh\n(.*?)\n```", readme, re.S).group(1)
    assert command in ci.splitlines()


@pytest.mark.slow
def test_memsave_demo_runs_in_under_a_minute():
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "memsave.cli", "demo"], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    seconds = time.perf_counter() - start
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "memsave demo: decoder-small" in out
    assert "| pass | changed |" in out and "| cleanup |" in out
    assert "peak live tensor bytes during the call" in out and "output error vs eager" in out
    assert seconds < 60, f"memsave demo took {seconds:.0f} s"
