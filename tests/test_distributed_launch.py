"""The launcher: results in rank order, one rank's error ends every rank quickly, a hung rank
ends at the deadline, and bad pipeline options fail before any rank starts."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

import memsave.distributed as md
from memsave.cli import main

sys.path.insert(0, str(Path(__file__).parent))
import distributed_workers as workers  # noqa: E402  (module-level spawn targets)

# Under `pytest -n 2` the multi-process tests run one after another on one worker: ranks of two
# of them at once would oversubscribe the cores past their deadlines.
pytestmark = pytest.mark.xdist_group("distributed")


@pytest.mark.timeout(120)
def test_launch_returns_each_ranks_value_in_rank_order():
    assert md.launch(workers.return_rank, 2, (10,), timeout_s=100) == [(10, 2), (11, 2)]


@pytest.mark.timeout(120)
def test_one_rank_raising_ends_every_rank_with_its_error():
    start = time.monotonic()
    with pytest.raises(md.RankFailed) as info:
        # Rank 0 waits in a barrier for rank 1, which raises: without fault handling, a hang.
        md.launch(workers.raise_on_rank, 2, (1,), timeout_s=100, grace_s=3)
    elapsed = time.monotonic() - start
    assert info.value.rank == 1
    assert "ValueError: boom from rank 1" in str(info.value)
    assert all(code not in (None, 0) for code in info.value.exitcodes.values()), info.value.exitcodes
    assert elapsed < 60, elapsed


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_hung_rank_ends_at_the_deadline():
    start = time.monotonic()
    with pytest.raises(md.RankFailed, match="timed out after 8 s; ranks without a result: \\[(0, )?1\\]") as info:
        md.launch(workers.hang_on_rank, 2, (1,), timeout_s=8, grace_s=1)
    assert time.monotonic() - start < 60
    assert info.value.exitcodes[1] not in (None, 0)


def test_launch_rejects_a_bad_process_count():
    with pytest.raises(ValueError, match="nprocs must be a positive integer"):
        md.launch(workers.return_rank, 0, (0,))


def test_demo_with_more_stages_than_layers_fails_before_spawning(capsys, monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("launched ranks despite a bad plan")

    monkeypatch.setattr(md, "launch", no_launch)
    with pytest.raises(SystemExit) as info:
        main(["demo", "--model", "decoder-tiny", "--nproc", "3"])  # 2 layers: at most 2 stages
    assert info.value.code == 2
    assert "3 stages need 2 cuts, but the graph has only 1 block boundaries to cut at (layers.1)" in capsys.readouterr().err


def test_demo_with_too_few_microbatches_for_1f1b_fails_before_spawning(capsys, monkeypatch):
    monkeypatch.setattr(md, "launch", lambda *a, **k: pytest.fail("launched ranks despite bad options"))
    with pytest.raises(SystemExit):
        main(["demo", "--model", "decoder-tiny", "--nproc", "2", "-o", 'pipeline={"microbatches": 1}'])
    assert "schedule '1f1b' needs microbatches >= stages, got 1 < 2" in capsys.readouterr().err


@pytest.mark.timeout(300)
def test_demo_runs_two_ranks_that_read_only_their_stage(capsys):
    assert main(["demo", "--model", "decoder-tiny", "--nproc", "2"]) == 0
    out = capsys.readouterr().out
    assert "reads only its stage from" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit() and "%" in line]
    assert [row[:2] for row in rows] == [["0", "0"], ["1", "1"]], out
    for row in rows:
        share = float(next(c for c in row if c.endswith("%")).rstrip("%"))
        assert 30 < share < 70, out  # about half of the weights each
        diff = float(row[-3])
        assert diff <= 1e-5, out
