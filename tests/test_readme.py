"""README.md's examples run as written.

Every ```python block runs in its own fresh interpreter (nothing from the tests leaks in). A block
may be skipped only if it needs a trained run: put ``<!-- readme-test: skip: REASON -->`` on the
line before its fence; the reason is shown in the test report. The ```toml example is trained
for two steps through the real ``neat train``.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import neatlm
from neatlm.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^(?:<!-- readme-test: skip: (?P<skip>[^>]*?) -->\n)?```(?P<lang>\w+)\n(?P<code>.*?)^```$",
                   re.S | re.M)


def blocks(lang: str) -> list[tuple[int, str, str | None]]:
    """(line number, code, skip reason) of every ```lang block."""
    text = README.read_text(encoding="utf-8")
    return [(text[:m.start("code")].count("\n"), m["code"], m["skip"])
            for m in FENCE.finditer(text) if m["lang"] == lang]


PYTHON = blocks("python")


def test_the_readme_has_examples():
    assert len(PYTHON) >= 2 and len(blocks("toml")) == 1


@pytest.mark.parametrize("line, code, skip", PYTHON, ids=[f"README.md:{b[0]}" for b in PYTHON])
def test_python_block_runs(line, code, skip, tmp_path):
    if skip is not None:
        assert skip.strip(), f"README.md:{line}: a skipped block must say why"
        pytest.skip(f"README.md:{line}: {skip}")
    # the neatlm under test, not another checkout's (a relative PYTHONPATH breaks in another cwd)
    src = str(Path(neatlm.__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "2",
           "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"README.md:{line} failed:\n{proc.stderr[-3000:]}"


def test_toml_example_trains(corpus_dir, tmp_path, capsys):
    ((_, toml, _),) = blocks("toml")
    config = tmp_path / "example.toml"
    config.write_text(toml)
    small = ["model.dim=32", "model.n_layers=1", "model.n_heads=2", "memory.chunk_size=16", "train.steps=2",
             "train.batch_size=2", "train.seq_len=32", "eval.batches=1", "train.progress=false",
             "data.val_fraction=0.2", f"data.path={corpus_dir}", "train.device=cpu", "train.precision=fp32"]
    # the README says this example needs memory on, and names the two settings
    sets = ["memory.enabled=true", "model.window=64", *small]
    argv = ["train", "--config", str(config), "--run-dir", str(tmp_path / "run")]
    assert main([*argv, *(a for s in sets for a in ("--set", s))]) == 0, capsys.readouterr().err
    out = capsys.readouterr()
    assert json.loads(out.out.strip().splitlines()[-1])["step"] == 2
    assert "memory (" in out.err and "trunk (" in out.err  # both components were built
