"""Autotuning of semantics-free knobs: candidates, the choice rule, the cache, and the trainer's
use and record of it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import neatlm.autotune as autotune
from conftest import small_config
from neatlm.autotune import DEFAULT, Tuning, cached_or_tuned, choose, label, thread_candidates
from neatlm.train.trainer import Trainer


def test_thread_candidates():
    assert thread_candidates(1) == [1]
    assert thread_candidates(2) == [1, 2]
    assert thread_candidates(6) == [1, 2, 4, 6]
    assert thread_candidates(16) == [1, 2, 4, 8, 16]


def test_a_candidate_must_beat_the_defaults_by_ten_percent():
    candidates = [(1, DEFAULT), (2, DEFAULT), (2, "math")]
    default = (2, DEFAULT)
    near = {label(1, DEFAULT): 0.93, label(2, DEFAULT): 1.0, label(2, "math"): 1.2}
    assert (choose(near, candidates, default).threads, choose(near, candidates, default).attention) == default
    assert "the best other, threads=1 attention=default, took 0.93x their time" in choose(
        near, candidates, default).describe()
    far = {**near, label(2, "math"): 0.8}
    chosen = choose(far, candidates, default)
    assert (chosen.threads, chosen.attention) == (2, "math") and chosen.baseline == label(*default)
    assert "+25% faster than the defaults" in chosen.describe()


def test_a_one_core_machine_tunes_only_the_attention(monkeypatch):
    monkeypatch.setattr(autotune, "cpu_cores", lambda: 1)
    monkeypatch.setattr(autotune, "sdpa_backends", lambda device: {"math": True, "flash": False})
    seen = []
    monkeypatch.setattr(autotune, "measure", lambda step, candidates, rounds=3: (
        seen.extend(candidates) or {label(*c): 1.0 for c in candidates}))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        autotune.tune(lambda: None, torch.device("cpu"), tune_threads=True)
    finally:
        torch.set_num_threads(before)
    assert seen == [(1, DEFAULT), (1, "math")]


def test_measure_restores_the_thread_count():
    before = torch.get_num_threads()
    timings = autotune.measure(lambda: None, [(1, DEFAULT), (2, "math")], rounds=1)
    assert torch.get_num_threads() == before and set(timings) == {label(1, DEFAULT), label(2, "math")}


def test_the_cache_is_reused_and_a_bad_file_is_measured_again(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(autotune, "tune", lambda step, device, tune_threads: (
        calls.append(1) or Tuning(1, DEFAULT, {label(1, DEFAULT): 1.0}, label(1, DEFAULT))))
    first, cached = cached_or_tuned(lambda: None, torch.device("cpu"), True, "k", directory=tmp_path)
    assert not cached and len(calls) == 1
    again, cached = cached_or_tuned(lambda: None, torch.device("cpu"), True, "k", directory=tmp_path)
    assert cached and again == first and len(calls) == 1
    (tmp_path / "autotune-k.json").write_text('{"threads": -3}')
    _, cached = cached_or_tuned(lambda: None, torch.device("cpu"), True, "k", directory=tmp_path)
    assert not cached and len(calls) == 2


def test_bad_tunings_are_refused():
    for data in ({"threads": 0, "attention": DEFAULT}, {"threads": 1, "attention": "warp"}, {"attention": "math"}):
        with pytest.raises((ValueError, KeyError)):
            Tuning.from_dict(data)


def test_the_trainer_applies_records_and_reuses_its_tuning(corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cfg = small_config(corpus_dir, tmp_path / "run", steps=2, save_every=2)
    cfg.train.autotune = True
    before = torch.get_num_threads()
    try:
        trainer = Trainer(cfg)
        assert trainer.tuning is not None and torch.get_num_threads() == trainer.tuning.threads
        assert len(trainer.tuning.timings) >= 2
        trainer.train()
        state = json.loads(next((tmp_path / "run" / "checkpoints").glob("step_*/state.json")).read_text())
        assert state["hardware"]["autotune"]["threads"] == trainer.tuning.threads
        monkeypatch.setattr(autotune, "tune", lambda *a, **k: pytest.fail("a resumed run measured again"))
        resumed = Trainer.resume(tmp_path / "run", ["train.steps=3"])
        assert resumed.tuning == trainer.tuning
        assert list(Path(tmp_path / "cache" / "neatlm").glob("autotune-*.json"))
    finally:
        torch.set_num_threads(before)


def test_mps_fallback_is_on_for_macs_before_torch_loads():
    import subprocess
    import sys

    from neatlm.cli import enable_mps_fallback
    env: dict[str, str] = {}
    enable_mps_fallback("darwin", env)
    assert env == {"PYTORCH_ENABLE_MPS_FALLBACK": "1"}
    kept = {"PYTORCH_ENABLE_MPS_FALLBACK": "0"}
    enable_mps_fallback("darwin", kept)
    assert kept["PYTORCH_ENABLE_MPS_FALLBACK"] == "0"          # the user's choice stays
    linux: dict[str, str] = {}
    enable_mps_fallback("linux", linux)
    assert linux == {}
    # importing the command line must not load torch, or the variable would come too late
    out = subprocess.run([sys.executable, "-c", "import sys, neatlm.cli; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_forced_backend_falls_back_to_math_where_it_cannot_run():
    from neatlm.nn.attention import CausalSelfAttention
    attention = CausalSelfAttention(32, 2, window=4)
    x = torch.randn(1, 20, 32)                      # a banded window: an explicit mask, which flash refuses
    with torch.no_grad():
        reference, _ = attention(x)
        for name in ("flash", "math"):
            with Tuning(1, name).kernels():
                y, _ = attention(x)
            assert torch.allclose(y, reference, atol=1e-5)


def test_a_candidate_that_fails_is_never_chosen():
    def step():
        if torch.get_num_threads() == 1:
            raise RuntimeError("No available kernel")
    timings = autotune.measure(step, [(1, DEFAULT), (2, DEFAULT)], rounds=1)
    assert timings[label(1, DEFAULT)] == float("inf")
    assert choose(timings, [(1, DEFAULT), (2, DEFAULT)], (2, DEFAULT)).threads == 2
