"""Training survives being stopped: SIGKILL at any moment (inside a checkpoint write too), SIGTERM
and Ctrl-C; each time `neat train --resume` continues, and the run ends with the weights and
losses of an uninterrupted run, bit for bit, with precision "auto".

Every run here is a real `neat train` in a child process. The child wraps two functions to say
where it is (after each step; inside a checkpoint write, which it can slow down) so that the test
can strike at a known moment.
"""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_corpus
from neatlm.config import load_config
from neatlm.train import checkpoint as ckpt
from neatlm.train.metrics import read_metrics
from neatlm.train.trainer import Trainer

CHILD = r"""
import os, sys, time
from neatlm.cli import main
from neatlm.train import checkpoint as ckpt
from neatlm.train.trainer import Trainer

def say(text):
    print(text, flush=True)

real_step = Trainer.train_step
def train_step(self, log=None):
    out = real_step(self, log)
    say(f"step {self.step}")
    time.sleep(float(os.environ.get("CHILD_STEP_DELAY", "0")))
    return out
Trainer.train_step = train_step

real_fsync = ckpt._fsync
def fsync(path):
    if path.name == "optimizer.pt":  # inside a checkpoint write: files written, nothing renamed yet
        name = path.parent.name[len(".tmp-"):]
        say(f"writing {name}")
        if int(name[len("step_"):]) > int(os.environ.get("CHILD_SLOW_AFTER", "0")):
            time.sleep(float(os.environ.get("CHILD_SLOW_SAVE", "0")))
    real_fsync(path)
ckpt._fsync = fsync

sys.exit(main(sys.argv[1:]))
"""

STEPS = 8


def settings(corpus: Path) -> list[str]:
    return [f"data.path={corpus}", "data.val_fraction=0.2", "model.dim=32", "model.n_layers=2", "model.n_heads=2",
            "model.context=64", f"train.steps={STEPS}", "train.batch_size=4", "train.seq_len=32",
            "train.warmup_steps=2", "train.log_every=1", "train.save_every=2", "train.keep_last=2",
            "train.progress=false", "train.device=cpu", "train.precision=auto", "train.threads=1",
            "eval.every=4", "eval.batches=2"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A corpus and the child script."""
    root = tmp_path_factory.mktemp("interrupt")
    write_corpus(root / "corpus")
    (root / "child.py").write_text(CHILD)
    return root


def reference(root: Path, run: Path) -> Path:
    """An uninterrupted in-process run at the precision ``run`` measured and recorded.

    "auto" may measure differently in two processes (bf16 does win on some CPUs at this width),
    which is what the record is for: the interrupted run keeps its first choice throughout.
    """
    precision = ckpt.read_checkpoint(ckpt.list_checkpoints(run)[0]).hardware["precision"]
    out = root / f"reference-{precision}"
    if not out.exists():
        cfg = load_config("tiny", None, settings(root / "corpus") + [f"train.run_dir={out}",
                                                                     f"train.precision={precision}"])
        Trainer(cfg).train()
        torch.set_num_threads(2)
    return out


class Child:
    def __init__(self, root: Path, run: Path, *args: str, **env: float):
        cmd = [sys.executable, str(root / "child.py"), "train"]
        cmd += ["--resume", str(run)] if "--resume" in args else \
            [a for s in settings(root / "corpus") for a in ("--set", s)] + ["--run-dir", str(run)]
        self.stderr_path = run.parent / f"stderr-{time.monotonic_ns()}"
        environment = {**os.environ, "OMP_NUM_THREADS": "1", **{f"CHILD_{k.upper()}": str(v) for k, v in env.items()}}
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(self.stderr_path, "w"), env=environment)
        self._buffer = b""

    def wait_for(self, line: str, timeout: float = 60.0) -> str:
        """Read the child's output up to a line equal to ``line`` (or starting with it, if it ends
        in ``*``); returns that line."""
        deadline = time.monotonic() + timeout
        while True:
            while b"\n" in self._buffer:
                got, self._buffer = self._buffer.split(b"\n", 1)
                got = got.decode()
                if got == line or (line.endswith("*") and got.startswith(line[:-1])):
                    return got
            ready, _, _ = select.select([self.proc.stdout], [], [], max(deadline - time.monotonic(), 0))
            chunk = os.read(self.proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                self.proc.kill()
                raise AssertionError(f"the child never said {line!r}; stderr: {self.stderr()[-2000:]}")
            self._buffer += chunk

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self, timeout: float = 120.0) -> int:
        self.proc.stdout.read()
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        return self.stderr_path.read_text()


def assert_same_run(run: Path, reference: Path) -> None:
    final = ckpt.list_checkpoints(run)[-1]
    assert final.name == f"step_{STEPS:07d}"
    want = load_file(str(ckpt.list_checkpoints(reference)[-1] / "model.safetensors"))
    got = load_file(str(final / "model.safetensors"))
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    strip = lambda r: {k: v for k, v in r.items() if k not in ("elapsed_s", "tokens_per_s")}  # noqa: E731
    assert [strip(r) for r in read_metrics(run)] == [strip(r) for r in read_metrics(reference)]


def test_sigkill_at_any_moment_then_resume_gives_the_uninterrupted_run(setup):
    root, run = setup, setup / "killed"
    # inside the write of the second checkpoint: its files are on disk, not yet renamed into place
    child = Child(root, run, slow_save=30, slow_after=2)
    child.wait_for("writing step_0000004")
    child.signal(signal.SIGKILL)
    assert child.finish() == -signal.SIGKILL
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000002"]
    # between or inside steps, at a random moment
    child = Child(root, run, "--resume", step_delay=0.05)
    child.wait_for("step 5")
    time.sleep(random.uniform(0.0, 0.3))
    child.signal(signal.SIGKILL)
    assert child.finish() == -signal.SIGKILL
    # inside a checkpoint write again, after a resume (unless the random kill came after the last
    # save, when there is nothing left to write)
    if ckpt.list_checkpoints(run)[-1].name != f"step_{STEPS:07d}":
        child = Child(root, run, "--resume", slow_save=30)
        child.wait_for("writing step_*")  # step 6, or 8 if the random kill came after the save at 6
        child.signal(signal.SIGKILL)
        assert child.finish() == -signal.SIGKILL
    child = Child(root, run, "--resume")
    assert child.finish() == 0, child.stderr()
    assert "as measured when the run started" in child.stderr()  # precision "auto": the recorded choice
    assert not list(ckpt.checkpoint_root(run).glob(".tmp-*"))  # leftovers of the kills are cleaned up
    assert_same_run(run, reference(root, run))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_says_how_to_resume_and_the_resume_continues_exactly(setup, signum):
    root, run = setup, setup / f"signal-{signum}"
    child = Child(root, run, step_delay=0.2)
    child.wait_for("step 3")
    child.signal(signum)
    code = child.finish()
    err = child.stderr()
    assert code == 128 + signum, err   # the shell's convention for death by a signal
    name = signal.Signals(signum).name
    message = [line for line in err.splitlines() if "stopped by" in line]
    assert len(message) == 1 and f"stopped by {name} after step " in message[0]
    assert f"neat train --resume {run}" in message[0] and "Traceback" not in err
    stopped_at = int(message[0].split("after step ")[1].split(";")[0])
    assert 3 <= stopped_at < STEPS and ckpt.read_checkpoint(run).step == stopped_at
    child = Child(root, run, "--resume")
    assert child.finish() == 0, child.stderr()
    assert_same_run(run, reference(root, run))


def test_a_second_signal_exits_at_once_and_leaves_the_checkpoints_whole(setup):
    root, run = setup, setup / "twice"
    child = Child(root, run, step_delay=0.2, slow_save=30, slow_after=2)
    child.wait_for("writing step_0000002")
    child.wait_for("step 3")
    child.signal(signal.SIGTERM)  # the loop finishes this step and writes a checkpoint (slowly)
    child.wait_for("writing step_*")
    started = time.monotonic()
    child.signal(signal.SIGTERM)
    assert child.finish() == -signal.SIGTERM and time.monotonic() - started < 10  # not after the 30 s write
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_0000002"]
    assert ckpt.read_checkpoint(run).step == 2  # whole and verified; the half-written one never appeared


def test_a_second_ctrl_c_during_the_checkpoint_write_raises_at_once_and_cleans_up(tmp_path, monkeypatch):
    """In process: the first SIGINT asks for a stop, the second (inside the stop's checkpoint write)
    is a KeyboardInterrupt; the partial directory goes, the earlier checkpoint stays, and the
    handlers are the ones from before."""
    from conftest import small_config

    trainer = Trainer(small_config(write_corpus(tmp_path / "corpus"), tmp_path / "r", save_every=2))
    real_step, real_fsync = Trainer.train_step, ckpt._fsync

    def train_step(self, log=None):
        out = real_step(self, log)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return out

    def fsync(path):
        if path.name == "optimizer.pt" and "step_0000003" in path.parent.name:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the handler runs here, before the write could finish
        real_fsync(path)

    monkeypatch.setattr(Trainer, "train_step", train_step)
    monkeypatch.setattr(ckpt, "_fsync", fsync)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert [p.name for p in ckpt.checkpoint_root(tmp_path / "r").iterdir()] == ["step_0000002"]
    assert ckpt.read_checkpoint(tmp_path / "r").step == 2
