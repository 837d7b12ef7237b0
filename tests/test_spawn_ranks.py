"""The 2-process harness (spawn_ranks.run_ranks): a signal death gets one more try, with a warning;
a Python error or a second signal death fails the test with every rank's story."""

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from spawn_ranks import run_ranks

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def _abort_first_try(rank: int, world: int, out: str) -> None:
    if rank == 1 and Path(out).name == "attempt1":
        os.abort()
    total = torch.ones(1)
    dist.all_reduce(total)
    (Path(out) / f"sum{rank}").write_text(str(int(total.item())))


def _always_abort(rank: int, world: int, out: str) -> None:
    if rank == 1:
        os.abort()
    dist.all_reduce(torch.ones(1))


def _raise(rank: int, world: int, out: str) -> None:
    if rank == 0:
        raise ValueError("rank zero refuses")
    dist.all_reduce(torch.ones(1))


def test_a_signal_death_is_run_again_once(tmp_path):
    with pytest.warns(UserWarning, match="died by a signal and was run again"):
        out = run_ranks(_abort_first_try, lambda d: (str(d),), tmp_path, seconds=120)
    assert out.name == "attempt2"
    assert [(out / f"sum{r}").read_text() for r in range(2)] == ["2", "2"]


def test_a_second_signal_death_fails_with_the_ranks_story(tmp_path):
    with pytest.warns(UserWarning), pytest.raises(pytest.fail.Exception, match="SIGABRT"):
        run_ranks(_always_abort, lambda d: (str(d),), tmp_path, seconds=120)


def test_a_python_error_fails_at_once_with_its_traceback(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="rank zero refuses") as err:
        run_ranks(_raise, lambda d: (str(d),), tmp_path, seconds=120)
    assert "rank0.traceback" in str(err.value) and not (tmp_path / "attempt2").exists()
