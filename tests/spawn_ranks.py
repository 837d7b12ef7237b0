"""Run a function on N gloo processes (spawned), and fail a test with every rank's own story.

Why not a bare ``mp.start_processes``: a rank that dies first (an assertion, a config error)
closes its gloo connections, and the rank still in a collective then aborts in C++ (SIGABRT,
no Python traceback). The parent reports whichever exit it sees first, often the abort, and the
cause is lost. Here each rank's stderr goes to a file and its traceback to another, both quoted
in the failure. The ranks meet through a file store in the test's directory (no port to race
for), and pass a barrier before tearing down, so no rank leaves while another still needs it.
"""

from __future__ import annotations

import datetime
import os
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)   # a rank left waiting fails instead of hanging


def run_ranks(fn: Callable[..., None], args: tuple[Any, ...], root: Path, world: int = 2,
              seconds: float = 300) -> None:
    """Run ``fn(rank, world, *args)`` on ``world`` processes joined in one gloo group; fails the
    test, quoting each rank's traceback and stderr, if any process fails or all do not finish."""
    root.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_rank_main, args=(fn, world, str(root), args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + seconds
    failure = None
    try:
        while not ctx.join(timeout=5):
            if time.monotonic() > deadline:
                failure = f"the {world}-process run did not finish in {seconds:.0f} s (a collective hangs?)"
                break
    except ProcessException as exc:
        failure = str(exc)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
    if failure is not None:
        pytest.fail(failure + "".join(_story(root, rank) for rank in range(world)), pytrace=False)


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
