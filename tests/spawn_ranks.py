"""Run a function on N gloo processes (spawned), and fail a test with every rank's own story.

Why not a bare ``mp.start_processes``: a rank that dies first (an assertion, a config error)
closes its gloo connections, and the rank still in a collective then aborts in C++ (SIGABRT,
no Python traceback). The parent reports whichever exit it sees first, often the abort, and the
cause is lost. Here each rank's stderr goes to a file and its traceback to another, both quoted
in the failure. The ranks meet through a file store in the test's directory (no port to race
for), and pass a barrier before tearing down, so no rank leaves while another still needs it.
A run killed by a signal gets one more try (:func:`run_ranks`).
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)   # a rank left waiting fails instead of hanging


def run_ranks(fn: Callable[..., None], make_args: Callable[[Path], tuple[Any, ...]], root: Path, world: int = 2,
              seconds: float = 300) -> Path:
    """Run ``fn(rank, world, *make_args(out))`` on ``world`` processes joined in one gloo group and
    return ``out``, the directory the run wrote to. Fails the test, quoting each rank's traceback
    and stderr, if a process raises or all do not finish in time.

    A process killed by a signal with no Python error (a C++ abort in gloo's transport, which is
    what a host under memory or scheduling pressure produces) gets one more try in a fresh
    directory, with a warning that quotes the first try: a fault in the code fails both."""
    for attempt in (1, 2):
        out = root / f"attempt{attempt}"
        out.mkdir(parents=True, exist_ok=True)
        failure, signalled = _attempt(fn, make_args(out), out, world, seconds)
        if failure is None:
            return out
        story = failure + "".join(_story(out, rank) for rank in range(world))
        if not signalled or attempt == 2:
            pytest.fail(story, pytrace=False)
        warnings.warn(f"a {world}-process run died by a signal and was run again: {story}", stacklevel=2)
    raise AssertionError("unreachable")


def _attempt(fn: Callable[..., None], args: tuple[Any, ...], out: Path, world: int, seconds: float
             ) -> tuple[str | None, bool]:
    """(None, False) when every process finished; else (what failed, whether to try again: a
    signal killed a process and no rank raised an error of its own)."""
    ctx = mp.start_processes(_rank_main, args=(fn, world, str(out), args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + seconds
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                return f"the {world}-process run did not finish in {seconds:.0f} s (a collective hangs?)", False
    except ProcessException as exc:
        # the others fail soon after (their peer is gone); whichever exit torch saw first, a rank
        # that raised a Python error means a fault in the code, not the host
        for p in ctx.processes:
            p.join(timeout=30)
        raised = [r for r in range(world) if (out / f"rank{r}.traceback").exists()
                  and "by peer" not in (out / f"rank{r}.traceback").read_text()]   # closed, or reset
        killed = any(p.exitcode is not None and p.exitcode < 0 for p in ctx.processes)
        return str(exc), killed and not raised
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    return None, False


def _story(root: Path, rank: int) -> str:
    parts = []
    for name in (f"rank{rank}.traceback", f"rank{rank}.stderr"):
        path = root / name
        if path.exists() and path.stat().st_size:
            parts.append(f"\n--- {name} (last 3000 characters) ---\n{path.read_text(errors='replace')[-3000:]}")
    return "".join(parts)


def _rank_main(rank: int, fn: Callable[..., None], world: int, root: str, args: tuple[Any, ...]) -> None:
    out = Path(root)
    err = os.open(out / f"rank{rank}.stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(err, 2)   # C++ messages (gloo, an abort) land here too
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{out / 'store'}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    try:
        fn(rank, world, *args)
        dist.barrier()
    except BaseException:
        (out / f"rank{rank}.traceback").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()
