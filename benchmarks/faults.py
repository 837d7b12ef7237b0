"""Fault benchmark: what neatlm does with bad input, a killed run, a hostile checkpoint and NaNs.

    python benchmarks/faults.py [--kills 8] [--quick] [--seed 0] [--rows inputs,kills,hostile,nan] [--keep]

About 3 minutes on 2 CPU cores (about 1 with --quick); progress goes to stderr, the table to stdout,
and the exit code is 1 unless every row is perfect. ``--keep`` keeps the scratch directory, so the
damaged run directories named in the failure list can be inspected.

The reliability claims of the README (one-line errors with exit code 2, atomic checkpoints,
bit-exact resume, loading runs no code, no rejected or non-finite step reaches a checkpoint) are
each tested by a unit test on a few hand-picked cases. This script tries them wholesale, in one
run, and prints one table:

- bad inputs: every key of every config section (and of a ``[components.<name>]`` table) gets
  values of the wrong type, below ``min``, above ``max``, outside ``choices`` and nan/inf, both
  through ``neat config --set`` and through a TOML file; every flag of every subcommand gets bad
  values and wrong kinds of path (found by introspecting the parser, so a new flag is covered
  without editing this file); every text argument gets non-UTF-8 bytes from a real command line;
  and run directories are damaged in every way listed below for ``neat train --resume``,
  ``neat eval`` and ``neat generate``. Clean = exit code 2, exactly one stderr line naming the
  key, flag or file, no traceback. Where a command does not read the damaged part (``eval`` does
  not read the optimizer state), finishing normally (exit 0) is clean too;
- kills: ``python -m neatlm train`` SIGKILLed at seeded random moments (half of them right when a
  checkpoint's temporary directory appears, i.e. inside a checkpoint write), then resumed to the
  end; the final weights must equal those of an uninterrupted run bit for bit, and the latest
  checkpoint after a kill must be readable and no older than the newest one seen complete;
- hostile files: checkpoints that would run code if a loader executed what they name (a carried
  state naming ``os:system``, pickles whose ``__reduce__`` calls ``os.system``, pickles in place of
  safetensors files); every such command must leave no marker file behind;
- NaN injections: NaN/inf gradients and NaN activations injected at chosen steps of an in-process
  run, and a run at lr 1e30; every checkpoint written must hold finite tensors and weights of an
  accepted step (never the update of a step the guard rejected).

Nothing is skipped silently: a reduced run (``--quick``, ``--rows``) says under the table what it
left out. Every case that is not clean is listed with its command and what happened.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import io
import json
import math
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from safetensors.torch import load_file  # noqa: E402

from neatlm.cli import build_parser  # noqa: E402
from neatlm.cli import main as neat_main  # noqa: E402
from neatlm.config import Config, apply_overrides, validate  # noqa: E402
from neatlm.errors import NeatError, TrainingDiverged  # noqa: E402
from neatlm.grad.components import ComponentSpec  # noqa: E402
from neatlm.train import checkpoint as ckpt  # noqa: E402
from neatlm.train.trainer import Trainer  # noqa: E402

ROWS = ("inputs", "kills", "hostile", "nan")
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
COMMANDS = ("train", "eval", "generate")     # the commands that load a run directory


def say(message: str) -> None:
    """Progress, on the real stderr (the commands' own stderr is being captured)."""
    print(f"faults: {message}", file=sys.__stderr__, flush=True)


# ============================================================================ running a command

@dataclass
class Outcome:
    code: int | None        # None: the command raised instead of returning an exit code
    out: str
    err: str
    exc: str | None = None  # "TypeError: ..." when it raised


def _first_line(text: str, limit: int = 240) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= limit else line[:limit] + "..."


def neat(argv: Sequence[str]) -> Outcome:
    """``neat ARGV`` in this process; any exception that escapes ``main`` is recorded, not raised."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = neat_main(list(argv))
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # noqa: BLE001 - SystemExit included: main must return, never raise
        return Outcome(None, out.getvalue(), err.getvalue(), f"{type(exc).__name__}: {_first_line(str(exc))}")
    return Outcome(code, out.getvalue(), err.getvalue())


def neat_process(argv: Sequence[str | bytes], timeout: float = 300) -> Outcome:
    """``python -m neatlm ARGV`` as a real process (for arguments that only a real argv can carry)."""
    try:
        p = subprocess.run([sys.executable, "-m", "neatlm", *argv], capture_output=True, timeout=timeout,
                           env=SUBPROCESS_ENV)
    except subprocess.TimeoutExpired:
        return Outcome(None, "", "", f"timed out after {timeout:.0f} s")
    return Outcome(p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace"))


def why_not_clean(o: Outcome, names: Sequence[str], may_succeed: bool = False) -> str | None:
    """None when ``o`` is a clean refusal (exit 2, one stderr line naming one of ``names``, no
    traceback), or a normal finish where ``may_succeed``; otherwise what was wrong."""
    if o.exc is not None:
        return f"raised {o.exc}"
    if "Traceback" in o.err + o.out:
        return f"printed a traceback ending {_last_line(o.err)!r}"
    if may_succeed and o.code == 0:
        return None
    lines = [ln for ln in o.err.splitlines() if ln.strip()]
    if o.code != 2:
        return f"exit {o.code}" + (f", stderr ends {_last_line(o.err)!r}" if lines else ", nothing on stderr")
    if len(lines) != 1:
        return f"{len(lines)} stderr lines: {' | '.join(ln[:160] for ln in lines[:3])}"
    if not any(n in lines[0] for n in names):
        return f"the message names none of {list(names)}: {lines[0][:300]!r}"
    return None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:240] if lines else ""


def show(argv: Sequence[str | bytes]) -> str:
    """A command line as a user would type it."""
    def word(a: str | bytes) -> str:
        text = a.decode("utf-8", "backslashreplace") if isinstance(a, bytes) else a
        return text if text and all(c.isalnum() or c in "-_./=,:+" for c in text) else repr(text)
    return "neat " + " ".join(word(a) for a in argv)


@dataclass
class Case:
    """One bad input: the command, what its error must name, and whether finishing is also fine."""

    label: str
    argv: list[str | bytes]
    names: tuple[str, ...]
    may_succeed: bool = False
    real_process: bool = False


@dataclass
class RowResult:
    row: str
    tried: int
    result: str
    perfect: bool
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)   # worth knowing, not counted against the row


@contextlib.contextmanager
def working_dir(path: Path) -> Iterator[None]:
    """``contextlib.chdir`` (Python 3.11+) for 3.10 too."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def run_cases(row: str, cases: list[Case], cwd: Path) -> RowResult:
    """Run every case (in this process unless it needs a real argv) and count the clean ones."""
    failures = []
    with working_dir(cwd):  # relative defaults (runs/default, runs/sweep) land in the scratch dir
        for case in cases:
            o = neat_process(case.argv) if case.real_process else neat(case.argv)
            why = why_not_clean(o, case.names, case.may_succeed)
            if why:
                failures.append(f"{case.label}: `{show(case.argv)}` -> {why}")
    clean = len(cases) - len(failures)
    return RowResult(row, len(cases), f"{clean}/{len(cases)} handled cleanly", not failures, failures)


# ============================================================================ a corpus and tiny configs

def write_corpus(root: Path, n_files: int = 12, seed: int = 0) -> Path:
    """Python-looking files, enough for a tiny model to learn something (as in tests/conftest.py)."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    words = ["alpha", "beta", "gamma", "delta", "value", "index", "total", "result"]
    for i in range(n_files):
        lines = [f"def {rng.choice(words)}_{j}({(b := rng.choice(words))}):\n    return {b} + {rng.randint(0, 9)}\n"
                 for j in range(60)]
        (root / f"mod_{i:02d}.py").write_text("".join(lines))
    return root


def tiny_settings(corpus: Path, **extra: Any) -> dict[str, dict[str, Any]]:
    """The tiny model of every run here: memory on, a sliding window, a chunk shorter than a sequence
    (so memory state is carried inside and, with reset = "never", across steps)."""
    tables: dict[str, dict[str, Any]] = {
        "model": {"dim": 32, "n_layers": 2, "n_heads": 2, "context": 64, "window": 16},
        "memory": {"enabled": True, "chunk_size": 8, "reset": "sequence"},
        "data": {"path": str(corpus), "val_fraction": 0.2},
        "train": {"steps": 6, "batch_size": 4, "seq_len": 32, "save_every": 2, "warmup_steps": 2, "log_every": 1,
                  "device": "cpu", "precision": "fp32", "progress": False, "threads": 1},
        "eval": {"every": 0, "batches": 1},
    }
    for key, value in extra.items():
        section, name = key.split("__")
        tables.setdefault(section, {})[name] = value
    return tables


def toml_text(tables: dict[str, dict[str, Any]]) -> str:
    def lit(v: Any) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else repr(v) if isinstance(v, (int, float)) \
            else json.dumps(str(v))
    return "".join(f"[{s}]\n" + "".join(f"{k} = {lit(v)}\n" for k, v in body.items()) for s, body in tables.items())


def config_of(tables: dict[str, dict[str, Any]], run_dir: Path) -> Config:
    cfg = Config()
    sets = [f"{s}.{k}={v}" for s, body in tables.items() for k, v in body.items()]
    apply_overrides(cfg, sets + [f"train.run_dir={run_dir}"])
    validate(cfg)
    return cfg


@dataclass
class Workspace:
    """Scratch files shared by the rows: a corpus, a tiny config file, a trained run, another size."""

    root: Path
    corpus: Path
    tiny_toml: Path
    run: Path      # trained to step 4 of 6, checkpoints at 2 and 4, carried memory state
    other: Path    # a run of another model size (dim 64), checkpoint at step 2
    n: int = 0

    def fresh(self, name: str) -> Path:
        """A new, not yet existing path under the scratch directory."""
        self.n += 1
        return self.root / f"{name}-{self.n:04d}"

    def copy_run(self, name: str) -> Path:
        dst = self.fresh(name)
        shutil.copytree(self.run, dst)
        return dst


def make_workspace(root: Path) -> Workspace:
    corpus = write_corpus(root / "corpus")
    tiny = tiny_settings(corpus, train__steps=2, train__save_every=1)
    (root / "tiny.toml").write_text(toml_text(tiny))
    run, other = root / "run", root / "other"
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # the trainers' validation lines
        _train_workspace_runs(corpus, run, other)
    return Workspace(root, corpus, root / "tiny.toml", run, other)


def _train_workspace_runs(corpus: Path, run: Path, other: Path) -> None:
    Trainer(config_of(tiny_settings(corpus, memory__reset="never"), run)).train(until_step=4)
    big = tiny_settings(corpus, model__dim=64, memory__reset="never", train__steps=2)
    Trainer(config_of(big, other)).train()


# ============================================================================ bad config values

@dataclass(frozen=True)
class BadValue:
    kind: str
    cli: str | None    # text after "=" in --set; None: a --set string cannot express it
    toml: str          # a TOML literal


def _float_text(x: float) -> str:
    return repr(float(x))


def bad_values(tp: Any, rules: dict[str, Any], quick: bool) -> list[BadValue]:
    """Values that break a field's type or rules, from its annotation and metadata alone."""
    if typing.get_origin(tp) is tuple:
        return _bad_tuples(tp, rules)
    vals: list[BadValue] = []
    if tp is bool:
        vals += [BadValue("wrong type", "maybe", '"yes"'), BadValue("wrong type", "2", "1")]
    elif tp is int:
        vals += [BadValue("wrong type", "1.5", "1.5"), BadValue("wrong type", "ten", '"3"'),
                 BadValue("wrong type", "", "true")]
        if "min" in rules:
            vals.append(BadValue("below min", str(rules["min"] - 1), str(rules["min"] - 1)))
        if "max" in rules:
            vals.append(BadValue("above max", str(rules["max"] + 1), str(rules["max"] + 1)))
    elif tp is float:
        vals += [BadValue("wrong type", "ten", '"0.5"'), BadValue("wrong type", "", "true")]
        for kind, text in (("nan", "nan"), ("inf", "inf"), ("-inf", "-inf")):
            vals.append(BadValue(kind, text, text))
        if "min" in rules:
            for x in (math.nextafter(rules["min"], -math.inf), rules["min"] - 1.0):
                vals.append(BadValue("below min", _float_text(x), _float_text(x)))
        if "max" in rules:
            for x in (math.nextafter(rules["max"], math.inf), rules["max"] + 1.0):
                vals.append(BadValue("above max", _float_text(x), _float_text(x)))
        if "above" in rules:
            vals.append(BadValue("not above bound", _float_text(rules["above"]), _float_text(rules["above"])))
        if "below" in rules:
            vals.append(BadValue("not below bound", _float_text(rules["below"]), _float_text(rules["below"])))
    elif tp is str:
        vals += [BadValue("wrong type", None, "3"), BadValue("wrong type", None, '["a"]')]
        if "choices" in rules:
            first = rules["choices"][0]
            vals += [BadValue("not in choices", "bogus", '"bogus"'), BadValue("not in choices", "", '""')]
            if first.upper() != first:
                vals.append(BadValue("not in choices", first.upper(), json.dumps(first.upper())))
    if quick:  # the first value of each kind
        first: dict[str, BadValue] = {}
        for v in vals:
            first.setdefault(v.kind, v)
        vals = list(first.values())
    return vals


def _bad_tuples(tp: Any, rules: dict[str, Any]) -> list[BadValue]:
    """Tuples (components' patterns, exclude, betas) exist only in TOML and component --set values."""
    args = typing.get_args(tp)

    def both(kind: str, literal: str) -> BadValue:
        return BadValue(kind, literal, literal)

    if args == (str, Ellipsis):
        return [both("wrong type", "3"), both("wrong type", "[1, 2]")]
    n = len(args)

    def tup(items: list[str]) -> str:
        return "[" + ", ".join(items) + "]"

    rest = ["0.5"] * (n - 1)
    vals = [both("wrong type", '"0.9"'), both("wrong length", tup(["0.5"])),
            both("wrong length", tup(["0.5"] * (n + 1))), both("nan", tup(["nan", *rest])),
            both("inf", tup([*rest, "inf"]))]
    if "min" in rules:
        vals.append(both("below min", tup([_float_text(math.nextafter(rules["min"], -math.inf)), *rest])))
    if "below" in rules:
        vals.append(both("not below bound", tup([*rest, _float_text(rules["below"])])))
    return vals


def config_fields() -> Iterator[tuple[str, str, Any, dict[str, Any], bool]]:
    """(table, key, type, rules, is_component) for every settable key: each section of
    :class:`Config`, then the keys of a ``[components.main]`` table."""
    hints = typing.get_type_hints(Config)
    for f in dataclasses.fields(Config):
        cls = hints[f.name]
        if not dataclasses.is_dataclass(cls):
            continue   # components: a dict of tables, covered through ComponentSpec below
        types = typing.get_type_hints(cls)
        for sub in dataclasses.fields(cls):
            if sub.init:
                yield f.name, sub.name, types[sub.name], dict(sub.metadata), False
    types = typing.get_type_hints(ComponentSpec)
    for sub in dataclasses.fields(ComponentSpec):
        if sub.init and sub.name != "name":
            yield "components.main", sub.name, types[sub.name], dict(sub.metadata), True


def config_value_cases(ws: Workspace, quick: bool) -> tuple[list[Case], list[Case]]:
    """(--set cases, TOML file cases) for every key and every bad value of it."""
    by_set, by_file = [], []
    for table, key, tp, rules, component in config_fields():
        full = f"{table}.{key}"
        for v in bad_values(tp, rules, quick):
            label = f"{full} {v.kind}"
            # component values are TOML on the command line too (neatlm.config._set_component)
            text = v.toml if component else v.cli
            if text is not None:
                by_set.append(Case(f"--set {label}", ["config", "--set", f"{full}={text}"], (full,)))
            path = ws.fresh("bad").with_suffix(".toml")
            path.write_text(f"[{table}]\n{key} = {v.toml}\n")
            by_file.append(Case(f"TOML {label} ({key} = {v.toml})", ["config", "--config", str(path)], (full,)))
    return by_set, by_file


def config_structure_cases(ws: Workspace) -> tuple[list[Case], list[Case]]:
    """Malformed keys and files, beyond single bad values."""
    by_set = [Case(f"--set {s!r}", ["config", "--set", s], names) for s, names in (
        ("model.dim", ("model.dim",)), ("=8", ("--set", "''")), ("model=8", ("model",)),
        ("model.dim.x=8", ("model.dim.x",)), ("nosuch.key=1", ("nosuch",)), ("model.nosuch=1", ("model.nosuch",)),
        ("components.main=1", ("components.main",)), ("components.a.b.c=1", ("components.a.b.c",)),
        ("components.main.nosuch=1", ("components.main.nosuch",)), ("", ("--set", "''")))]
    files = {
        "unknown section": ("[nosuch]\nx = 1\n", ("nosuch",)),
        "unknown key": ("[model]\nnosuch = 1\n", ("model.nosuch",)),
        "section given a value": ("model = 3\n", ("model",)),
        "components given a value": ("components = 3\n", ("components",)),
        "a component given a value": ("[components]\nmain = 3\n", ("components",)),
        "unknown component key": ("[components.main]\nnosuch = 1\n", ("components.main.nosuch",)),
        "invalid TOML": ("[model\ndim = 8\n", None),
        "duplicate key": ("[model]\ndim = 32\ndim = 64\n", None),
    }
    by_file = []
    for label, (text, names) in files.items():
        path = ws.fresh("structure").with_suffix(".toml")
        path.write_text(text)
        by_file.append(Case(f"TOML {label}", ["config", "--config", str(path)], names or (str(path),)))
    raw = ws.fresh("latin1").with_suffix(".toml")
    raw.write_bytes(b'[data]\npath = "caf\xe9"\n')
    by_file.append(Case("TOML file that is not UTF-8", ["config", "--config", str(raw)], (str(raw),)))
    missing = ws.fresh("missing").with_suffix(".toml")
    by_file.append(Case("--config of a missing file", ["config", "--config", str(missing)], (str(missing),)))
    by_file.append(Case("--config of a directory", ["config", "--config", str(ws.root)], (str(ws.root),)))
    return by_set, by_file


# ============================================================================ bad flags

PATH_KINDS = {"run": "checkpoint", "resume": "checkpoint", "config": "file", "out": "output", "run_dir": "output"}
# flags that refuse to be combined with others: their cases run without the usual base arguments
ALONE = {"--resume"}


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def flag_name(action: argparse.Action) -> str:
    return action.option_strings[0] if action.option_strings else action.metavar or action.dest


def value_kind(action: argparse.Action) -> str:
    """What a flag takes, found by asking its ``type`` function: int, float, text, choice or none."""
    if action.nargs == 0:
        return "none"
    if action.choices is not None:
        return "choice"
    if action.type is None:
        return "text"
    try:
        value = action.type("3")
    except Exception:  # noqa: BLE001 - e.g. a count that must be larger: still a number
        return "int"
    return "int" if isinstance(value, int) else "float" if isinstance(value, float) else "text"


def base_args(ws: Workspace) -> dict[str, dict[str, list[str]]]:
    """Per subcommand, arguments that make the rest of the command valid and cheap (tiny config,
    a trained run, fresh output directories), so a bad value that slips through just runs quickly."""
    run, tiny = str(ws.run), str(ws.tiny_toml)
    return {
        "train": {"--config": ["--config", tiny], "--run-dir": ["--run-dir", str(ws.fresh("train"))]},
        "generate": {"--run": ["--run", run], "--max-bytes": ["--max-bytes", "4"]},
        "eval": {"--run": ["--run", run], "--batches": ["--batches", "1"]},
        "gradcheck": {"--config": ["--config", tiny], "--samples": ["--samples", "1"]},
        "sweep": {"--config": ["--config", tiny], "--grid": ["--grid", "train.seed=0"],
                  "--out": ["--out", str(ws.fresh("sweep"))]},
        "plot": {"RUN_DIR": [run]},
        "adapt": {"--run": ["--run", run], "--data": ["--data", str(ws.corpus)], "--name": ["--name", "fuzz"],
                  "--set": ["--set", "adapt.steps=1", "--set", "adapt.batch_size=1", "--set", "adapt.seq_len=8"]},
    }


def command(sub: str, flag: str, value: str | bytes | None, ws: Workspace, omit: bool = False) -> list[str | bytes]:
    """``sub`` with its base arguments and ``flag`` given ``value`` (``--flag=value``, so that values
    such as ``-inf`` reach the flag's type check); no value: the bare flag; ``omit``: no flag at all."""
    base = {} if flag in ALONE else base_args(ws).get(sub, {})
    rest = [a for f, args in base.items() if f != flag for a in args]
    if omit:
        return [sub, *rest]
    if not flag.startswith("-"):
        return [sub, *rest, value]
    if value is None:
        return [sub, *rest, flag]
    if isinstance(value, bytes):
        return [sub, *rest, flag.encode() + b"=" + value]
    return [sub, *rest, f"{flag}={value}"]


def bad_flag_values(action: argparse.Action, kind: str) -> list[str]:
    """Bad values for a flag of this kind, plus the values just outside the bounds its ``type``
    function closes over (``low``/``high``, ``inclusive``), when it has them."""
    if kind == "int":
        bounds = inspect.getclosurevars(action.type).nonlocals if action.type else {}
        low, high = bounds.get("low"), bounds.get("high")
        values = ["-1", "1.5", "abc", "", "nan", "inf", "1e3"]
        if isinstance(low, int) and low - 1 != -1:
            values.append(str(low - 1))
        if isinstance(high, int):
            values.append(str(high + 1))
        return values
    if kind == "float":
        bounds = inspect.getclosurevars(action.type).nonlocals if action.type else {}
        values = ["-1", "-1e-300", "nan", "inf", "-inf", "1e999", "abc", ""]
        if bounds.get("inclusive") is False and isinstance(bounds.get("low"), float):
            values.append(repr(bounds["low"]))
        return values
    if kind == "choice":
        return ["bogus", str(action.choices[0]).upper()]
    return []


def path_values(kind: str, ws: Workspace) -> list[tuple[str, str]]:
    a_file, empty = ws.tiny_toml, ws.fresh("empty")
    empty.mkdir()
    if kind == "checkpoint":
        return [("missing", str(ws.fresh("missing"))), ("a file", str(a_file)), ("an empty directory", str(empty)),
                ("checkpoints/ itself", str(ws.run / "checkpoints"))]
    if kind == "file":
        return [("missing", str(ws.fresh("missing.toml"))), ("a directory", str(empty))]
    return [("a file", str(a_file)), ("under a file", str(a_file / "sub"))]


def flag_cases(ws: Workspace) -> tuple[list[Case], list[Case]]:
    """(in-process cases, real-process non-UTF-8 cases) for every flag of every subcommand."""
    cases, raw = [], []
    for sub, parser in subcommands().items():
        cases.append(Case(f"{sub}: unknown flag", command(sub, "--bogus-flag", "1", ws), ("--bogus-flag",)))
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag, kind = flag_name(action), value_kind(action)
            if action.required or not action.option_strings:
                cases.append(Case(f"{sub}: {flag} left out", command(sub, flag, None, ws, omit=True), (flag,)))
            if kind == "none":
                continue
            if action.option_strings:
                cases.append(Case(f"{sub} {flag}: no value", command(sub, flag, None, ws), (flag,)))
            for value in bad_flag_values(action, kind):
                cases.append(Case(f"{sub} {flag} {value!r}", command(sub, flag, value, ws), (flag,)))
            if action.dest in PATH_KINDS:
                for what, path in path_values(PATH_KINDS[action.dest], ws):
                    cases.append(Case(f"{sub} {flag} {what}", command(sub, flag, path, ws), (flag, path)))
            if kind == "text":
                raw.append(Case(f"{sub} {flag} non-UTF-8 (real argv)", command(sub, flag, b"\xff\xfebad", ws),
                                (flag,), real_process=True))
    cases += special_flag_cases(ws)
    raw += [Case("subcommand name non-UTF-8 (real argv)", [b"tr\xffin"], ("command",), real_process=True),
            Case("flag name non-UTF-8 (real argv)", ["config", b"--s\xffet", "x"], ("--s",), real_process=True),
            Case("--set value non-UTF-8 (real argv)", ["config", "--set", b"data.path=\xff"], ("--set",),
                 real_process=True)]
    return cases, raw


def special_flag_cases(ws: Workspace) -> list[Case]:
    """Values that are bad for one flag's meaning rather than its type."""
    tiny = str(ws.tiny_toml)
    grid = [("train.seed", ("--grid",)), ("train.seed=", ("--grid",)), ("nosuch.key=1,2", ("nosuch",)),
            ("model.dim=abc,32", ("model.dim",)), ("model.dim=4", ("model.dim",))]
    cases = [Case(f"sweep --grid {g!r}", ["sweep", "--config", tiny, "--out", str(ws.fresh("sweep")), "--grid", g],
                  names) for g, names in grid]
    cases.append(Case("sweep --grid given twice", ["sweep", "--config", tiny, "--out", str(ws.fresh("sweep")),
                                                   "--grid", "train.seed=0", "--grid", "train.seed=1"], ("--grid",)))
    for sub in ("train", "gradcheck", "sweep", "config"):
        extra = ["--grid", "train.seed=0", "--out", str(ws.fresh("sweep"))] if sub == "sweep" else []
        cases.append(Case(f"{sub} --preset unknown", [sub, "--preset", "nosuch", *extra], ("--preset",)))
        cases.append(Case(f"{sub} --set bad value", [sub, "--config", tiny, "--set", "model.dim=abc", *extra],
                          ("model.dim",)))
    cases += [Case("train --resume with --config", ["train", "--resume", str(ws.run), "--config", tiny], ("--resume",)),
              Case("train --resume with --run-dir", ["train", "--resume", str(ws.run), "--run-dir", str(ws.fresh("r"))],
                   ("--resume",)),
              Case("no subcommand", [], ("command",)), Case("unknown subcommand", ["bogus"], ("bogus",))]
    return cases


# ============================================================================ damaged run directories

def edit_state(ck: Path, fn: Callable[[dict], Any]) -> None:
    doc = json.loads((ck / "state.json").read_text())
    fn(doc)
    (ck / "state.json").write_text(json.dumps(doc))


def reseal(ck: Path, name: str) -> None:
    """Make the manifest match a replaced file, as a careful attacker (or a buggy tool) would."""
    data = (ck / name).read_bytes()
    edit_state(ck, lambda d: d["files"].__setitem__(name, {"bytes": len(data),
                                                           "sha256": hashlib.sha256(data).hexdigest()}))


def replace_sealed(ck: Path, name: str, data: bytes) -> None:
    (ck / name).write_bytes(data)
    reseal(ck, name)


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def latest(run: Path) -> Path:
    return ckpt.list_checkpoints(run)[-1]


@dataclass
class Damage:
    """One way to damage a run directory.

    ``refuse``: the commands that read the damaged part and must refuse; the others may also
    finish normally. ``names``: what the one-line error must name.
    """

    label: str
    apply: Callable[[Path, Path, Path], Any]   # (run, its latest checkpoint, a run of another size)
    names: tuple[str, ...]
    refuse: tuple[str, ...] = COMMANDS


def _drop(path: Sequence[str]) -> Callable[[dict], None]:
    def fn(doc: dict) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
    return fn


def state_key_damages(ws: Workspace) -> list[Damage]:
    """Every key of state.json (top level, each state and each key of a state, each manifest
    entry) removed in turn. Optional by design: hardware, progress.elapsed_s, progress.micro_batch
    (no out-of-memory fallback, as in checkpoints written before it), rng.cuda."""
    doc = json.loads((latest(ws.run) / "state.json").read_text())
    optional = {("hardware",), ("states", "progress", "elapsed_s"), ("states", "progress", "micro_batch"),
                ("states", "rng", "cuda")}
    paths = [(k,) for k in doc]
    paths += [("states", s) for s in doc["states"]]
    paths += [("states", s, k) for s, body in doc["states"].items() for k in body]
    paths += [("files", f) for f in doc["files"]]
    first_tensor = next(iter(doc["states"]["carry"]["tensors"]))
    paths.append(("states", "carry", "tensors", first_tensor))
    damages = []
    for p in paths:
        refuse = () if p in optional else ("train",) if p[0] == "states" else COMMANDS
        if p == ("files", "extra.safetensors"):
            refuse = ("train",)
        damages.append(Damage(f"state.json without {'.'.join(p)}", lambda r, ck, o, p=p: edit_state(ck, _drop(p)),
                              ("state.json", "extra.safetensors"), refuse))
    return damages


def _set(path: Sequence[str], value: Any) -> Callable[[dict], None]:
    def fn(doc: dict) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return fn


S, O, M, E = "state.json", "optimizer.pt", "model.safetensors", "extra.safetensors"
Apply = Callable[[Path, Path, Path], Any]   # (run, its latest checkpoint, a run of another size)


def _edit(path: Sequence[str], value: Any) -> Apply:
    return lambda r, ck, o: edit_state(ck, _set(path, value))


def _write(name: str, data: bytes) -> Apply:
    return lambda r, ck, o: (ck / name).write_bytes(data)


def _sealed(name: str, data: Callable[[Path, Path], bytes]) -> Apply:
    """Replace a file by ``data(checkpoint, other run)`` and reseal the manifest: only its content is wrong."""
    return lambda r, ck, o: replace_sealed(ck, name, data(ck, o))


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _into_dir(path: Path) -> None:
    """Replace a file by a directory of the same name."""
    path.unlink()
    path.mkdir()


def state_json_damages() -> list[Damage]:
    """state.json unreadable, of the wrong shape, or with values of the wrong kind."""
    train = ("train",)
    return [
        Damage("state.json garbage", _write(S, b"\x00garbage{"), (S,)),
        Damage("state.json truncated", lambda r, ck, o: truncate(ck / S), (S,)),
        Damage("state.json empty", _write(S, b""), (S,)),
        Damage("state.json a JSON list", _write(S, b"[]"), (S,)),
        Damage("state.json not UTF-8", _write(S, b'{"schema": "\xff"}'), (S,)),
        Damage("state.json a directory", lambda r, ck, o: _into_dir(ck / S), (S,)),
        Damage("state.json schema 99", _edit(["schema"], 99), (S,)),
        Damage("state.json schema 'two'", _edit(["schema"], "two"), (S,)),
        Damage("state.json step -1", _edit(["step"], -1), (S,)),
        Damage("state.json config a string", _edit(["config"], "x"), (S,)),
        Damage("state.json config with model.dim = 7", _edit(["config", "model", "dim"], 7), (S,)),
        Damage("state.json config of another model size (model.dim = 64)", _edit(["config", "model", "dim"], 64),
               (S, M)),
        Damage("state.json progress.step a string", _edit(["states", "progress", "step"], "4"), (S,), train),
        Damage("state.json sampler.position -5", _edit(["states", "sampler", "position"], -5), (S,), train),
        Damage("state.json carry structure malformed", _edit(["states", "carry", "structure"], {"bogus": 1}), (S,),
               train),
        Damage("state.json rng.torch names a missing tensor", _edit(["states", "rng", "torch"], {"__tensor__": "nope"}),
               (S,), train),
    ]


def part_damages() -> list[Damage]:
    """The other files of a checkpoint: truncated, garbage, flipped, missing, or another model's."""
    train = ("train",)
    other = lambda name: _sealed(name, lambda ck, o: (latest(o) / name).read_bytes())  # noqa: E731
    half = lambda name: lambda r, ck, o: truncate(ck / name)                            # noqa: E731
    half_sealed = lambda name: lambda r, ck, o: (truncate(ck / name), reseal(ck, name))  # noqa: E731
    return [
        Damage("optimizer.pt garbage, manifest resealed", _sealed(O, lambda ck, o: b"garbage" * 100), (O,)),
        Damage("optimizer.pt truncated", half(O), (O,)),
        Damage("optimizer.pt truncated, manifest resealed", half_sealed(O), (O,)),
        Damage("optimizer.pt a list, manifest resealed", _sealed(O, lambda ck, o: _torch_bytes([1, 2])), (O,)),
        Damage("optimizer.pt an empty dict, manifest resealed", _sealed(O, lambda ck, o: _torch_bytes({})), (O,),
               train),
        Damage("optimizer.pt of another model size, manifest resealed", other(O), (O,), train),
        Damage("model.safetensors truncated", half(M), (M,)),
        Damage("model.safetensors truncated, manifest resealed", half_sealed(M), (M,)),
        Damage("model.safetensors garbage, manifest resealed", _sealed(M, lambda ck, o: b"\x08" * 64), (M,)),
        Damage("model.safetensors one byte flipped", lambda r, ck, o: _flip(ck / M), (M,)),
        Damage("model.safetensors missing", lambda r, ck, o: (ck / M).unlink(), (M,)),
        Damage("model.safetensors of another model size, manifest resealed", other(M), (M,)),
        Damage("model and optimizer of another model size, manifest resealed",
               lambda r, ck, o: (other(M)(r, ck, o), other(O)(r, ck, o)), (M,)),
        Damage("extra.safetensors missing", lambda r, ck, o: (ck / E).unlink(), (E,)),
        Damage("extra.safetensors truncated, manifest resealed", half_sealed(E), (E,)),
        Damage("extra.safetensors of another model size, manifest resealed", other(E), (E, S), train),
    ]


def layout_damages() -> list[Damage]:
    """The run directory around the checkpoints: stray entries, missing or foreign checkpoints,
    and the files a resumed run appends to or rewrites (metrics.jsonl, config.toml)."""
    def foreign_latest(r: Path, ck: Path, o: Path) -> None:
        shutil.copytree(latest(o), ck.parent / "step_0000005")

    def checkpoints_a_file(r: Path, ck: Path, o: Path) -> None:
        shutil.rmtree(ck.parent)
        (r / "checkpoints").write_text("x")

    metrics = lambda data: lambda r, ck, o: (r / "metrics.jsonl").write_bytes(data)  # noqa: E731
    return [
        Damage("a file named like a checkpoint (checkpoints/step_0000099)",
               lambda r, ck, o: (ck.parent / "step_0000099").write_text("x"), ("step_0000099",), ()),
        Damage("an empty newer checkpoint directory", lambda r, ck, o: (ck.parent / "step_0000099").mkdir(),
               ("step_0000099",)),
        Damage("checkpoints/ is a file", checkpoints_a_file, ("checkpoints",)),
        Damage("checkpoints/ removed", lambda r, ck, o: shutil.rmtree(ck.parent), ("checkpoints",)),
        Damage("a complete checkpoint of another model size as the latest", foreign_latest, ("step_0000005",), ()),
        Damage("metrics.jsonl not UTF-8", metrics(b'{"step": 1}\n\xff\xfe\n'), ("metrics.jsonl",), ()),
        Damage("metrics.jsonl with a JSON list line", metrics(b"[1, 2]\n"), ("metrics.jsonl",), ()),
        Damage("metrics.jsonl a directory", lambda r, ck, o: _into_dir(r / "metrics.jsonl"), ("metrics.jsonl",), ()),
        Damage("config.toml a directory", lambda r, ck, o: _into_dir(r / "config.toml"), ("config.toml",), ()),
    ]


def load_commands(run: Path) -> dict[str, list[str]]:
    return {"eval": ["eval", "--run", str(run), "--batches", "1"],
            "generate": ["generate", "--run", str(run), "--max-bytes", "4"],
            "train": ["train", "--resume", str(run)]}


def damage_cases(ws: Workspace) -> list[Case]:
    """One copy of the trained run per damage; eval and generate first (they only read), then train."""
    cases = []
    for d in state_key_damages(ws) + state_json_damages() + part_damages() + layout_damages():
        run = ws.copy_run("damaged")
        d.apply(run, latest(run), ws.other)
        for cmd, argv in load_commands(run).items():
            cases.append(Case(f"{d.label} [{cmd}]", argv, d.names, may_succeed=cmd not in d.refuse))
    return cases


def inputs_rows(ws: Workspace, quick: bool) -> list[RowResult]:
    say("bad inputs: building cases")
    set_values, file_values = config_value_cases(ws, quick)
    set_structure, file_structure = config_structure_cases(ws)
    flags, raw = flag_cases(ws)
    groups = [("bad inputs: config --set", set_values + set_structure),
              ("bad inputs: config TOML file", file_values + file_structure),
              ("bad inputs: CLI flags", flags),
              ("bad inputs: non-UTF-8 argv (real process)", raw)]
    rows = []
    for name, cases in groups:
        say(f"{name}: {len(cases)} cases")
        rows.append(run_cases(name, cases, ws.root))
    cases = damage_cases(ws)
    say(f"bad inputs: damaged run directories: {len(cases)} cases")
    rows.append(run_cases("bad inputs: damaged run dirs", cases, ws.root))
    return rows


# ============================================================================ hostile files

class RunsCode:
    """Pickles to a call of ``fn(*args)``: what a loader that unpickles freely would execute."""

    def __init__(self, fn: Callable, *args: Any):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@dataclass
class Hostile:
    """A checkpoint file crafted to run code (creating ``marker``) if a loader executed it.
    ``readers``: the commands that read that file and must refuse; the others may ignore it."""

    label: str
    plant: Callable[[Path, Path], None]   # (latest checkpoint, marker)
    names: tuple[str, ...]
    readers: tuple[str, ...] = COMMANDS
    # positive control: load the same payload the unsafe way (pickle / torch.load(weights_only=False))
    # to show that it does run code, so that "no marker" means the loader refused, not a dud payload
    control: Callable[[Path], None] | None = None


def _carry_naming(target: str, fields: Callable[[Path], dict[str, Any]], nested: bool = False):
    def plant(ck: Path, marker: Path) -> None:
        def fn(doc: dict) -> None:
            layer = doc["states"]["carry"]["structure"]["list"][0]
            evil = {"dataclass": target, "fields": {k: {"value": v} for k, v in fields(marker).items()}}
            if nested:   # inside an allowed class: the loader must check every level
                layer["fields"]["memory"] = evil
            else:
                doc["states"]["carry"]["structure"]["list"][0] = evil
        edit_state(ck, fn)
    return plant


def _pickle_bytes(payload: Any, how: str) -> bytes:
    """An optimizer-state-looking dict carrying ``payload``: torch's zip format, its legacy format,
    or a bare pickle."""
    obj = {"version": 2, "components": {}, "payload": payload}
    if how == "pickle":
        return pickle.dumps(obj, protocol=2)
    buf = io.BytesIO()
    torch.save(obj, buf, _use_new_zipfile_serialization=how == "torch")
    return buf.getvalue()


def _unsafe_load(data: bytes, how: str) -> None:
    """What a careless loader does (used only on the positive controls)."""
    try:
        if how == "pickle":
            pickle.loads(data)  # noqa: S301 - deliberately unsafe: the control must fire
        else:
            torch.load(io.BytesIO(data), weights_only=False)
    except Exception:  # noqa: BLE001 - the payload ran (or not) before anything else could fail
        pass


def _pickled(payload: Callable[[Path], Any], how: str, name: str) -> dict[str, Callable]:
    """``plant`` and ``control`` keyword arguments of a :class:`Hostile` for a pickle in ``name``."""
    def plant(ck: Path, marker: Path) -> None:
        replace_sealed(ck, name, _pickle_bytes(payload(marker), how))

    def control(marker: Path) -> None:
        _unsafe_load(_pickle_bytes(payload(marker), how), how)
    return {"plant": plant, "control": control}


def hostile_files() -> list[Hostile]:
    touch = lambda m: RunsCode(os.system, f"touch {m}")                            # noqa: E731
    execs = lambda m: RunsCode(exec, f"open({str(m)!r}, 'w').close()")          # noqa: E731
    spawn = lambda m: RunsCode(subprocess.run, ["touch", str(m)])                # noqa: E731
    cases = [Hostile(f"state.json carry names {target}", _carry_naming(target, fields), ("state.json",), ("train",))
             for target, fields in (("os:system", lambda m: {"command": f"touch {m}"}),
                                    ("builtins:eval", lambda m: {"source": f"open({str(m)!r}, 'w')"}),
                                    ("subprocess:run", lambda m: {"args": f"touch {m}", "shell": True}),
                                    ("posix.system", lambda m: {"command": f"touch {m}"}))]
    cases.append(Hostile("state.json carry names os:system inside a MemoryMixerState",
                         _carry_naming("os:system", lambda m: {"command": f"touch {m}"}, nested=True),
                         ("state.json",), ("train",)))
    cases.append(Hostile("state.json carry names neatlm.train.state_io:os.system (legacy form)",
                         _carry_naming("neatlm.train.state_io:os.system", lambda m: {"command": f"touch {m}"}),
                         ("state.json",), ("train",)))
    for fn_name, payload in (("os.system", touch), ("builtins.exec", execs), ("subprocess.run", spawn)):
        for how in ("torch", "torch-legacy", "pickle"):
            cases.append(Hostile(f"optimizer.pt {how} pickle calling {fn_name}, manifest resealed",
                                 names=("optimizer.pt",), **_pickled(payload, how, "optimizer.pt")))
    for name in ("model.safetensors", "extra.safetensors"):
        for how in ("torch", "pickle"):
            cases.append(Hostile(f"{name} replaced by a {how} pickle calling os.system, manifest resealed",
                                 names=(name,), **_pickled(touch, how, name)))

    def evil_component(ck: Path, marker: Path) -> None:
        edit_state(ck, _set(["config", "components"], {"main": {"optimizer": "os:system"}}))

    def shell_path(ck: Path, marker: Path) -> None:
        edit_state(ck, _set(["config", "data", "path"], f"$(touch {marker})"))

    def metrics_pickle(ck: Path, marker: Path) -> None:
        (ck.parent.parent / "metrics.jsonl").write_bytes(pickle.dumps(touch(marker)))

    cases += [Hostile("state.json config naming os:system as a component optimizer", evil_component, ("state.json",)),
              Hostile("state.json config with data.path '$(touch marker)'", shell_path, ("data.path", "touch"),
                      ("train", "eval")),
              Hostile("metrics.jsonl holding a pickle calling os.system", metrics_pickle, ("metrics.jsonl",), (),
                      control=lambda m: _unsafe_load(pickle.dumps(touch(m)), "pickle"))]
    return cases


def hostile_row(ws: Workspace) -> RowResult:
    cases = hostile_files()
    say(f"hostile files: {len(cases)} crafted checkpoints x {len(COMMANDS)} commands")
    markers_made, clean, tried, failures = 0, 0, 0, []
    live = dud = 0
    with working_dir(ws.root):
        for h in cases:
            if h.control is not None:
                marker = ws.fresh("control")
                h.control(marker)
                live, dud = live + marker.exists(), dud + (not marker.exists())
                if not marker.exists():
                    failures.append(f"{h.label}: (harness) the payload does not run code even when loaded unsafely")
            for cmd in COMMANDS:
                run = ws.copy_run("hostile")
                marker = ws.fresh("marker")
                h.plant(latest(run), marker)
                argv = load_commands(run)[cmd]
                o = neat(argv)
                tried += 1
                why = why_not_clean(o, h.names, may_succeed=cmd not in h.readers)
                if marker.exists():
                    markers_made += 1
                    why = f"CODE RAN (marker created); {why or 'exit ' + str(o.code)}"
                if why:
                    failures.append(f"{h.label} [{cmd}]: `{show(argv)}` -> {why}")
                else:
                    clean += 1
    result = (f"{markers_made} markers created (code executed); {clean}/{tried} ended cleanly; "
              f"{live}/{live + dud} pickle payloads shown live by an unsafe load")
    return RowResult("hostile files", tried, result, not failures, failures)


# ============================================================================ kills

KILL_STEPS, KILL_SAVE_EVERY = 30, 3


def kill_toml(ws: Workspace, reset: str) -> Path:
    tables = tiny_settings(ws.corpus, memory__reset=reset, train__steps=KILL_STEPS,
                           train__save_every=KILL_SAVE_EVERY, train__precision="auto", train__log_every=5,
                           train__warmup_steps=5)
    path = ws.root / f"kill-{reset}.toml"
    path.write_text(toml_text(tables))
    return path


class Watcher:
    """Polls RUN/checkpoints while a training process runs: which ``step_*`` directories appeared
    (each is complete: checkpoints are renamed into place) and which temporary save directories."""

    def __init__(self, run: Path):
        self.root = ckpt.checkpoint_root(run)
        self.steps: set[int] = set()
        self.tmps: list[str] = []

    def poll(self) -> None:
        try:
            names = os.listdir(self.root)
        except (FileNotFoundError, NotADirectoryError):
            return
        for n in names:
            if n.startswith("step_"):
                self.steps.add(int(n[5:]))
            elif n.startswith(".tmp-step_") and n not in self.tmps:
                self.tmps.append(n)


def start_training(argv: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen([sys.executable, "-m", "neatlm", *argv], stdout=f, stderr=subprocess.STDOUT,
                                env=SUBPROCESS_ENV)


@dataclass
class Reference:
    """An uninterrupted run, and when its first and last checkpoints appeared (seconds from start)."""

    run: Path
    first: float
    last: float


def reference_run(ws: Workspace, reset: str) -> Reference:
    run = ws.root / f"reference-{reset}"
    log = ws.root / f"reference-{reset}.log"
    start = time.perf_counter()
    proc = start_training(["train", "--config", str(kill_toml(ws, reset)), "--run-dir", str(run)], log)
    watch, first, last = Watcher(run), None, None
    while proc.poll() is None:
        watch.poll()
        if first is None and watch.steps:
            first = time.perf_counter() - start
        if last is None and KILL_STEPS in watch.steps:
            last = time.perf_counter() - start
        time.sleep(0.005)
    if proc.returncode != 0 or first is None:
        raise RuntimeError(f"the reference run failed (exit {proc.returncode}); see {log}: "
                           + _last_line(log.read_text(errors="replace")))
    return Reference(run, first, last if last is not None else time.perf_counter() - start)


def model_bytes(path: Path) -> dict[str, bytes]:
    return {k: t.contiguous().view(torch.uint8).numpy().tobytes() + str(t.dtype).encode() + str(tuple(t.shape)).encode()
            for k, t in load_file(str(path)).items()}


@dataclass
class KillOutcome:
    killed: bool
    in_write: bool
    mid_run: bool        # the kill came before the run's final checkpoint (there was training left to resume)
    lost: str | None
    exact: bool
    problems: list[str]
    notes: list[str]


@dataclass
class KillPlan:
    """One killed run: its memory reset mode and when the kill comes, drawn from the seeded RNG."""

    index: int
    reset: str
    mode: str        # "time": a random delay after the first checkpoint; "write": inside a checkpoint write
    target: int      # mode "write": kill when the target-th checkpoint's temporary directory appears
    delay: float     # mode "time": seconds after the first checkpoint

    def describe(self) -> str:
        when = f"inside checkpoint write #{self.target}" if self.mode == "write" else \
            f"{self.delay:.2f} s after the first checkpoint"
        return f"kill run {self.index} (memory.reset={self.reset}, killed {when})"


def kill_plan(i: int, rng: random.Random, ref: Reference) -> KillPlan:
    """Half the runs carry memory state across steps, half are killed inside a checkpoint write;
    the others at a random time between the reference run's first and last checkpoints."""
    reset = "never" if i % 2 else "sequence"
    mode = "write" if i % 4 in (1, 2) else "time"
    target = rng.randint(2, KILL_STEPS // KILL_SAVE_EVERY - 1)
    delay = rng.uniform(0.0, max(ref.last - ref.first, 0.1))
    return KillPlan(i, reset, mode, target, delay)


def run_until_kill(plan: KillPlan, proc: subprocess.Popen, watch: Watcher) -> bool:
    """Poll the run's checkpoints until the planned moment, then SIGKILL it; False if it finished first."""
    deadline = None
    while proc.poll() is None:
        watch.poll()
        if plan.mode == "write" and len(watch.tmps) >= plan.target:
            break
        if plan.mode == "time":
            if deadline is None and watch.steps:
                deadline = time.perf_counter() + plan.delay
            if deadline is not None and time.perf_counter() >= deadline:
                break
        time.sleep(0.0005 if plan.mode == "write" else 0.005)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    watch.poll()
    return killed


def kill_and_resume(ws: Workspace, plan: KillPlan, ref_run: Path) -> KillOutcome:
    """Start a run, SIGKILL it as planned, audit what is on disk, resume it to the end and compare
    the final weights with the uninterrupted reference run's, bit for bit."""
    run = ws.root / f"killed-{plan.index}"
    proc = start_training(["train", "--config", str(kill_toml(ws, plan.reset)), "--run-dir", str(run)],
                          ws.root / f"killed-{plan.index}.log")
    watch = Watcher(run)
    killed = run_until_kill(plan, proc, watch)
    what = plan.describe()
    problems: list[str] = [] if killed else [f"{what}: finished (exit {proc.returncode}) before the kill"]
    root = ckpt.checkpoint_root(run)
    in_write = killed and root.is_dir() and any(n.startswith(".tmp-step_") for n in os.listdir(root))
    notes: list[str] = []
    lost = audit_after_kill(run, watch, problems, notes, what)
    left = ckpt.list_checkpoints(run)
    mid_run = killed and not (left and left[-1].name == f"step_{KILL_STEPS:07d}")
    say(f"kills: run {plan.index} killed={killed}, inside a write={in_write}, latest checkpoint left "
        f"{left[-1].name if left else None}; resuming")
    resume = ["train", "--resume", str(run)]
    resumed = neat_process(resume, timeout=600) if left else Outcome(None, "", "", "no checkpoint to resume from")
    if resumed.code != 0:
        problems.append(f"{what}: `{show(resume)}` -> exit {resumed.code}: {resumed.exc or _last_line(resumed.err)}")
        return KillOutcome(killed, in_write, mid_run, lost, False, problems, notes)
    final = Path("checkpoints") / f"step_{KILL_STEPS:07d}"
    ref, got = model_bytes(ref_run / final / "model.safetensors"), model_bytes(run / final / "model.safetensors")
    if ref != got:
        differ = [k for k in ref if ref.get(k) != got.get(k)]
        hardware = [json.loads((r / final / "state.json").read_text()).get("hardware") for r in (ref_run, run)]
        problems.append(f"{what}: final weights differ from the uninterrupted run in {len(differ)} of {len(ref)} "
                        f"tensors (first {differ[:1]}); hardware: reference {hardware[0]}, resumed {hardware[1]}")
    return KillOutcome(killed, in_write, mid_run, lost, ref == got, problems, notes)


def audit_after_kill(run: Path, watch: Watcher, problems: list[str], notes: list[str], what: str) -> str | None:
    """Lost checkpoint: the latest ``step_*`` fails to read, or is older than one seen complete.
    An older ``step_*`` that fails to read (a kill while rotation deleted it) is noted, not counted."""
    found = ckpt.list_checkpoints(run)
    newest_seen = max(watch.steps, default=None)
    lost = None
    if not found:
        lost = "no checkpoint left" + (f" (step {newest_seen} had been complete)" if newest_seen else "")
    else:
        try:
            ckpt.read_checkpoint(found[-1])
        except NeatError as exc:
            lost = f"the latest checkpoint {found[-1].name} does not read: {exc}"
        step = int(found[-1].name[5:])
        if lost is None and newest_seen is not None and step < newest_seen:
            lost = f"step {newest_seen} had been complete, the latest left is step {step}"
        for older in found[:-1]:
            try:
                ckpt.read_checkpoint(older)
            except NeatError as exc:
                notes.append(f"{what}: an older checkpoint left behind does not read (killed while keep_last "
                             f"deleted it?): {exc}")
    if lost:
        problems.append(f"{what}: LOST CHECKPOINT: {lost}")
    return lost


def kills_row(ws: Workspace, kills: int, seed: int) -> RowResult:
    rng = random.Random(seed)
    refs = {}
    for reset in ("sequence", "never"):
        say(f"kills: reference run, memory.reset={reset}")
        refs[reset] = reference_run(ws, reset)
    outcomes, problems, notes = [], [], []
    for i in range(kills):
        ref = refs["never" if i % 2 else "sequence"]
        plan = kill_plan(i, rng, ref)
        say(f"kills: {i + 1}/{kills}: {plan.describe()}")
        out = kill_and_resume(ws, plan, ref.run)
        outcomes.append(out)
        problems += out.problems
        notes += out.notes
    killed = sum(o.killed for o in outcomes)
    exact = sum(o.exact for o in outcomes)
    lost = sum(o.lost is not None for o in outcomes)
    in_write = sum(o.in_write for o in outcomes)
    mid_run = sum(o.mid_run for o in outcomes)
    result = (f"{killed} killed ({mid_run} before the final checkpoint, {in_write} inside a checkpoint write); "
              f"{exact}/{kills} resumes bit-exact; {lost} lost checkpoints")
    return RowResult("kills", kills, result, killed == kills and exact == kills and lost == 0, problems, notes)


# ============================================================================ NaN injections

@dataclass
class Injection:
    """Faults injected into an in-process run. Steps count from 1, as the trainer's do."""

    label: str
    sets: dict[str, Any] = field(default_factory=dict)            # config changes (section__key)
    grad: dict[int, float] = field(default_factory=dict)          # step -> value of one parameter's gradient
    forward: dict[int, str] = field(default_factory=dict)         # step -> module whose output turns NaN
    expect_diverged: bool = False


def injections() -> list[Injection]:
    nan, inf = math.nan, math.inf
    return [
        Injection("NaN gradient at step 4", grad={4: nan}),
        Injection("inf gradient at step 6", grad={6: inf}),
        Injection("-inf gradients at steps 3 and 4", grad={3: -inf, 4: -inf}),
        Injection("NaN gradient at step 7, guard.backup_every = 2", {"guard__backup_every": 2}, grad={7: nan}),
        Injection("NaN gradients at steps 3, 4, 5 (guard.max_failures in a row)", grad={3: nan, 4: nan, 5: nan},
                  expect_diverged=True),
        Injection("NaN gradient at step 5, memory.reset = never", {"memory__reset": "never"}, grad={5: nan}),
        Injection("NaN logits at step 5", forward={5: "norm"}),
        Injection("NaN mixer output in block 0 at step 5", forward={5: "blocks.0.mixer"}),
        Injection("NaN mixer output in block 0 at step 5, memory.reset = never", {"memory__reset": "never"},
                  forward={5: "blocks.0.mixer"}),
        Injection("train.lr = 1e30, train.grad_clip = 0", {"train__lr": 1e30, "train__grad_clip": 0.0},
                  expect_diverged=True),
    ]


def state_hash(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(k.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def walk_tensors(obj: Any, path: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from walk_tensors(v, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from walk_tensors(v, f"{path}/{i}")


def arm(trainer: Trainer, inj: Injection, fired: set[int]) -> None:
    """Register the injection's hooks; each fires only during its steps (``trainer.step + 1``) and
    records the step in ``fired`` (an injection that never fired tested nothing)."""
    model = trainer.model
    params = dict(model.named_parameters())
    # the memory's query projection: on the read path, so it has a gradient at every step
    target = next((n for n in params if n.endswith("memory.to_q.weight")), next(iter(params)))

    def grad_hook(g: torch.Tensor) -> torch.Tensor:
        step = trainer.step + 1
        if step not in inj.grad:
            return g
        fired.add(step)
        return torch.full_like(g, inj.grad[step])

    if inj.grad:
        params[target].register_hook(grad_hook)
    modules = dict(model.named_modules())
    for step, path in inj.forward.items():
        def forward_hook(m: torch.nn.Module, args: Any, output: Any, step: int = step) -> Any:
            if trainer.step + 1 != step or not m.training:
                return output
            fired.add(step)
            return (output[0] * math.nan, *output[1:]) if isinstance(output, tuple) else output * math.nan
        modules[path].register_forward_hook(forward_hook)


@dataclass
class Trace:
    """What the run did, step by step: the model state's hash after each step, and which steps the
    guard rejected."""

    accepted: set[str] = field(default_factory=set)
    after: dict[int, str] = field(default_factory=dict)
    rejected: set[int] = field(default_factory=set)


def traced(trainer: Trainer, trace: Trace) -> None:
    """Wrap ``trainer.train_step`` to record every step's verdict and resulting weights."""
    step_fn = trainer.train_step
    trace.accepted.add(state_hash(trainer.model.state_dict()))

    def wrapped(log: bool | None = None):
        try:
            loss, stats = step_fn(log=log)
        except TrainingDiverged:
            trace.rejected.add(trainer.step + 1)
            raise
        h = state_hash(trainer.model.state_dict())
        trace.after[trainer.step] = h
        if any(k.endswith("/rejected") and v for k, v in stats.items()):
            trace.rejected.add(trainer.step)
        else:
            trace.accepted.add(h)
        return loss, stats

    trainer.train_step = wrapped


def checkpoint_problems(path: Path, trace: Trace) -> list[tuple[str, str]]:
    """What is wrong with one checkpoint, as (kind, text): "weights" (non-finite, or not those of
    an accepted step, or not those the trainer held after the checkpoint's step), "state" (a
    non-finite optimizer or carried-state tensor) or "unreadable"."""
    try:
        c = ckpt.read_checkpoint(path)
    except NeatError as exc:
        return [("unreadable", f"does not read: {exc}")]
    problems = []
    parts = (("weights", "model", c.states["model"]), ("state", "optimizer", c.states["optimizer"]),
             ("state", "carried state (extra.safetensors)", c.extra))
    for kind, part, tensors in parts:
        bad = [k for k, t in walk_tensors(tensors) if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            problems.append((kind, f"{len(bad)} non-finite {part} tensors (e.g. {bad[0].lstrip('/')})"))
    h = state_hash(c.states["model"])
    if h not in trace.accepted:
        problems.append(("weights", f"weights of no accepted step (rejected steps: {sorted(trace.rejected)})"))
    elif trace.after.get(c.step) != h:
        problems.append(("weights", f"weights differ from the model's after step {c.step}"))
    return problems


@dataclass
class InjectionResult:
    written: int          # checkpoints
    bad: dict[str, int]   # checkpoints with a problem of each kind (weights, state, unreadable)
    problems: list[str]
    ended: str            # "finished", "TrainingDiverged at step N: ...", "raised ..."


def run_injection(ws: Workspace, inj: Injection) -> InjectionResult:
    """Train with the injection armed, then audit the run and every checkpoint it wrote."""
    run = ws.fresh("nan")
    tables = tiny_settings(ws.corpus, train__steps=10, train__save_every=1, train__keep_last=100, **inj.sets)
    trainer = Trainer(config_of(tables, run))
    trace = Trace()
    traced(trainer, trace)
    fired: set[int] = set()
    arm(trainer, inj, fired)
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):   # guard warnings, validation lines
        try:
            trainer.train()
            ended = "finished"
        except TrainingDiverged as exc:
            ended = f"TrainingDiverged at step {trainer.step + 1}: {_first_line(str(exc), 120)}"
        except Exception as exc:  # noqa: BLE001 - reported, never hidden
            ended = f"raised {type(exc).__name__}: {_first_line(str(exc))}"
    problems, found, bad = [], ckpt.list_checkpoints(run), {"weights": 0, "state": 0, "unreadable": 0}
    for path in found:
        wrong = checkpoint_problems(path, trace)
        for kind in {k for k, _ in wrong}:
            bad[kind] += 1
        problems += [f"checkpoint {path.name}: {text}" for _, text in wrong]
    diverged = ended.startswith("TrainingDiverged")
    if diverged != inj.expect_diverged:
        want = "stop with TrainingDiverged" if inj.expect_diverged else "recover and finish"
        problems.append(f"expected the run to {want}; it {ended}")
    reached = {s for s in set(inj.grad) | set(inj.forward) if s <= trainer.step + 1}
    if reached - fired:
        problems.append(f"(harness) the injection did not fire at steps {sorted(reached - fired)}")
    missed = sorted(s for s in fired if s not in trace.rejected)
    if missed:
        problems.append(f"the guard accepted the faulty steps {missed}")
    undone = [s for s in trace.rejected if s in trace.after and trace.after[s] not in trace.accepted]
    if undone:
        problems.append(f"after rejected steps {undone} the model holds weights of no accepted step")
    return InjectionResult(len(found), bad, [f"{inj.label}: {p}" for p in problems], ended)


def nan_row(ws: Workspace) -> RowResult:
    cases = injections()
    written, failures, lr_run = 0, [], "not run"
    bad = {"weights": 0, "state": 0, "unreadable": 0}
    for inj in cases:
        say(f"NaN injections: {inj.label}")
        r = run_injection(ws, inj)
        written, failures = written + r.written, failures + r.problems
        bad = {k: bad[k] + r.bad[k] for k in bad}
        if inj.sets.get("train__lr") == 1e30:
            lr_run = "yes" if r.ended.startswith("TrainingDiverged") else f"no ({r.ended})"
    result = (f"bad checkpoints written (of {written}): {bad['weights']} with non-finite or rejected weights, "
              f"{bad['state']} with non-finite optimizer/carried state, {bad['unreadable']} unreadable; "
              f"lr=1e30 run stopped with TrainingDiverged: {lr_run}")
    return RowResult("NaN injections", len(cases), result, not failures, failures)


# ============================================================================ table

def table(rows: list[RowResult]) -> str:
    header = ("row", "tried", "result")
    body = [(r.row, str(r.tried), ("OK   " if r.perfect else "FAIL ") + r.result) for r in rows]
    widths = [max(len(x[i]) for x in [header, *body]) for i in range(3)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=None, help="killed runs (default 8, 2 with --quick)")
    ap.add_argument("--quick", action="store_true", help="one bad value per kind and key, 2 kills")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory (its path is printed)")
    args = ap.parse_args(argv)
    kills = args.kills if args.kills is not None else (2 if args.quick else 8)
    chosen = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in chosen if r not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown {unknown} (choose from {', '.join(ROWS)})")
    torch.set_num_threads(1)
    start = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="neat-faults-"))
    try:
        say(f"scratch directory {scratch}; training the runs the cases damage")
        ws = make_workspace(scratch)
        rows: list[RowResult] = []
        if "inputs" in chosen:
            rows += inputs_rows(ws, args.quick)
        if "kills" in chosen:
            rows.append(kills_row(ws, kills, args.seed))
        if "hostile" in chosen:
            rows.append(hostile_row(ws))
        if "nan" in chosen:
            rows.append(nan_row(ws))
    finally:
        if args.keep:
            say(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    print(table(rows))
    left_out = [r for r in ROWS if r not in chosen]
    if left_out:
        print(f"\nnot run (--rows): {', '.join(left_out)}")
    if args.quick:
        print("\n--quick: one bad config value of each kind per key (not every variant); "
              f"{kills} kills unless --kills")
    print(f"\n{len(rows)} rows in {time.perf_counter() - start:.0f} s; "
          f"{sum(r.perfect for r in rows)}/{len(rows)} perfect")
    for r in rows:
        for heading, items in ((f"{len(r.failures)} failing cases", r.failures), ("notes", r.notes)):
            if items:
                print(f"\n{r.row}: {heading}")
                print("\n".join(f"  - {item}" for item in items))
    return 0 if all(r.perfect for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
