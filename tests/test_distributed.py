"""A 2-process gloo run under torchrun equals one process with the same global batch."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from neatlm.train.metrics import read_metrics


def _args(corpus_dir: Path, run_dir: Path) -> list[str]:
    sets = [f"data.path={corpus_dir}", "model.dim=32", "model.n_layers=2", "model.n_heads=2", "train.steps=4",
            "train.batch_size=4", "train.seq_len=32", "train.accum_steps=2", "eval.batches=1", "eval.every=2",
            "train.progress=false", "data.val_fraction=0.2", "train.threads=1", "train.device=cpu",
            "train.precision=fp32", "train.log_every=1", "train.save_every=2"]
    return ["train", "--run-dir", str(run_dir)] + [a for s in sets for a in ("--set", s)]


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None, reason="no torchrun")
def test_two_process_gloo_equals_one_process(corpus_dir, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "neatlm", *_args(corpus_dir, tmp_path / "one")], check=True, env=env,
                   capture_output=True, timeout=300)
    two = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "neatlm",
                          *_args(corpus_dir, tmp_path / "two")], env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b]  # rank 0 alone wrote the records
    for ra, rb in zip(a, b):
        for key in ("loss", "val_loss"):
            if key in ra:
                assert abs(ra[key] - rb[key]) < 1e-5, (ra, rb)
    assert len(list((tmp_path / "two" / "checkpoints").iterdir())) == 2
