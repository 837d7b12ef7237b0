"""Every ``neat`` entry point checks its inputs: a bad one prints one line naming the flag, key or
file, exits with code 2, and never shows a traceback. Nothing is trained or loaded before the
check fails (the runs named here mostly do not exist)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import neatlm
from conftest import small_config, write_corpus
from neatlm.cli import main
from neatlm.train.trainer import Trainer


def bad(argv: list[str], capsys, *names: str) -> str:
    """Run ``neat argv``: exit 2, one line on stderr naming every one of ``names``, nothing on stdout."""
    assert main(argv) == 2, argv
    out, err = capsys.readouterr()
    assert "Traceback" not in err and err.count("\n") == 1 and err.endswith("\n"), err
    assert out == ""
    for name in names:
        assert name in err, (name, err)
    return err


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    f = tmp_path / "a_file"
    f.write_text("not a directory\n")
    return f


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    run = root / "run"
    cfg = small_config(write_corpus(root / "corpus", n_files=6), run, steps=2, save_every=2)
    cfg.model.n_layers, cfg.eval.batches = 1, 1
    Trainer(cfg).train()
    return run


def edited_copy(run: Path, dest: Path, edit) -> Path:
    """A copy of ``run`` whose latest state.json went through ``edit`` (it is not in the manifest)."""
    shutil.copytree(run, dest)
    state_file = sorted((dest / "checkpoints").iterdir())[-1] / "state.json"
    state = json.loads(state_file.read_text())
    edit(state)
    state_file.write_text(json.dumps(state))
    return dest


# ------------------------------------------------------------------------- values the probe reported

@pytest.mark.parametrize("argv, flag, allowed", [
    (["eval", "--run", "r", "--batches", "-1"], "--batches", ">= 0"),
    (["generate", "--run", "r", "--temperature", "nan"], "--temperature", "finite number >= 0"),
    (["generate", "--run", "r", "--temperature", "inf"], "--temperature", "finite number >= 0"),
    (["generate", "--run", "r", "--temperature", "-0.5"], "--temperature", "finite number >= 0"),
    (["generate", "--run", "r", "--top-k", "-1"], "--top-k", ">= 0"),
    (["generate", "--run", "r", "--max-bytes", "-1"], "--max-bytes", ">= 0"),
    (["generate", "--run", "r", "--seed", "-1"], "--seed", "from 0 to"),
    (["generate", "--run", "r", "--seed", str(2**64)], "--seed", "from 0 to"),
    (["generate", "--run", "r", "--prompt", "def \udcff"], "--prompt", "not valid UTF-8"),
    (["gradcheck", "--tolerance", "-1"], "--tolerance", "finite number > 0"),
    (["gradcheck", "--tolerance", "0"], "--tolerance", "finite number > 0"),
    (["gradcheck", "--samples", "0"], "--samples", ">= 1"),
    (["gradcheck", "--batch", "0"], "--batch", ">= 1"),
    (["gradcheck", "--seq-len", "1"], "--seq-len", ">= 2"),
    (["gradcheck", "--seed", "-3"], "--seed", "from 0 to"),
    (["eval", "--run", "r", "--task", "images"], "--task", "choose from"),
    (["train", "--bogus"], "--bogus", "unrecognized"),
    (["generate"], "--run", "required"),
])
def test_bad_value_names_the_flag_and_what_is_allowed(argv, flag, allowed, capsys):
    bad(argv, capsys, flag, allowed)


def test_non_utf8_argv_is_refused_from_the_real_command_line(tmp_path):
    """Bytes that are not UTF-8 reach sys.argv as surrogate escapes; they must not crash an encode."""
    src = str(Path(neatlm.__file__).resolve().parents[1])  # the neatlm under test
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict",  # the strictest stdout/stderr a user can have
           "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")]))}
    for args in ([b"generate", b"--run", os.fsencode(tmp_path), b"--prompt", b"def \xff\xfe"],
                 [b"config", b"--set", b"data.path=/tmp/\xff"]):
        proc = subprocess.run([os.fsencode(sys.executable), b"-m", b"neatlm", *args], capture_output=True, env=env,
                              timeout=120)
        err = proc.stderr.decode("utf-8", errors="replace")
        assert proc.returncode == 2, err
        assert "Traceback" not in err and err.count("\n") == 1, err
        assert ("--prompt" if b"--prompt" in args else "--set") in err and "not valid UTF-8" in err, err
        assert proc.stdout == b""


# ------------------------------------------------------------------------- paths and saved state

def test_output_directories_must_be_directories(a_file, capsys):
    bad(["sweep", "--grid", "train.steps=1", "--out", str(a_file)], capsys, "--out", "is a file")
    bad(["sweep", "--grid", "train.steps=1", "--out", str(a_file / "sub")], capsys, "--out", "cannot be created")
    bad(["train", "--run-dir", str(a_file)], capsys, "--run-dir", str(a_file), "is a file")
    bad(["train", "--run-dir", str(a_file / "sub" / "deeper")], capsys, "--run-dir", "cannot be created")
    bad(["train", "--set", f"train.run_dir={a_file}"], capsys, "train.run_dir", "is a file")
    assert a_file.read_text() == "not a directory\n"


def test_output_directory_that_is_not_writable(tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == locked and mode & os.W_OK else real(p, mode))
    bad(["train", "--run-dir", str(locked)], capsys, "--run-dir", "not writable")
    bad(["train", "--run-dir", str(locked / "new")], capsys, "--run-dir", "cannot be created", "not writable")
    bad(["sweep", "--grid", "train.steps=1", "--out", str(locked / "s")], capsys, "--out", "not writable")
    assert list(locked.iterdir()) == []


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes through file modes")
def test_output_directory_with_read_only_mode(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        bad(["train", "--run-dir", str(locked / "run")], capsys, "--run-dir", "not writable")
    finally:
        locked.chmod(0o700)


def test_input_files_and_directories(tmp_path, a_file, capsys, monkeypatch):
    missing = tmp_path / "missing"
    bad(["plot", str(missing)], capsys, "RUN_DIR", str(missing), "no such run directory")
    bad(["plot", str(a_file)], capsys, "RUN_DIR", "is a file")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "plots").write_text("")
    bad(["plot", str(tmp_path / "run")], capsys, "RUN_DIR", "plots", "is a file")
    for cmd in ("generate", "eval"):
        bad([cmd, "--run", str(missing)], capsys, "--run", str(missing), "no such run")
        bad([cmd, "--run", str(a_file)], capsys, "--run", "is a file")
        bad([cmd, "--run", str(tmp_path)], capsys, str(tmp_path), "no checkpoints")
    bad(["train", "--resume", str(a_file)], capsys, "--resume", "is a file")
    bad(["train", "--resume", str(tmp_path), "--run-dir", str(tmp_path / "x")], capsys, "--resume", "--run-dir")
    for cmd in (["config"], ["train"], ["gradcheck"], ["sweep", "--grid", "train.steps=1"]):
        bad([*cmd, "--config", str(missing)], capsys, "--config", "no such file")
        bad([*cmd, "--config", str(tmp_path)], capsys, "--config", "is a directory")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == a_file else real(p, mode))
    bad(["config", "--config", str(a_file)], capsys, "--config", "not readable")


def test_run_whose_weights_do_not_match_its_config(trained_run, tmp_path, capsys):
    wider = edited_copy(trained_run, tmp_path / "wider", lambda s: s["config"]["model"].update(dim=64))
    for cmd in ("generate", "eval"):
        bad([cmd, "--run", str(wider)], capsys, "model.safetensors", "does not match the config", "state.json")
    no_config = edited_copy(trained_run, tmp_path / "no_config", lambda s: s.pop("config"))
    bad(["generate", "--run", str(no_config)], capsys, "state.json", "no saved config")
    assert main(["generate", "--run", str(trained_run), "--max-bytes", "0", "--prompt", "x"]) == 0
    assert capsys.readouterr().out == "x\n"


def test_init_from_that_is_not_a_fitting_run(trained_run, tmp_path, capsys):
    corpus = trained_run.parent / "corpus"
    base = ["train", "--set", f"data.path={corpus}", "--set", "train.steps=1", "--set", "train.progress=false",
            "--set", "train.device=cpu"]
    bad([*base, "--set", f"train.run_dir={tmp_path / 'a'}", "--set", f"train.init_from={tmp_path / 'nowhere'}"],
        capsys, "train.init_from", "nowhere")
    # the default model is wider than the trained run's
    bad([*base, "--set", f"train.run_dir={tmp_path / 'b'}", "--set", f"train.init_from={trained_run}"],
        capsys, "train.init_from", "does not match the model this run's config builds")


# ------------------------------------------------------------------------- a small fuzz over flags

_RUN = ["--run", "/nonexistent/neat-run"]  # never reached: the value check comes first
NUMERIC_FLAGS = [
    (["generate", *_RUN], "--max-bytes"),
    (["generate", *_RUN], "--temperature"),
    (["generate", *_RUN], "--top-k"),
    (["generate", *_RUN], "--seed"),
    (["eval", *_RUN], "--batches"),
    (["gradcheck"], "--samples"),
    (["gradcheck"], "--batch"),
    (["gradcheck"], "--seq-len"),
    (["gradcheck"], "--tolerance"),
    (["gradcheck"], "--seed"),
]
# bad for every numeric flag: negative, not finite, not a number, empty, not UTF-8, a flag, missing
BAD_NUMBERS = ["-1", "-7.5", "nan", "NaN", "inf", "-inf", "1e999", "", " ", "abc", "0x10", "1,5", "\udcff", "--",
               "--run", None]


@pytest.mark.parametrize("prefix, flag", NUMERIC_FLAGS, ids=[f"{p[0]}{f}" for p, f in NUMERIC_FLAGS])
@pytest.mark.parametrize("value", BAD_NUMBERS, ids=repr)
def test_fuzz_numeric_flags(prefix, flag, value, capsys):
    argv = [*prefix, flag] + ([] if value is None else [value])
    bad(argv, capsys, flag)


INTEGER_FLAGS = [(p, f) for p, f in NUMERIC_FLAGS if f not in ("--temperature", "--tolerance")]


@pytest.mark.parametrize("prefix, flag", INTEGER_FLAGS, ids=[f"{p[0]}{f}" for p, f in INTEGER_FLAGS])
def test_fuzz_integer_flags_refuse_fractions(prefix, flag, capsys):
    bad([*prefix, flag, "1.5"], capsys, flag, "expected an integer")


PATH_FLAGS = [  # (argv before the value, how the flag is named, the kinds of bad value)
    (["train", "--run-dir"], "--run-dir", ("file", "under_file", "not_utf8")),
    (["train", "--resume"], "--resume", ("missing", "file", "not_utf8")),
    (["generate", "--run"], "--run", ("missing", "file", "not_utf8")),
    (["eval", "--run"], "--run", ("missing", "file", "not_utf8")),
    (["sweep", "--grid", "train.steps=1", "--out"], "--out", ("file", "under_file", "not_utf8")),
    (["plot"], "RUN_DIR", ("missing", "file", "not_utf8")),
    (["config", "--config"], "--config", ("missing", "dir", "not_utf8")),
    (["gradcheck", "--config"], "--config", ("missing", "dir", "not_utf8")),
    (["train", "--config"], "--config", ("missing", "dir", "not_utf8")),
]


@pytest.mark.parametrize("prefix, name, kinds", PATH_FLAGS, ids=[" ".join(p) for p, _, _ in PATH_FLAGS])
def test_fuzz_path_flags(prefix, name, kinds, tmp_path, a_file, capsys):
    values = {"missing": str(tmp_path / "missing"), "file": str(a_file), "under_file": str(a_file / "x"),
              "dir": str(tmp_path), "not_utf8": str(tmp_path / "r\udcff")}
    for kind in kinds:
        err = bad([*prefix, values[kind]], capsys)
        assert name in err or (kind == "not_utf8" and "not valid UTF-8" in err), (kind, err)


@pytest.mark.parametrize("argv, name", [
    (["config", "--set", "model.dim"], "model.dim"),
    (["config", "--set", "model.dim=-1"], "model.dim"),
    (["config", "--set", "train.lr=nan"], "train.lr"),
    (["config", "--set", "train.lr=inf"], "train.lr"),
    (["config", "--set", "nosuch.key=1"], "nosuch"),
    (["config", "--set", "model.nosuch=1"], "model.nosuch"),
    (["config", "--set", "data.path=\udcff"], "--set"),
    (["config", "--preset", "nope"], "--preset"),
    (["config", "--preset", "\udcff"], "--preset"),
    (["sweep", "--grid", "=1"], "--grid"),
    (["sweep", "--grid", "train.steps"], "--grid"),
    (["sweep", "--grid", "train.steps=1,,2"], "train.steps"),
    (["sweep", "--grid", "\udcff=1"], "--grid"),
    (["sweep"], "--grid"),
    ([], "command"),
    (["nosuch"], "nosuch"),
])
def test_fuzz_config_keys_and_text_flags(argv, name, capsys):
    bad(argv, capsys, name)
