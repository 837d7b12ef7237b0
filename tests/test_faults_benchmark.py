"""The fault benchmark (benchmarks/faults.py) measures what it claims: its cases cover every config
key, its verdicts tell a clean refusal from a crash, its hostile payloads are live, its injections
fire, and it prints its table. A tiny version of each part, not the benchmark itself (minutes)."""

from __future__ import annotations

import dataclasses
import sys
import typing
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import faults  # noqa: E402
from neatlm.config import Config  # noqa: E402


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> faults.Workspace:
    return faults.make_workspace(tmp_path_factory.mktemp("faults"))


def test_every_config_key_gets_bad_values_both_ways(ws):
    by_set, by_file = faults.config_value_cases(ws, quick=True)
    hints = typing.get_type_hints(Config)
    keys = {f"{f.name}.{k.name}" for f in dataclasses.fields(Config) if dataclasses.is_dataclass(hints[f.name])
            for k in dataclasses.fields(hints[f.name]) if k.init}
    in_files = {c.names[0] for c in by_file}
    assert keys <= in_files
    assert "components.main.betas" in in_files
    # a --set value is text: only free-form string keys have no bad value on the command line
    free_text = ("data.path", "data.extensions", "train.run_dir", "train.init_from", "adapt.patterns",
                 "blt.entropy_run", "mvot.vq_run")
    assert {c.names[0] for c in by_set} >= {k for k in keys if k not in free_text}


def test_verdicts_tell_a_clean_refusal_from_anything_else():
    clean = faults.Outcome(2, "", "neat: error: model.dim = 7: must be >= 8\n")
    assert faults.why_not_clean(clean, ("model.dim",)) is None
    assert "names none" in faults.why_not_clean(clean, ("model.heads",))
    assert "exit 0" in faults.why_not_clean(faults.Outcome(0, "", ""), ("x",))
    assert faults.why_not_clean(faults.Outcome(0, "", ""), ("x",), may_succeed=True) is None
    assert "2 stderr lines" in faults.why_not_clean(faults.Outcome(2, "", "a x\nb x\n"), ("x",))
    crash = faults.Outcome(2, "", "Traceback (most recent call last):\n x\n")
    assert "traceback" in faults.why_not_clean(crash, ("x",))
    assert "raised" in faults.why_not_clean(faults.Outcome(None, "", "", "KeyError: 'x'"), ("x",))


def test_cases_run_in_process_and_count(ws):
    cases = [faults.Case("bad dim", ["config", "--set", "model.dim=7"], ("model.dim",)),
             faults.Case("not bad at all", ["presets"], ("presets",))]
    row = faults.run_cases("demo", cases, ws.root)
    assert (row.tried, row.perfect) == (2, False)
    assert len(row.failures) == 1 and "not bad at all" in row.failures[0] and "exit 0" in row.failures[0]


def test_hostile_payloads_are_live_and_refused(ws):
    h = next(c for c in faults.hostile_files() if c.label.startswith("optimizer.pt torch pickle calling os.system"))
    control = ws.fresh("control")
    h.control(control)
    assert control.exists()   # loaded unsafely, the payload runs
    run, marker = ws.copy_run("hostile"), ws.fresh("marker")
    h.plant(faults.latest(run), marker)
    outcome = faults.neat(faults.load_commands(run)["eval"])
    assert faults.why_not_clean(outcome, h.names) is None and not marker.exists()


def test_an_injection_fires_and_its_checkpoints_are_audited(ws):
    r = faults.run_injection(ws, faults.Injection("NaN gradient at step 3", grad={3: float("nan")}))
    assert r.written == 10 and r.ended == "finished"
    assert not [p for p in r.problems if "(harness)" in p]


def test_table_marks_each_row():
    text = faults.table([faults.RowResult("a", 3, "3/3 fine", True), faults.RowResult("b", 1, "0/1 fine", False)])
    lines = text.splitlines()
    assert lines[0].startswith("| row") and "OK   3/3 fine" in lines[2] and "FAIL 0/1 fine" in lines[3]


def test_fuzz_every_config_key_is_refused_cleanly(ws):
    """The config fuzz itself: a bad value for every key, by --set and by TOML file, exits 2 with
    one line naming the key and no traceback."""
    by_set, by_file = faults.config_value_cases(ws, quick=True)
    for name, cases in (("--set", by_set), ("TOML", by_file)):
        row = faults.run_cases(name, cases, ws.root)
        assert row.perfect, "\n".join(row.failures[:5])
