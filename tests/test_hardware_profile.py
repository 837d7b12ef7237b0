"""Hardware-aware execution: the precision choice against simulated machines, the real probe, the
``neat hw`` profile and its cache, training every component under CPU bf16 autocast, and what
``neat generate`` reports."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import pytest
import torch

from conftest import small_config, write_corpus
from neatlm import hardware, hw_profile
from neatlm.cli import main
from neatlm.config import apply_overrides, validate
from neatlm.hardware import ProbeShape, detect, fastest_precision
from neatlm.hw_profile import DeviceProfile, MachineProfile
from neatlm.nn.memory import NeuralMemory
from neatlm.nn.model import NeatLM, decoding_mode, generate
from neatlm.train.trainer import Trainer, probe_shape

# ------------------------------------------------------------------ precision against simulated machines


def simulate(monkeypatch, timings: dict[str, float], cuda: bool = False, bf16_gpu: bool = True) -> list:
    """The probe returns ``timings`` (seconds per step) for what it is asked; the calls are recorded."""
    calls = []

    def probe(device, shape, precisions):
        calls.append((device.type, shape, list(precisions)))
        return {p: timings[p] for p in precisions}

    monkeypatch.setattr(hardware, "probe_timings", probe)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16_gpu)
    return calls


def test_a_gpu_with_bf16_units_trains_in_bf16(monkeypatch):
    calls = simulate(monkeypatch, {"fp32": 12e-3, "bf16": 4e-3}, cuda=True)
    hw = detect("auto", "auto", probe=ProbeShape(16, 256, 512, 8, 1376, 256))
    assert (hw.device.type, hw.precision) == ("cuda", "bf16")
    assert calls == [("cuda", ProbeShape(16, 256, 512, 8, 1376, 256), ["fp32", "bf16"])]
    assert "bf16 4.00 ms" in hw.describe()


def test_a_gpu_without_bf16_is_not_asked_about_it(monkeypatch):
    calls = simulate(monkeypatch, {"fp32": 12e-3}, cuda=True, bf16_gpu=False)
    assert detect("auto", "auto").precision == "fp32"
    assert calls[0][2] == ["fp32"]


def test_a_cpu_where_bf16_is_slower_keeps_fp32(monkeypatch):
    simulate(monkeypatch, {"fp32": 50e-3, "bf16": 140e-3})
    hw = detect("auto", "auto")
    assert (hw.device.type, hw.precision) == ("cpu", "fp32")


@pytest.mark.parametrize("bf16, expected",
                         [(1.2, "fp32"), (0.95, "fp32"), (0.91, "fp32"), (0.89, "bf16"), (0.5, "bf16")])
def test_bf16_must_beat_fp32_by_ten_percent(monkeypatch, bf16, expected):
    simulate(monkeypatch, {"fp32": 1.0, "bf16": bf16})
    assert detect("cpu", "auto").precision == expected
    assert fastest_precision({"fp32": 1.0, "bf16": bf16}) == expected


def test_nothing_measured_means_fp32():
    assert fastest_precision({}) == "fp32" and fastest_precision({"bf16": 1.0}) == "fp32"


def test_an_explicit_precision_and_a_recorded_one_are_not_measured(monkeypatch):
    calls = simulate(monkeypatch, {"fp32": 1.0, "bf16": 0.1})
    assert detect("cpu", "fp32").precision == "fp32"
    hw = detect("auto", "auto", recorded={"device": "cpu", "precision": "fp32"})
    assert hw.precision == "fp32" and hw.recorded and calls == []


def test_a_one_core_cpu(monkeypatch, one_thread):
    """One core: its own profile (the cache key counts cores and threads), and the real probe runs on
    one thread in well under a second at the tiny preset's shapes."""
    two = hw_profile.identify()
    monkeypatch.setattr(hw_profile.os, "sched_getaffinity", lambda pid: {0})
    one = hw_profile.identify()
    assert (one.cores, one.threads) == (1, 1) and one.fingerprint != two.fingerprint
    rng = torch.random.get_rng_state()
    start = time.perf_counter()
    timings = hardware.probe_timings(torch.device("cpu"), ProbeShape.for_width(128), ["fp32", "bf16"])
    assert time.perf_counter() - start < 5   # about 0.5 s on the development machine
    assert set(timings) == {"fp32", "bf16"} and all(0 < t < 1 for t in timings.values())
    assert torch.equal(torch.random.get_rng_state(), rng)   # the probe leaves the run's RNG alone


def test_a_precision_the_backend_cannot_run_is_left_out(monkeypatch, one_thread):
    real = hardware._time_step

    def no_bf16(net, x, targets, precision):
        if precision == "bf16":
            raise RuntimeError("\"addmm\" not implemented for 'BFloat16'")
        return real(net, x, targets, precision)

    monkeypatch.setattr(hardware, "_time_step", no_bf16)
    precision, timings = hardware.choose_precision(torch.device("cpu"), "auto", ProbeShape(2, 32, 32, 2, 96, 256))
    assert precision == "fp32" and list(timings) == ["fp32"]


def test_the_probe_runs_the_models_shapes_within_a_cost_cap(corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, tmp_path / "run")
    assert probe_shape(cfg) == ProbeShape(batch=4, seq=32, dim=32, heads=2, hidden=96, vocab=256)
    big = ProbeShape(batch=64, seq=2048, dim=512, heads=8, hidden=1376, vocab=256)
    capped = big.capped(3e9)
    assert capped.flops() <= 3e9 and capped.batch == 1 and 64 <= capped.seq < 2048
    assert dataclasses.replace(capped, batch=64, seq=2048) == big
    assert big.capped(1e12) == dataclasses.replace(big, batch=18)   # the batch alone shrinks while it can
    assert ProbeShape.for_width(128).capped(1e15) == ProbeShape.for_width(128)
    huge = ProbeShape(batch=8, seq=4096, dim=8192, heads=64, hidden=22016, vocab=256).capped(3e9)
    assert (huge.batch, huge.seq) == (1, 64)   # as small as it goes


@pytest.mark.cuda
def test_the_real_probe_on_a_gpu():
    hw = detect("cuda", "auto", probe=ProbeShape.for_width(1024))
    assert hw.device.type == "cuda" and hw.timings["fp32"] > 0
    if torch.cuda.is_bf16_supported():
        assert "bf16" in hw.timings


# ------------------------------------------------------------------ neat hw and its cache


def fake_measure(counter: list, name: str = "simulated CPU"):
    """A stand-in for hw_profile.measure that counts its calls and measures nothing."""
    def measure(identity, compile_check=False):
        counter.append(compile_check)
        cpu = DeviceProfile(device="cpu", name=name, memory_total=8 * 10**9, memory_free=4 * 10**9,
                            matmul_gflops={"fp32": 50.0, "bf16": 20.0, "fp16": None}, copy_gbs=10.0,
                            sdpa={"math": True, "flash": False, "efficient": False, "cudnn": False},
                            compile=True if compile_check else None, precision="fp32",
                            step_ms={"fp32": 50.0, "bf16": 140.0})
        return MachineProfile(schema=hw_profile.SCHEMA, fingerprint=identity.fingerprint, torch=identity.torch,
                              cores=identity.cores, threads=identity.threads, cpu_features=[], devices=[cpu],
                              measured_at="2026-01-01T00:00:00+00:00", seconds=0.0)
    return measure


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(hw_profile, "_warned", set())
    return tmp_path / "xdg" / "neatlm"


PROFILE_KEYS = {"schema", "fingerprint", "torch", "cores", "threads", "cpu_features", "devices", "measured_at",
                "seconds"}
DEVICE_KEYS = {"device", "name", "memory_total", "memory_free", "matmul_gflops", "copy_gbs", "sdpa", "compile",
               "precision", "step_ms"}


def test_neat_hw_measures_this_machine(cache, capsys, one_thread):
    """The real measurement, on the CPU: JSON with every key, cached under the fingerprint."""
    start = time.perf_counter()
    assert main(["hw", "--json"]) == 0
    assert time.perf_counter() - start < 30
    out, err = capsys.readouterr()
    profile = json.loads(out)
    assert set(profile) == PROFILE_KEYS and profile["threads"] == 1
    cpu = profile["devices"][0]
    assert set(cpu) == DEVICE_KEYS and cpu["device"] == "cpu"
    assert cpu["memory_total"] >= cpu["memory_free"] > 0
    assert cpu["matmul_gflops"]["fp32"] > 0 and cpu["copy_gbs"] > 0
    assert cpu["sdpa"]["math"] is True and cpu["compile"] is None
    assert cpu["precision"] in ("fp32", "bf16") and cpu["step_ms"]["fp32"] > 0
    path = cache / f"hw-{profile['fingerprint']}.json"
    assert json.loads(path.read_text())["devices"][0]["matmul_gflops"] == cpu["matmul_gflops"]
    assert "measured in" in err and str(path) in err


def test_a_cached_profile_is_reused_and_refresh_replaces_it(cache, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(hw_profile, "measure", fake_measure(calls))
    assert main(["hw"]) == 0
    table = capsys.readouterr().out
    assert calls == [False] and "simulated CPU" in table and "matmul fp32 GFLOP/s" in table
    assert "precision auto" in table and "not checked" in table
    (path,) = cache.glob("hw-*.json")

    assert main(["hw", "--json"]) == 0
    out, err = capsys.readouterr()
    assert calls == [False] and "from the cache" in err
    assert json.loads(out)["devices"][0]["name"] == "simulated CPU"

    monkeypatch.setattr(hw_profile, "measure", fake_measure(calls, name="remeasured CPU"))
    assert main(["hw", "--refresh", "--json"]) == 0
    assert calls == [False, False] and json.loads(capsys.readouterr().out)["devices"][0]["name"] == "remeasured CPU"
    assert json.loads(path.read_text())["devices"][0]["name"] == "remeasured CPU"


def test_compile_check_on_a_cached_profile_checks_only_that(cache, capsys, monkeypatch):
    calls, compiled = [], []
    monkeypatch.setattr(hw_profile, "measure", fake_measure(calls))
    monkeypatch.setattr(hw_profile, "compile_works", lambda device: compiled.append(device) or True)
    assert main(["hw"]) == 0
    assert "not checked" in capsys.readouterr().out
    assert main(["hw", "--compile-check", "--json"]) == 0
    assert calls == [False] and len(compiled) == 1
    assert json.loads(capsys.readouterr().out)["devices"][0]["compile"] is True
    (path,) = cache.glob("hw-*.json")
    assert json.loads(path.read_text())["devices"][0]["compile"] is True
    assert main(["hw", "--compile-check"]) == 0 and len(compiled) == 1   # now cached too
    assert "works" in capsys.readouterr().out


def test_a_damaged_or_foreign_cache_file_is_measured_again(cache, capsys, monkeypatch):
    calls = []
    monkeypatch.setattr(hw_profile, "measure", fake_measure(calls))
    assert main(["hw"]) == 0
    (path,) = cache.glob("hw-*.json")
    for damage in ("{not json", json.dumps({"schema": 1}), json.dumps([1, 2]),
                   json.dumps({**json.loads(path.read_text()), "fingerprint": "another machine"})):
        path.write_text(damage)
        assert main(["hw"]) == 0
    assert len(calls) == 5 and json.loads(path.read_text())["devices"][0]["name"] == "simulated CPU"


def test_an_unwritable_cache_warns_once_and_the_command_works(tmp_path, capsys, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))   # the cache directory would be under a file
    monkeypatch.setattr(hw_profile, "_warned", set())
    calls = []
    monkeypatch.setattr(hw_profile, "measure", fake_measure(calls))
    with caplog.at_level(logging.WARNING, logger="neatlm.hw"):
        assert main(["hw"]) == 0
        assert main(["hw", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "simulated CPU" in out and "cached in" not in err
    assert len(calls) == 2   # nothing was saved, so nothing to reuse
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and str(blocker / "neatlm") in warnings[0] and "cannot be written" in warnings[0]


def test_the_cache_directory_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert hw_profile.cache_dir() == tmp_path / "neatlm"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")   # not absolute: ignored, as the spec says
    assert hw_profile.cache_dir() == Path.home() / ".cache" / "neatlm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert hw_profile.cache_dir() == Path.home() / ".cache" / "neatlm"


def test_hw_flags_take_no_values(capsys):
    assert main(["hw", "--refresh=yes"]) == 2
    assert "--refresh" in capsys.readouterr().err


@pytest.mark.cuda
def test_neat_hw_profiles_every_gpu(cache, capsys):
    assert main(["hw", "--json"]) == 0
    devices = json.loads(capsys.readouterr().out)["devices"]
    gpus = [d for d in devices if d["device"].startswith("cuda")]
    assert len(gpus) == torch.cuda.device_count()
    assert all(g["memory_total"] >= g["memory_free"] > 0 and "tf32" in g["matmul_gflops"] for g in gpus)


# ------------------------------------------------------------------ every component trains under CPU bf16 autocast

COMPONENTS = {
    "attention": [],
    "memory-mag": ["memory.enabled=true", "memory.combine=mag", "model.window=16"],
    "memory-mal": ["memory.enabled=true", "memory.combine=mal", "model.window=16"],
    "memory-mac": ["memory.enabled=true", "memory.combine=mac", "model.window=16"],
    "memory-atlas": ["memory.enabled=true", "memory.optimizer=muon", "memory.features=poly",
                     "memory.objective=omega", "memory.conv_size=4"],
    "memory-linear-autograd": ["memory.enabled=true", "memory.function=linear", "memory.mode=autograd"],
    "memory-naive": ["memory.enabled=true", "memory.mode=naive", "memory.chunk_size=16"],
    "bk": ["model.mixer=bk"],
    "moe": ["model.mlp=moe"],
    "selective-checkpointing": ["memory.enabled=true", "checkpointing.policy=selective"],
}


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("bf16") / "corpus", n_files=6)


@pytest.mark.parametrize("overrides", COMPONENTS.values(), ids=COMPONENTS.keys())
def test_every_component_trains_under_cpu_bf16_autocast(overrides, small_corpus, tmp_path, one_thread):
    cfg = small_config(small_corpus, tmp_path / "run", steps=2, save_every=100)
    apply_overrides(cfg, ["model.n_layers=1", "memory.chunk_size=8", "eval.batches=1", "train.precision=bf16",
                          *overrides])
    validate(cfg)
    trainer = Trainer(cfg)
    assert trainer.hw.precision == "bf16"
    with trainer.hw.autocast():   # the run really computes in bf16 where autocast applies
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16
    result = trainer.train()
    assert trainer.step == 2 and math.isfinite(result["loss"]) and math.isfinite(result["val_loss"])
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_the_memory_layer_keeps_its_inner_loop_in_fp32_under_autocast(one_thread):
    torch.manual_seed(0)
    mem = NeuralMemory(32, chunk_size=4)
    x = torch.randn(2, 10, 32)
    plain, _ = mem(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = mem(x.to(torch.bfloat16))
    assert y.dtype == torch.float32 and all(w.dtype == torch.float32 for w in state.weights)
    y.sum().backward()
    assert mem.w0_0.grad.dtype == torch.float32 and torch.isfinite(mem.w0_0.grad).all()
    # only the rounding of the input to bf16 differs from an fp32 call
    assert torch.allclose(y, plain, atol=0.05)


# ------------------------------------------------------------------ generation


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_corpus) -> Path:
    run = tmp_path_factory.mktemp("gen") / "run"
    cfg = small_config(small_corpus, run, steps=2, save_every=2)
    cfg.model.n_layers, cfg.eval.batches = 1, 1
    Trainer(cfg).train()
    return run


def test_generate_reports_ms_per_byte(run_dir, capsys):
    assert main(["generate", "--run", str(run_dir), "--prompt", "def ", "--max-bytes", "20"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("def ") and len(out.encode()) >= len("def \n")
    (line,) = err.splitlines()
    assert line.startswith("neat: 20 bytes in ") and " ms per byte" in line and "4-byte prompt read once" in line
    assert main(["generate", "--run", str(run_dir), "--max-bytes", "0"]) == 0
    assert capsys.readouterr().err.startswith("neat: 0 bytes in ")


def counting_calls(model: NeatLM) -> list[int]:
    """Record the length of every call of ``model``."""
    lengths: list[int] = []
    model.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    return lengths


@pytest.mark.parametrize("overrides", [[], ["memory.enabled=true", "model.window=8", "memory.chunk_size=4"]],
                         ids=["attention", "memory"])
def test_generation_reads_the_prompt_once_and_then_one_byte_per_call(overrides, corpus_dir, tmp_path):
    cfg = small_config(corpus_dir, tmp_path / "run")
    apply_overrides(cfg, overrides)
    torch.manual_seed(0)
    model = NeatLM(cfg)
    lengths = counting_calls(model)
    out = generate(model, torch.tensor(list(b"def f(x):")), 12, 0.8, 0, torch.Generator().manual_seed(0))
    assert out.shape == (12,) and lengths == [9] + [1] * 11   # the 12th byte needs no further call
    out += 1   # an ordinary tensor, usable outside inference mode
    assert model.training


@pytest.mark.parametrize("mode", ["chunk", "naive"])
def test_memory_models_learn_while_generating_in_the_fastest_mode(mode, corpus_dir, tmp_path):
    """Generation runs under inference_mode, where the memories still learn (analytic inner
    gradients); the naive reference takes its inner gradients by autograd and decodes under no_grad.
    Either way the bytes are those of a plain no_grad decode, and learning changes them."""
    cfg = small_config(corpus_dir, tmp_path / "run")
    apply_overrides(cfg, ["memory.enabled=true", "model.window=8", "memory.chunk_size=4", f"memory.mode={mode}",
                          "memory.max_lr=1.0"])
    torch.manual_seed(0)
    model = NeatLM(cfg)
    prompt = torch.tensor(list(b"def alpha_1(beta):\n    return beta"))
    expect_inference = mode == "chunk"
    assert isinstance(decoding_mode(model), torch.inference_mode) == expect_inference
    fast = generate(model, prompt, 16, 0.0)
    with torch.no_grad():
        model.eval()
        logits, state, _, _ = model(prompt[None])
        ref = []
        for _ in range(16):
            ref.append(logits[0, -1].argmax())
            logits, state, _, _ = model(ref[-1].view(1, 1), state)
    assert torch.equal(fast, torch.stack(ref))
    assert state[0].memory.position == prompt.numel() + 16 and not torch.equal(
        state[0].memory.weights[0], model.blocks[0].mixer.memory.initial_state(1).weights[0])
